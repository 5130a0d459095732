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

import torch
from torch import Tensor

from .checks import check_conv_args, check_reset
from .reference import causal_conv_reference
from .registry import resolve_backend

__all__ = ["causal_conv", "causal_conv_reference"]


def causal_conv(x: Tensor, weight: Tensor, bias: Tensor | None = None, *, reset: Tensor | None = None,
                backend: str = "auto") -> Tensor:
    """Causal depthwise conv along time: x (B, T, C) -> y (B, T, C); see the module docstring.

    Args:
        x: (B, T, C) input, channels-last.
        weight: (C, 1, K) (nn.Conv1d's depthwise weight) or (C, K).
        bias: (C,) or None.
        reset: (B, T) bool, True where a document starts, or None: a position then sees no
            input before its document's first token (documents packed in a row are convolved
            as if alone).
        backend: "auto" or a backend with a conv: "sequential"/"chunked" (nn.Conv1d's kernel)
            or "cpu" (numba; float32/float64 CPU).
    Returns:
        y: (B, T, C) in x's dtype; y[:, t] depends on x[:, t-K+1 .. t] only.
    """
    check_conv_args(x, weight, bias)
    check_reset(reset, tuple(x.shape[:2]), x.device, "(batch, time)")
    be = resolve_backend(backend, x.device, "conv", (x,))
    if x.numel() == 0:  # an empty batch or sequence: an empty y, still in the inputs' graph
        y = x * weight.reshape(x.shape[-1], -1)[:, -1]
        return y if bias is None else y + bias
    y = be.conv(x, weight, bias)
    return y if reset is None else _recompute_document_heads(y, x, weight, bias, reset)


def _recompute_document_heads(y: Tensor, x: Tensor, weight: Tensor, bias: Tensor | None, reset: Tensor) -> Tensor:
    """y with the first K - 1 positions of every document recomputed from that document's
    inputs alone. Only those positions can see across a start, so eagerly the work is
    O(documents K C) beside the conv's O(T K C), whatever backend ran the conv; under
    torch.compile, where the gather of those positions (a data-dependent count) would break the
    graph, every position is recomputed with masks (``_document_heads_masked``)."""
    B, T, C = x.shape
    K = weight.shape[-1]
    w = weight.reshape(C, K)
    t = torch.arange(T, device=x.device)
    last_start = torch.where(reset, t, -1).cummax(1).values  # (B, T): the latest start at or before t
    since = t - last_start  # steps since it (meaningless where there is none: last_start = -1)
    in_head = (last_start >= 0) & (since < K - 1)
    if torch.compiler.is_compiling():
        return _document_heads_masked(y, x, w, bias, since, in_head)
    rows, cols = torch.nonzero(in_head, as_tuple=True)
    if rows.numel() == 0:
        return y
    lag = torch.arange(K, device=x.device)  # input x_{t - lag} meets weight[:, K - 1 - lag]
    src = cols[:, None] - lag  # (N, K)
    seen = (lag <= since[rows, cols][:, None]) & (src >= 0)
    inputs = x[rows[:, None], src.clamp_min(0)] * seen.unsqueeze(-1).to(x.dtype)  # (N, K, C)
    head = (inputs * w.t().flip(0).to(x.dtype)).sum(1)
    if bias is not None:
        head = head + bias.to(x.dtype)
    return y.index_put((rows, cols), head)


def _document_heads_masked(y: Tensor, x: Tensor, w: Tensor, bias: Tensor | None, since: Tensor,
                           in_head: Tensor) -> Tensor:
    """``_recompute_document_heads`` with static shapes only (what torch.compile traces whole):
    the conv recomputed at every position (B, T, C) from the inputs of its own document (lags
    up to ``since``, (B, T) int64), taken where ``in_head`` ((B, T) bool) and y elsewhere."""
    K = w.shape[-1]
    w = w.to(x.dtype)
    head = torch.zeros_like(x) if bias is None else bias.to(x.dtype).expand_as(x)
    for lag in range(K):  # x_{t - lag}, zero before the row's start, meets weight[:, K - 1 - lag]
        shifted = torch.nn.functional.pad(x, (0, 0, lag, 0))[:, :x.shape[1]]
        head = head + torch.where((lag <= since).unsqueeze(-1), shifted, 0) * w[:, K - 1 - lag]
    return torch.where(in_head.unsqueeze(-1), head, y)
