"""Decode suite: tokens per second of one-token steps as the context grows.

    minGRU       minrnn.MinGRU(W, W, num_layers=L).step(x_t, h): a state of L x B x W
                 numbers, the same at every context length
    Transformer  ``KVCacheDecoder`` below: L pre-norm blocks (W wide, ``decode_heads``
                 heads, MLP 4 W) attending over a key/value cache that grows by a token
                 per step, via F.scaled_dot_product_attention

Both models see the same random input vectors (B, W) per token and have no embedding
or output head (those cost the same in both). Each decodes ``max(contexts) + window``
tokens from an empty state under ``torch.inference_mode``, timing every step; the
per-token time at context c is the median over the ``window`` tokens decoded with c
tokens already in the context. ``state_bytes`` is what the model carries between
steps at that context (the KV cache for the Transformer).

The Transformer is written here (about 60 lines, no positional encoding: a rotary or
learned position costs O(W) per token and would not change how the cost grows with
context) rather than taken from transformers, so that the suite needs torch only and
both models are equally bare.
"""

from __future__ import annotations

import gc
import time

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..layers import MinGRU
from .measure import median, synchronize
from .runner import progress
from .settings import Settings


class _Block(nn.Module):
    def __init__(self, width: int, heads: int, device=None, dtype=None):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} must be divisible by heads {heads}")
        kw = dict(device=device, dtype=dtype)
        self.heads = heads
        self.ln1 = nn.LayerNorm(width, **kw)
        self.qkv = nn.Linear(width, 3 * width, **kw)
        self.out = nn.Linear(width, width, **kw)
        self.ln2 = nn.LayerNorm(width, **kw)
        self.fc1 = nn.Linear(width, 4 * width, **kw)
        self.fc2 = nn.Linear(4 * width, width, **kw)

    def _qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        # x (B, T, W) -> q, k, v (B, heads, T, W / heads)
        B, T, W = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, T, 3, self.heads, W // self.heads).permute(2, 0, 3, 1, 4)
        return q, k, v

    def _finish(self, x: Tensor, att: Tensor) -> Tensor:
        # att (B, heads, T, W / heads)
        B, _, T, _ = att.shape
        x = x + self.out(att.transpose(1, 2).reshape(B, T, -1))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = self._qkv(x)
        return self._finish(x, F.scaled_dot_product_attention(q, k, v, is_causal=True))

    def step(self, x: Tensor, k_cache: Tensor, v_cache: Tensor, pos: int) -> Tensor:
        # x (B, 1, W); caches (B, heads, max_len, W / heads), filled up to pos
        q, k, v = self._qkv(x)
        k_cache[:, :, pos:pos + 1] = k
        v_cache[:, :, pos:pos + 1] = v
        att = F.scaled_dot_product_attention(q, k_cache[:, :, :pos + 1], v_cache[:, :, :pos + 1])
        return self._finish(x, att)


class KVCache:
    """Preallocated keys and values: per layer (B, heads, max_len, W / heads), and how many
    positions are filled."""

    def __init__(self, layers: int, batch: int, heads: int, head_dim: int, max_len: int, device=None, dtype=None):
        shape = (batch, heads, max_len, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(layers)]
        self.length = 0

    def nbytes(self, length: int | None = None) -> int:
        """Bytes of keys and values for ``length`` positions (default: those filled)."""
        n = self.length if length is None else length
        per_pos = sum(t[:, :, :1].numel() * t.element_size() for t in self.k + self.v)
        return per_pos * n


class KVCacheDecoder(nn.Module):
    """A minimal Transformer decoder stack on vectors: forward (B, T, W) -> (B, T, W) with
    causal attention, step (B, W) -> (B, W) with a ``KVCache``."""

    def __init__(self, width: int, layers: int, heads: int, device=None, dtype=None):
        super().__init__()
        self.width, self.heads = width, heads
        self.blocks = nn.ModuleList(_Block(width, heads, device, dtype) for _ in range(layers))

    def forward(self, x: Tensor) -> Tensor:
        for blk in self.blocks:
            x = blk(x)
        return x

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        p = self.blocks[0].qkv.weight
        return KVCache(len(self.blocks), batch, self.heads, self.width // self.heads, max_len, p.device, p.dtype)

    def step(self, x_t: Tensor, cache: KVCache) -> Tensor:
        if cache.length >= cache.k[0].shape[2]:
            raise ValueError(f"the KV cache is full ({cache.length} positions)")
        x = x_t.unsqueeze(1)
        for blk, k, v in zip(self.blocks, cache.k, cache.v):
            x = blk.step(x, k, v, cache.length)
        cache.length += 1
        return x.squeeze(1)


def _decode_times(step, xs: Tensor, device) -> list[float]:
    """Seconds of each call step(x_t), t = 0 .. len(xs) - 1, garbage collector paused."""
    times = []
    enabled = gc.isenabled()
    gc.disable()
    try:
        for x_t in xs:
            start = time.perf_counter()
            step(x_t)
            synchronize(device)
            times.append(time.perf_counter() - start)
    finally:
        if enabled:
            gc.enable()
    return times


def run(settings: Settings) -> dict:
    """Run the suite; returns {"models": {...}, "rows": [...]}."""
    dev, dt = settings.device, settings.dtype
    W, L, B = settings.decode_width, settings.decode_layers, settings.decode_batch
    contexts, window = sorted(settings.decode_contexts), settings.decode_window
    total = contexts[-1] + window
    torch.manual_seed(settings.seed)
    xs = torch.randn(total, B, W, device=dev, dtype=dt)
    itemsize = xs.element_size()
    rnn = MinGRU(W, W, num_layers=L, device=dev, dtype=dt).eval()
    tf = KVCacheDecoder(W, L, settings.decode_heads, device=dev, dtype=dt).eval()
    models = {
        "minGRU": {"params": sum(p.numel() for p in rnn.parameters()), "layers": L, "width": W},
        "Transformer": {"params": sum(p.numel() for p in tf.parameters()), "layers": L, "width": W,
                        "heads": settings.decode_heads},
    }
    times = {}
    with torch.inference_mode():
        t0 = time.perf_counter()
        state = [None]

        def rnn_step(x_t):
            _, state[0] = rnn.step(x_t, state[0])

        times["minGRU"] = _decode_times(rnn_step, xs, dev)
        cache = tf.new_cache(B, total)
        times["Transformer"] = _decode_times(lambda x_t: tf.step(x_t, cache), xs, dev)
        progress(f"decode: {total} tokens per model, {time.perf_counter() - t0:.1f} s")
    rows = []
    for c in contexts:
        for name, ts in times.items():
            sec = median(ts[c:c + window])
            state_bytes = L * B * W * itemsize if name == "minGRU" else cache.nbytes(c)
            rows.append({"model": name, "context": c, "ms_per_token": sec * 1e3,
                         "tokens_per_s": B / sec, "state_bytes": state_bytes})
    return {"models": models, "batch": B, "window": window, "rows": rows}
