"""Where the CPU kernels' large outputs come from: a cache of freed blocks (``OutputCache``).

A kernel's outputs are large (B*T*C floats) and short-lived (h lives until the backward,
dL/d(pre) until the projection's backward has read it). glibc serves allocations of that
size with a fresh mmap and unmaps them on free, so without a cache every training step
page-faults its outputs in again. The cache keeps freed output blocks, keyed by size, and
hands them out again; like CUDA's caching allocator it trades held memory for speed, within
a limit: MINRNN_CPU_CACHE_MB (MiB of idle blocks; 0 turns it off), or ``output_cache_limit``
for a block of code. docs/design.md has the A/B against plain torch.empty and glibc settings.
"""

from __future__ import annotations

import collections
import contextlib
import os
import threading
import weakref

import numpy as np
import torch
from torch import Tensor

_ALIGN = 64


class OutputCache:
    """Freed kernel outputs kept for reuse, up to ``limit_bytes`` held idle.

    A block goes back to the cache only when the last tensor viewing it is freed: the tensor
    handed out is built on a numpy view of the block, and that view's finalizer returns it.
    Blocks under ``min_bytes`` are left to the allocator (small ones are cheap and reused by it).

    When a returned block does not fit, idle blocks of a size nobody has asked for in the last
    ``stale_after`` requests are dropped (oldest first) to make room, and if that is not
    enough the returned block itself is dropped. Why not simply drop the oldest: a training
    step frees its outputs in the same order every step, so the oldest idle block is the next
    one to be asked for; with more outputs than the limit holds, dropping the oldest missed on
    every request (docs/design.md has the case that showed it). Sizes still being asked for
    are kept; sizes of a finished workload make way.
    """

    def __init__(self, limit_bytes: int, min_bytes: int = 1 << 20, stale_after: int = 64):
        self.limit_bytes, self.min_bytes, self.stale_after = int(limit_bytes), int(min_bytes), int(stale_after)
        self._idle: collections.OrderedDict = collections.OrderedDict()  # id -> block, oldest first
        self._held = 0
        self._requests = 0  # cacheable requests so far: the clock for staleness
        self._asked: dict[int, int] = {}  # block size -> the request count when it was last asked for
        self._lock = threading.RLock()

    @property
    def held_bytes(self) -> int:
        """Bytes held idle for reuse (not counting blocks in use)."""
        return self._held

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
        """An uninitialised contiguous CPU tensor, from the cache when a block of its size is idle."""
        nbytes = dtype.itemsize
        for d in shape:
            nbytes *= d
        if nbytes < self.min_bytes or self.limit_bytes <= 0:
            return torch.empty(shape, dtype=dtype)
        block = None
        with self._lock:
            self._requests += 1
            self._asked[nbytes] = self._requests
            for key, cand in reversed(self._idle.items()):  # the most recently freed: warmest in cache
                if cand.nbytes == nbytes:
                    block = self._idle.pop(key)
                    self._held -= nbytes
                    break
        if block is None:
            # 64-byte aligned, as torch's own allocations are: numpy aligns to 16 bytes only,
            # and vector stores that straddle cache lines slow the kernels down
            raw = np.empty(nbytes + _ALIGN - 1, dtype=np.uint8)
            start = -raw.ctypes.data % _ALIGN
            block = raw[start:start + nbytes]
        view = block.view(_NP_DTYPES[dtype])
        weakref.finalize(view, self._release, block).atexit = False
        return torch.from_numpy(view).view(shape)

    def _release(self, block) -> None:
        with self._lock:
            if block.nbytes > self.limit_bytes:
                return
            if self._held + block.nbytes > self.limit_bytes:
                fresh = self._requests - self.stale_after
                for key in [k for k, b in self._idle.items() if self._asked.get(b.nbytes, 0) < fresh]:
                    if self._held + block.nbytes <= self.limit_bytes:
                        break
                    self._held -= self._idle.pop(key).nbytes
                if self._held + block.nbytes > self.limit_bytes:
                    return  # full of sizes still asked for: keep them, drop this one
            self._idle[id(block)] = block
            self._held += block.nbytes

    def clear(self) -> None:
        """Drop every idle block (blocks in use are dropped when freed, unless re-enabled)."""
        with self._lock:
            self._idle.clear()
            self._held = 0
            self._asked.clear()


def _default_limit() -> int:
    text = os.environ.get("MINRNN_CPU_CACHE_MB", "1024")
    try:
        mb = float(text)
    except ValueError:
        raise ValueError(f"MINRNN_CPU_CACHE_MB must be a number of MiB (0 turns the cache off), got {text!r}") from None
    return int(mb * (1 << 20))


#: The cache the CPU kernels allocate their outputs from. Its limit is MINRNN_CPU_CACHE_MB
#: (MiB of idle blocks, default 1024; 0 turns it off); change it with ``output_cache_limit``.
OUTPUT_CACHE = OutputCache(_default_limit())
_NP_DTYPES = {torch.float32: np.float32, torch.float64: np.float64}


@contextlib.contextmanager
def output_cache_limit(limit_bytes: int):
    """Within the block, the cache holds at most ``limit_bytes`` idle (0: off, every output a
    fresh allocation, which PyTorch's profiler then sees); the old limit is restored after."""
    before = OUTPUT_CACHE.limit_bytes
    OUTPUT_CACHE.limit_bytes = int(limit_bytes)
    if limit_bytes <= 0:
        OUTPUT_CACHE.clear()
    try:
        yield OUTPUT_CACHE
    finally:
        OUTPUT_CACHE.limit_bytes = before


def empty_output_cache() -> None:
    """Give the idle blocks of the CPU kernels' output cache back to the allocator."""
    OUTPUT_CACHE.clear()


def new_output(shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """An uninitialised contiguous CPU tensor for a kernel's output: from the cache when it
    holds one, a plain torch.empty while PyTorch's profiler runs (so that it sees every
    allocation the kernels make)."""
    if torch.autograd.profiler._is_profiler_enabled:
        return torch.empty(shape, dtype=dtype)
    return OUTPUT_CACHE.empty(shape, dtype)
