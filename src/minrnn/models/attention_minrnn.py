"""The attention mixer of a hybrid MinRNN model: causal (optionally sliding-window) multi-head
attention with RoPE and grouped-query heads, called as the minRNN mixer is.

    y, new = MinRNNAttention(config)(x, past, mask)
        x     (B, T, D)  the block's normed input
        past  AttentionWindow or None: the keys/values the cache holds for this layer
        mask  (B, T) bool or None: True for tokens, False for padding
        y     (B, T, D); new: this call's keys/values (an AttentionWindow) for the cache

Positions count real tokens only (a padded row's first token is at position 0, as when read
alone), continuing from ``past.next_position``; a key is seen by a query when it is a real
token at a position p with q - window < p <= q. Documents packed in a row (``reset``, True at
each document's first token) are attended as if alone: positions restart at 0 at a start and a
query sees only keys of its own document (none of the cache's, after a start). A padding query sees only its own key (its
output is never read by a real position: padding is masked out of every later mixer), so no
row of the softmax is empty. The window is counted in positions and the cache keeps the last
``window`` slots: the two agree when padding comes before a row's tokens (left padding).

``attention_reference`` is the plain dense softmax the fast path (scaled_dot_product_attention)
is tested against.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .modules_minrnn import MinRNNResidualOut


class AttentionWindow(NamedTuple):
    """Keys and values of some positions of one attention layer (after RoPE)."""

    keys: Tensor           # (B, kv_heads, S, head_dim)
    values: Tensor         # (B, kv_heads, S, head_dim)
    positions: Tensor      # (B, S) long: each slot's token position
    valid: Tensor          # (B, S) bool: the slot holds a real token (not padding, not yet written)
    next_position: Tensor  # (B,) long: the position the next real token will get

    @property
    def batch_size(self) -> int:
        return self.keys.shape[0]


def rope(x: Tensor, positions: Tensor, theta: float) -> Tensor:
    """Rotate x (B, H, T, hd) by its positions (B, T): pairs (i, i + hd/2) turn by pos * theta^(-2i/hd)."""
    hd = x.shape[-1]
    dtype = torch.promote_types(x.dtype, torch.float32)  # half precision rotates in float32
    inv_freq = theta ** (-torch.arange(0, hd, 2, device=x.device, dtype=dtype) / hd)
    angles = positions.to(dtype)[:, None, :, None] * inv_freq  # (B, 1, T, hd/2)
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    x1, x2 = x.to(dtype).chunk(2, -1)
    rotated = torch.cat([-x2, x1], -1)
    return (x.to(dtype) * cos + rotated * sin).to(x.dtype)


def visible_keys(q_pos: Tensor, q_valid: Tensor, k_pos: Tensor, k_valid: Tensor, window: int | None,
                 q_doc: Tensor | None = None, k_doc: Tensor | None = None) -> Tensor:
    """(B, 1, T, S) bool: which keys each query sees. The queries are the last T of the S keys;
    q_doc (B, T) and k_doc (B, S), when given, number the documents: a query sees its own only."""
    T, S = q_pos.shape[1], k_pos.shape[1]
    q, k = q_pos[:, :, None], k_pos[:, None, :]
    seen = k_valid[:, None, :] & (k <= q)
    if q_doc is not None:
        seen = seen & (q_doc[:, :, None] == k_doc[:, None, :])
    if window is not None:
        seen = seen & (k > q - window)
    own = torch.zeros(T, S, dtype=torch.bool, device=q_pos.device)
    own[:, S - T:] = torch.eye(T, dtype=torch.bool, device=q_pos.device)
    return torch.where(q_valid[:, :, None], seen, own).unsqueeze(1)


def attention_reference(q: Tensor, k: Tensor, v: Tensor, visible: Tensor) -> Tensor:
    """softmax(q k^T / sqrt(hd) + mask) v over a dense score matrix, key/value heads repeated."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~visible, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def attention_fast(q: Tensor, k: Tensor, v: Tensor, visible: Tensor | None, window: int | None) -> Tensor:
    """scaled_dot_product_attention; ``visible`` None means plain causal (no padding, no past)."""
    gqa = q.shape[1] != k.shape[1]
    if visible is None and (window is None or window >= q.shape[2]):
        # a window as long as the sequence is plain causal: the kernels' fastest case
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    if visible is None:
        T = q.shape[2]
        i = torch.arange(T, device=q.device)
        visible = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - window)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=visible, enable_gqa=gqa)


def every_third_block(num_layers: int) -> list[int]:
    """The hybrids' default placement of attention blocks: blocks 2, 5, 8, ... (0-based), or
    the last block when there are fewer than three."""
    return list(range(2, num_layers, 3)) or [num_layers - 1]


