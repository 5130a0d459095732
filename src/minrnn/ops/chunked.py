"""Plain-space parallel scan for values of any sign, in pure PyTorch.

The sequence is cut into chunks of length L. Three steps, all batched over chunks:

1. inside every chunk, a scan from a zero state: a loop of L steps over tensors of
   shape (B, T/L, C), so the Python cost is L iterations, not T;
2. the state entering each chunk: chunk n maps a state s to A_n s + H_n, where A_n is
   the product of its a's and H_n its local end value -- a scan of length T/L over
   (A_n, H_n), done by this same function (recursively, so it stays parallel);
3. the fix-up h_t = local_t + (a_1 ... a_t within the chunk) * state entering the chunk.

Only products and sums of the inputs appear (no division, no logarithm), so zeros,
negative values and saturated gates are all fine and rounding stays at the level of
the sequential loop. Work is O(T); the Python overhead is about L + T/L + ... steps.
"""

from __future__ import annotations

import torch
from torch import Tensor

CHUNK = 64


def _local_scan(a: Tensor, b: Tensor, h0: Tensor | None) -> Tensor:
    # a, b: (..., L, C); loops over L with everything else batched.
    h = b[..., 0, :] if h0 is None else a[..., 0, :] * h0 + b[..., 0, :]
    out = [h]
    for t in range(1, a.shape[-2]):
        h = a[..., t, :] * h + b[..., t, :]
        out.append(h)
    return torch.stack(out, dim=-2)


def chunked_scan(a: Tensor, b: Tensor, h0: Tensor | None = None, chunk: int = CHUNK) -> Tensor:
    """The registered "chunked" backend: h_t = a_t h_{t-1} + b_t in plain space.

    Args:
        a, b: (B, T, C), any floating dtype (minrnn.scan upcasts half to float32), any device.
        h0: (B, C) or None (zeros).
        chunk: steps per chunk (the Python loop runs chunk + T / chunk + ... iterations).
    Returns:
        h: (B, T, C).

    Plain torch ops: autograd saves what they save (each chunk's local states and decay
    products, O(B T C) values).
    """
    B, T, C = a.shape
    if T <= chunk:
        return _local_scan(a, b, h0)
    n = -(-T // chunk)
    pad = n * chunk - T
    if pad:
        # identity steps (a = 1, b = 0) at the end change nothing before them
        a = torch.cat([a, a.new_ones(B, pad, C)], dim=1)
        b = torch.cat([b, b.new_zeros(B, pad, C)], dim=1)
    a4 = a.view(B, n, chunk, C)
    b4 = b.view(B, n, chunk, C)
    local = _local_scan(a4, b4, None)  # (B, n, L, C)
    decay = torch.cumprod(a4, dim=2)  # a_1 ... a_t inside each chunk
    # state after each chunk, then the state entering each chunk
    ends = chunked_scan(decay[:, :, -1], local[:, :, -1], h0, chunk)  # (B, n, C)
    start = torch.zeros_like(ends[:, :1]) if h0 is None else h0.unsqueeze(1)
    entering = torch.cat([start, ends[:, :-1]], dim=1)
    h = local + decay * entering.unsqueeze(2)
    return h.reshape(B, n * chunk, C)[:, :T]
