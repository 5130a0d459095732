"""The causal depthwise conv of the LM block, channels-last, behind one signature.

    y_t = bias + sum_{j=0}^{K-1} weight[:, j] * x_{t-K+1+j},    x_s = 0 for s < 0

x and y are (batch, time, channels), the layout of the residual stream, so no transpose is
needed around it; weight is nn.Conv1d's (C, 1, K) (or (C, K)), bias (C,) or None. It is what
``nn.Conv1d(C, C, K, groups=C)`` computes on x left-padded with K - 1 zeros.

It dispatches through the backend registry (``minrnn.ops``) like the scan: "sequential" and
"chunked" run that nn.Conv1d call (the reference, any device and dtype); "cpu" the numba
kernels of ``ops/cpu/conv.py`` (float32/float64 CPU tensors). Why a kernel of its own: on a
CPU, oneDNN's depthwise conv over (B, C, T) plus the two transposes around it cost several
times the arithmetic (docs/design.md has the measurement). "auto" takes "cpu" where it
applies, else the reference.
"""

from __future__ import annotations

from torch import Tensor

from .checks import check_conv_args
from .reference import causal_conv_reference
from .registry import resolve_backend

__all__ = ["causal_conv", "causal_conv_reference"]


def causal_conv(x: Tensor, weight: Tensor, bias: Tensor | None = None, *, backend: str = "auto") -> Tensor:
    """Causal depthwise conv along time: x (B, T, C) -> y (B, T, C); see the module docstring.

    Args:
        x: (B, T, C) input, channels-last.
        weight: (C, 1, K) (nn.Conv1d's depthwise weight) or (C, K).
        bias: (C,) or None.
        backend: "auto" or a backend with a conv: "sequential"/"chunked" (nn.Conv1d's kernel)
            or "cpu" (numba; float32/float64 CPU).
    Returns:
        y: (B, T, C) in x's dtype; y[:, t] depends on x[:, t-K+1 .. t] only.
    """
    check_conv_args(x, weight, bias)
    be = resolve_backend(backend, x.device, "conv", (x,))
    if x.numel() == 0:  # an empty batch or sequence: an empty y, still in the inputs' graph
        y = x * weight.reshape(x.shape[-1], -1)[:, -1]
        return y if bias is None else y + bias
    return be.conv(x, weight, bias)
