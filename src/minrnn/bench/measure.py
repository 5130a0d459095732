"""Measuring one training step: time, peak memory, bytes saved for backward, bandwidth.

Everything here is device-generic (CPU first; CUDA is synchronised and uses its own
memory counters) and knows nothing of minrnn's layers.

Memory, two measures (both in bytes, both deterministic for a given step):

- ``peak_bytes`` (``peak_memory``): the largest amount of memory allocated by the
  step and alive at one moment: activations, temporaries, saved tensors, parameter and
  input gradients. On CPU it is read from the PyTorch profiler's allocation events
  (``profile_memory=True``): every allocation the step makes through PyTorch's
  allocator and every free of such an allocation, summed in order, and the running
  maximum taken. A free of memory allocated before the step is usually not an event, but
  it is when the allocator recorded a block at that address under an earlier profile, so
  whether it lowers the count is not dependable: the caller drops old gradients before,
  not during, the step (``Case.reset``). Memory a library
  allocates behind PyTorch's back (a oneDNN scratchpad, say) is not seen. On CUDA it is
  ``torch.cuda.max_memory_allocated`` minus the allocation at the start (there a
  free of older memory does lower the count).
- ``saved_bytes`` (``saved_tensor_bytes``): the bytes of the tensors autograd keeps
  for the backward pass, as seen by ``torch.autograd.graph.saved_tensors_hooks``,
  each storage counted once however many ops save it, and storages the caller names
  (the parameters) left out. This is the activation memory of training, independent
  of how temporaries are freed.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Iterator

import torch
from torch import Tensor


def default_threads() -> int:
    """The cores this process may run on (its CPU affinity), else os.cpu_count()."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


@contextlib.contextmanager
def num_threads(n: int | None) -> Iterator[int]:
    """torch.set_num_threads(n) inside the block (n None: every core), restored after."""
    n = default_threads() if n is None else n
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"threads must be a positive integer, got {n!r}")
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield n
    finally:
        torch.set_num_threads(before)


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
#: what "retain" sets: blocks up to 32 MiB (glibc's largest allowed threshold) come from the
#: heap, and up to 1 GiB of freed heap stays mapped
RETAIN_MMAP_THRESHOLD, RETAIN_TRIM_THRESHOLD = 32 << 20, 1 << 30


def _libc_mallopt():
    """glibc's mallopt, or None (another C library, or not Linux)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return fn


def set_malloc_policy(policy: str, mallopt=None) -> str:
    """Apply ``policy`` ("retain" or "system") to this process's C allocator; returns what
    was done, for the run's metadata.

    Why "retain": with glibc's defaults, memory a candidate frees goes back to the OS, and
    the candidate timed after it pays for faulting it in again. Keeping freed memory mapped,
    as jemalloc and tcmalloc do and as PyTorch's CUDA allocator does, makes each candidate's
    time its own. The setting lasts for the process (glibc cannot be handed back its dynamic
    thresholds).
    """
    if policy not in ("retain", "system"):
        raise ValueError(f"malloc policy must be 'retain' or 'system', got {policy!r}")
    if policy == "system":
        return "system (the C library's defaults)"
    mallopt = _libc_mallopt() if mallopt is None else mallopt
    if mallopt is None:
        return "system (no glibc mallopt here)"
    ok = mallopt(_M_MMAP_THRESHOLD, RETAIN_MMAP_THRESHOLD) and mallopt(_M_TRIM_THRESHOLD, RETAIN_TRIM_THRESHOLD)
    if not ok:
        return "system (mallopt refused)"
    return (f"retain (glibc mallopt: mmap threshold {RETAIN_MMAP_THRESHOLD >> 20} MiB, "
            f"trim threshold {RETAIN_TRIM_THRESHOLD >> 20} MiB)")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_once(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds one call of fn takes, with the garbage collector paused (as timeit does)
    and the device synchronised before and after."""
    synchronize(device)
    enabled = gc.isenabled()
    gc.disable()
    try:
        start = time.perf_counter()
        fn()
        synchronize(device)
        return time.perf_counter() - start
    finally:
        if enabled:
            gc.enable()


def median(xs: Iterable[float]) -> float:
    return statistics.median(list(xs))


# --- memory ------------------------------------------------------------------------


