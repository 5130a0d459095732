"""The causal depthwise conv of the LM block, channels-last, behind one signature.

    y_t = bias + sum_{j=0}^{K-1} weight[:, j] * x_{t-K+1+j},    x_s = 0 for s < 0

x and y are (batch, time, channels), the layout of the residual stream, so no transpose is
needed around it; weight is nn.Conv1d's (C, 1, K) (or (C, K)), bias (C,) or None. It is what
``nn.Conv1d(C, C, K, groups=C)`` computes on x left-padded with K - 1 zeros.

Backends: "torch" is that nn.Conv1d call (the reference, any device and dtype); "cpu" the
numba kernels of ``ops/cpu/conv.py`` (float32/float64 CPU tensors). Why a kernel of its own: on a
CPU, oneDNN's depthwise conv over (B, C, T) plus the two transposes around it cost several
times the arithmetic (docs/design.md has the measurement).
"auto" takes "cpu" where it applies, else "torch".
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from . import cpu

CONV_BACKENDS = ("auto", "torch", "cpu")


def causal_conv_reference(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """The reference: torch's grouped conv1d on the zero-padded, transposed input."""
    C, K = x.shape[-1], weight.shape[-1]
    xp = F.pad(x.transpose(1, 2), (K - 1, 0))
    return F.conv1d(xp, weight.reshape(C, 1, K), bias, groups=C).transpose(1, 2)


def _check(x, weight, bias) -> None:
    for name, t in (("x", x), ("weight", weight), ("bias", bias)):
        if t is None and name == "bias":
            continue
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
        if t.dtype != x.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but x has {x.dtype}; pass one dtype")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    if x.dim() != 3:
        raise ValueError(f"x must be (batch, time, channels), got shape {tuple(x.shape)}")
    B, T, C = x.shape
    if not (weight.dim() in (2, 3) and weight.shape[0] == C and weight.numel() == C * weight.shape[-1]
            and weight.shape[-1] >= 1):
        raise ValueError(f"weight must be (channels, 1, K) or (channels, K) with channels = {C}, "
                         f"got shape {tuple(weight.shape)}")
    if bias is not None and bias.shape != (C,):
        raise ValueError(f"bias must be (channels,) = ({C},), got shape {tuple(bias.shape)}")


def causal_conv(x: Tensor, weight: Tensor, bias: Tensor | None = None, *, backend: str = "auto") -> Tensor:
    """Causal depthwise conv along time: x (B, T, C) -> y (B, T, C); see the module docstring.

    Args:
        x: (B, T, C) input, channels-last.
        weight: (C, 1, K) (nn.Conv1d's depthwise weight) or (C, K).
        bias: (C,) or None.
        backend: "auto", "torch" (nn.Conv1d's kernel) or "cpu" (numba; float32/float64 CPU).
    Returns:
        y: (B, T, C) in x's dtype; y[:, t] depends on x[:, t-K+1 .. t] only.
    """
    _check(x, weight, bias)
    if backend not in CONV_BACKENDS:
        raise ValueError(f"unknown conv backend {backend!r}; expected one of {CONV_BACKENDS}")
    fits_cpu = x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64)
    if backend == "cpu":
        if not cpu.available():
            raise RuntimeError("conv backend 'cpu' is not available here: it needs numba (pip install numba)")
        if not fits_cpu:
            raise ValueError(f"conv backend 'cpu' takes float32/float64 CPU tensors, got {x.dtype} on {x.device}")
    if x.numel() == 0:  # an empty batch or sequence: an empty y, still in the inputs' graph
        y = x * weight.reshape(x.shape[-1], -1)[:, -1]
        return y if bias is None else y + bias
    if backend == "cpu" or (backend == "auto" and fits_cpu and cpu.available()):
        return cpu.cpu_causal_conv(x, weight, bias)
    return causal_conv_reference(x, weight, bias)
