"""How the CPU kernels are called: work split, thread count, array views, output buffers,
and the one-line notice when kernels are compiled."""

from __future__ import annotations

import sys
import time

import numba
import numpy as np
import torch
from torch import Tensor

from .buffers import new_output  # noqa: F401  (re-exported: the kernels' outputs come from here)

# A work item spans all C channels when there are enough batch rows to keep every thread
# busy (a whole (T, C) slab is then one sequential stream); else channels are split into
# blocks of at least MIN_BLOCK.
MIN_BLOCK = 16
# Below this many elements a kernel runs on the calling thread only: waking the thread pool
# costs more than the work, and numba's and torch's OpenMP pools spinning against each other
# make small calls many times slower on a busy machine.
SERIAL_BELOW = 1 << 16

_seen: set = set()  # kernels already called in this process
_announced = False


def worker_count() -> int:
    """Work items wanted per call, for load balance: two per thread."""
    return 2 * numba.get_num_threads()


def channel_block(B: int, C: int) -> int:
    """Channels per work item: all of them, unless that leaves threads idle."""
    want = worker_count()
    if B >= want or B == 0:
        return max(C, 1)
    blocks = min(-(-want // B), max(1, C // MIN_BLOCK))
    return -(-C // blocks)


def launch(kernel, numel: int, *args) -> None:
    """Run ``kernel(*args)``, on the calling thread alone when the work is small."""
    if kernel not in _seen:
        _first_call(kernel, args)
        return
    threads = numba.get_num_threads()
    if numel >= SERIAL_BELOW or threads == 1:
        kernel(*args)
        return
    numba.set_num_threads(1)
    try:
        kernel(*args)
    finally:
        numba.set_num_threads(threads)


def _first_call(kernel, args) -> None:
    """The first call of a kernel in this process; says so on stderr, once per process, when
    it had to be compiled rather than loaded from numba's cache."""
    global _announced
    _seen.add(kernel)
    start = time.perf_counter()
    kernel(*args)
    stats = getattr(kernel, "stats", None)
    if not _announced and stats is not None and sum(stats.cache_misses.values()):
        _announced = True
        where = stats.cache_path or "nowhere (MINRNN_NUMBA_CACHE=0)"
        print(f"minrnn: compiled CPU kernels ({time.perf_counter() - start:.0f} s for the first; "
              f"cached in {where} for later processes)", file=sys.stderr)


def flat_view(x: Tensor):
    """(flat 1-D numpy view of x's storage span, its (batch, time) strides) for a (B, T, C) CPU
    tensor whose channel stride is 1 (copied once if it is not)."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    strides = np.array(x.stride()[:2], dtype=np.int64)
    if x.is_contiguous():  # the common case, and the cheaper view (this runs on every call)
        return x.detach().view(-1).numpy(), strides
    B, T, C = x.shape
    span = (B - 1) * x.stride(0) + (T - 1) * x.stride(1) + C
    return torch.as_strided(x.detach(), (span,), (1,), x.storage_offset()).numpy(), strides


def contiguous_strides(B: int, T: int, C: int):
    """The (batch, time) strides of a contiguous (B, T, C) array, as the kernels take them."""
    return np.array([T * C, C], dtype=np.int64)
