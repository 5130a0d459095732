"""The sequential scan: the plain loop every other backend is tested against.

    h_t = a_t * h_{t-1} + b_t,   t = 1 .. T,   h_0 = h0 (zeros when None)

One Python iteration per time step; autograd records each one. Slow by design and
obviously right, which is its whole job.
"""

from __future__ import annotations

import torch
from torch import Tensor


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


def reference_cell(spec, pre: tuple[Tensor, ...], h0: Tensor | None, options: tuple, mask: Tensor | None) -> Tensor:
    """A cell as its gates followed by the loop, autograd through both: the reference."""
    from .cells import identity_where_masked

    a, b = spec.gates(*pre, *options)
    if mask is not None:
        a, b = identity_where_masked(a, b, mask)
    return sequential_scan(a, b, h0)