def peak_from_events(deltas: Iterable[int]) -> int:
    """The running maximum of a sequence of allocation (+) and free (-) byte counts,
    starting from 0; never below 0 (a step that only frees has peak 0)."""
    current = peak = 0
    for d in deltas:
        current += d
        peak = max(peak, current)
    return peak


@contextlib.contextmanager
def _native_stderr_silenced() -> Iterator[None]:
    """Send file descriptor 2 to /dev/null: the profiler's C++ side prints two lines
    per use there (and reads its log level only when torch is imported). Python
    exceptions still propagate; the step has already run unprofiled by then."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def _cpu_output_cache_off():
    """A context with the cpu backend's output cache off, where it has one: a block the cache
    hands out again is no PyTorch allocation, so the profiler would not count it."""
    try:
        from ..ops.cpu import output_cache_limit
    except ImportError:  # no cache: every output is a PyTorch allocation already
        return contextlib.nullcontext()
    return output_cache_limit(0)


def peak_memory(fn: Callable[[], object], device: torch.device = torch.device("cpu")) -> int:
    """Peak bytes allocated by fn() and alive at one moment (see the module doc).

    The garbage collector is paused during fn(), so that a collection of older objects
    (a free the step did not cause) cannot hide part of the step's own peak. On CPU the
    output cache of minrnn's compiled kernels is off during fn(): a block it hands out again
    is not a PyTorch allocation and the profiler would not see it.
    """
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"peak_memory measures cpu or cuda, not {device.type}")
    enabled = gc.isenabled()
    gc.disable()
    try:
        if device.type == "cuda":
            synchronize(device)
            start = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            fn()
            synchronize(device)
            return max(0, torch.cuda.max_memory_allocated(device) - start)
        from torch.profiler import ProfilerActivity, profile

        with (_cpu_output_cache_off(), _native_stderr_silenced(),
              profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof):
            fn()
    finally:
        if enabled:
            gc.enable()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"
              and e.device_type() == torch.autograd.DeviceType.CPU]
    # the events come per thread; a stable sort on their start times puts them in order
    events.sort(key=lambda e: e.start_ns())
    return peak_from_events(e.nbytes() for e in events)


def saved_tensor_bytes(fn: Callable[[], object], exclude: Iterable[Tensor] = ()) -> int:
    """Bytes of the distinct storages autograd saves for backward while fn() runs.

    A storage is counted once (by its data pointer), with its full size: a view saved
    for backward keeps its whole storage alive. Storages of ``exclude`` (typically the
    parameters, which exist whether or not one trains) are left out.
    """
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        if t.layout == torch.strided and t.device.type != "meta":
            s = t.untyped_storage()
            ptr = s.data_ptr()
            if ptr not in skip and ptr != 0:
                seen[ptr] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


# --- bandwidth ---------------------------------------------------------------------


def copy_bandwidth(nbytes: int, repeats: int, device: torch.device = torch.device("cpu")) -> dict:
    """The machine's copy bandwidth: median time of ``dst.copy_(src)`` on float32 buffers
    of ``nbytes`` each. A copy reads nbytes and writes nbytes, so it moves 2 * nbytes.

    Returns {"buffer_bytes", "bytes_moved", "seconds" (median), "gbps"} (GB = 1e9 bytes).
    """
    n = max(1, nbytes // 4)
    src = torch.rand(n, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)  # first touch: page faults belong to allocation, not to copying
    times = [time_once(lambda: dst.copy_(src), device) for _ in range(repeats)]
    sec = median(times)
    moved = 2 * src.nbytes
    return {"buffer_bytes": src.nbytes, "bytes_moved": moved, "seconds": sec, "gbps": moved / sec / 1e9}


def scan_bytes(batch: int, length: int, channels: int, dtype: torch.dtype = torch.float32) -> int:
    """The bytes a scan h_t = a_t h_{t-1} + b_t must move for forward + backward, at least.

    With N = batch * length * channels elements per tensor:
      forward  reads a, b and writes h                      3 N
      backward reads dh (the gradient of h), a and h, and
               writes da and db (db_t = g_t, the running gradient
               g_t = dh_t + a_{t+1} g_{t+1}; da_t = g_t h_{t-1})   5 N
    so 8 N elements; the start state (batch * channels) is left out. This is what a
    fused kernel that streams each tensor once would move; effective bandwidth is these
    bytes over the measured time, to set beside ``copy_bandwidth``.
    """
    itemsize = torch.empty((), dtype=dtype).element_size()
    return 8 * batch * length * channels * itemsize