class MinRNNAttention(nn.Module):
    """q/k/v projections (D -> H hd, D -> G hd twice), RoPE, attention, out projection (H hd -> D)."""

    def __init__(self, config):
        super().__init__()
        D, self.heads, self.kv_heads, self.head_dim = (config.hidden_size, config.num_attention_heads,
                                                       config.kv_heads, config.head_dim)
        self.window, self.theta = config.attention_window, float(config.rope_theta)
        self.q_proj = nn.Linear(D, self.heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(D, self.kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(D, self.kv_heads * self.head_dim, bias=False)
        self.out_proj = MinRNNResidualOut(self.heads * self.head_dim, D, bias=config.use_bias)
        self.reference = False  # True: the dense softmax instead of scaled_dot_product_attention

    def extra_repr(self) -> str:
        return f"heads={self.heads}, kv_heads={self.kv_heads}, window={self.window}, rope_theta={self.theta}"

    def _split(self, x: Tensor, heads: int) -> Tensor:
        B, T = x.shape[:2]
        return x.view(B, T, heads, self.head_dim).transpose(1, 2)

    def forward(self, x: Tensor, past: AttentionWindow | None = None, mask: Tensor | None = None,
                reset: Tensor | None = None) -> tuple[Tensor, AttentionWindow]:
        """x (B, T, D), past (the cache's keys) or None, mask (B, T) bool or None, reset (B, T)
        bool or None (True at a document's first token). Returns (y (B, T, D), this call's keys)."""
        B, T = x.shape[:2]
        if past is not None and past.batch_size != B:
            raise ValueError(f"the cache holds keys for batch {past.batch_size}, but the input has batch {B}; "
                             "use a fresh cache for a new batch")
        start = past.next_position if past is not None else torch.zeros(B, dtype=torch.long, device=x.device)
        real = mask if mask is not None else torch.ones(B, T, dtype=torch.bool, device=x.device)
        positions = start[:, None] + real.long().cumsum(1) - 1
        q_doc = k_doc = None
        if reset is not None:
            # a document's positions count from its start: subtract the position of the latest
            # start at or before each token (positions never decrease, so a running max finds it)
            offset = torch.where(reset, positions, torch.zeros_like(positions)).cummax(1).values
            positions = positions - offset
            q_doc = reset.long().cumsum(1)  # the cache's keys are document 0, before any start here
            k_doc = q_doc if past is None else torch.cat([q_doc.new_zeros(past.positions.shape), q_doc], 1)
        positions = positions.clamp_min(0)  # padding before the first token: any position, it is masked
        q = rope(self._split(self.q_proj(x), self.heads), positions, self.theta)
        k = rope(self._split(self.k_proj(x), self.kv_heads), positions, self.theta)
        v = self._split(self.v_proj(x), self.kv_heads)
        following = start + real.long().sum(1)
        if reset is None:
            new = AttentionWindow(k, v, positions, real, following)
        else:  # later calls continue the row's last document: the earlier ones' keys are never seen again
            new = AttentionWindow(k, v, positions, real & (q_doc == q_doc[:, -1:]), following - offset[:, -1])
        if past is None:
            keys, values, k_pos, k_valid = k, v, positions, real
        else:
            keys, values = torch.cat([past.keys.to(k.dtype), k], 2), torch.cat([past.values.to(v.dtype), v], 2)
            k_pos, k_valid = torch.cat([past.positions, positions], 1), torch.cat([past.valid, real], 1)
        plain = past is None and mask is None and reset is None
        if self.reference:
            visible = visible_keys(positions, real, k_pos, k_valid, self.window, q_doc, k_doc)
            y = attention_reference(q, keys, values, visible)
        else:
            visible = None if plain else visible_keys(positions, real, k_pos, k_valid, self.window, q_doc, k_doc)
            y = attention_fast(q, keys, values, visible, self.window)
        y = y.transpose(1, 2).reshape(B, T, self.heads * self.head_dim)
        return self.out_proj(y), new

    def step(self, x: Tensor, past: AttentionWindow | None, mask: Tensor | None = None,
             residual: Tensor | None = None) -> tuple[Tensor, AttentionWindow]:
        """One position: x (B, D), past as ``forward``'s, mask (B,) bool or None. Returns
        (y (B, D), plus ``residual`` (B, D) when given; this position's keys/values for the cache)."""
        y, new = self.forward(x.unsqueeze(1), past, None if mask is None else mask.unsqueeze(1))
        return (y[:, 0] if residual is None else residual + y[:, 0]), new


__all__ = ["AttentionWindow", "MinRNNAttention", "attention_reference", "attention_fast", "every_third_block", "rope",
           "visible_keys"]
