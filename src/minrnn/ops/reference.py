"""The references every other backend is tested against: the sequential scan, a cell as its
gates and that loop, RMSNorm and the causal conv as plain torch ops.

    h_t = a_t * h_{t-1} + b_t,   t = 1 .. T,   h_0 = h0 (zeros when None)

One Python iteration per time step; autograd records each one. Slow by design and
obviously right, which is its whole job.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .cells import apply_boundaries


def sequential_scan(a: Tensor, b: Tensor, h0: Tensor | None = None) -> Tensor:
    """The registered "sequential" backend, the reference: h_t = a_t h_{t-1} + b_t one step at a time.

    Args:
        a, b: (B, T, C), any floating dtype, any device; h0: (B, C) or None (zeros).
    Returns:
        h: (B, T, C).

    Autograd records every step (saving a_t and h_{t-1} per step).
    """
    h = torch.zeros_like(b[:, 0]) if h0 is None else h0
    out = []
    # unbind once: indexing a[:, t] inside the loop would make each step's backward
    # write a full (B, T, C) zero tensor, O(T^2) work
    for a_t, b_t in zip(a.unbind(1), b.unbind(1)):
        h = a_t * h + b_t
        out.append(h)
    return torch.stack(out, dim=1)


def reference_cell(spec, pre: tuple[Tensor, ...], h0: Tensor | None, options: tuple, mask: Tensor | None,
                   reset: Tensor | None = None) -> Tensor:
    """A cell as its gates followed by the loop, autograd through both: the reference.
    mask (B, T) False: padding (identity steps); reset (B, T) True: a document starts (a = 0)."""
    a, b = apply_boundaries(*spec.gates(*pre, *options), mask, reset)
    return sequential_scan(a, b, h0)


def rms_norm_reference(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """RMSNorm over the last axis, x (..., D), weight (D,): torch ops, autograd through each;
    normalised in float32 and rounded back to x's dtype before the weight (as Llama does)."""
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def causal_conv_reference(x: Tensor, weight: Tensor, bias: Tensor | None = None, reset: Tensor | None = None) -> Tensor:
    """The causal depthwise conv, x (B, T, C) -> (B, T, C), weight (C, 1, K) or (C, K): torch's
    grouped conv1d on the zero-padded, transposed input. reset (B, T) bool, True where a
    document starts: each document is convolved alone (a loop over rows and documents)."""
    C, K = x.shape[-1], weight.shape[-1]
    if reset is not None:
        rows = []
        for i in range(x.shape[0]):
            cuts = [0, *(t for t in reset[i].nonzero().flatten().tolist() if t > 0), x.shape[1]]
            rows.append(torch.cat([causal_conv_reference(x[i:i + 1, s:e], weight, bias)
                                   for s, e in zip(cuts[:-1], cuts[1:])], 1))
        return torch.cat(rows, 0)
    xp = F.pad(x.transpose(1, 2), (K - 1, 0))
    return F.conv1d(xp, weight.reshape(C, 1, K), bias, groups=C).transpose(1, 2)
