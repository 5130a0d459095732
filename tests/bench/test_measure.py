"""The measuring instruments, on cases whose answer is known exactly."""

import pytest
import torch

from minrnn.bench.measure import (
    copy_bandwidth,
    num_threads,
    peak_from_events,
    peak_memory,
    saved_tensor_bytes,
    scan_bytes,
    set_malloc_policy,
)

MiB = 2**20
F32 = 4  # bytes


def test_peak_from_events_is_the_running_maximum():
    assert peak_from_events([]) == 0
    assert peak_from_events([3, -2, 5, -6]) == 6
    assert peak_from_events([-4, 1]) == 0  # freeing what existed before is no peak


def test_peak_memory_of_known_allocations():
    def sequential():  # 1 MiB and 2 MiB, freed, then 4 MiB: the peak is the 4 MiB alone
        a = torch.empty(MiB // F32)
        b = torch.empty(2 * MiB // F32)
        del a, b
        c = torch.empty(4 * MiB // F32)
        del c

    def overlapping():  # all three alive at once
        a = torch.empty(MiB // F32)
        b = torch.empty(2 * MiB // F32)
        c = torch.empty(4 * MiB // F32)
        del a, b, c

    assert peak_memory(sequential) == 4 * MiB
    assert peak_memory(overlapping) == 7 * MiB


def test_peak_memory_counts_only_what_the_step_allocates():
    keep = torch.empty(8 * MiB // F32)

    def step():
        nonlocal keep
        keep = None  # frees 8 MiB allocated before the step: not the step's memory
        return torch.empty(MiB // F32)

    assert peak_memory(step) == MiB


def test_peak_memory_of_a_training_step():
    # y = x * w; backward allocates dx and dw, each N floats, with y (N floats) alive
    N = 1 << 16
    x = torch.randn(N, requires_grad=True)
    w = torch.randn(N, requires_grad=True)

    def step():
        torch.autograd.backward(x * w, torch.ones(N))

    x.grad = w.grad = None
    peak = peak_memory(step)
    # y and the upstream gradient, then dx and dw (y freed or not): between 3 and 4 tensors
    assert 3 * N * F32 <= peak <= 4 * N * F32 + 1024


def test_saved_tensor_bytes_counts_each_storage_once():
    N = 1000
    x = torch.randn(N, requires_grad=True)

    def step():
        y = x * x  # saves x twice: one storage
        z = y.exp()  # saves its result z
        z.sum().backward()

    assert saved_tensor_bytes(step) == 2 * N * F32
    assert saved_tensor_bytes(step, exclude=[x]) == N * F32


def test_saved_tensor_bytes_counts_the_whole_storage_of_a_view():
    base = torch.randn(100, 10, requires_grad=True)

    def step():
        v = base.detach()[:10].requires_grad_()  # a view of a 1000-float storage
        (v * v).sum().backward()

    assert saved_tensor_bytes(step) == 1000 * F32


def test_scan_bytes_counts_eight_tensors():
    assert scan_bytes(2, 3, 4) == 8 * 24 * 4
    assert scan_bytes(2, 3, 4, torch.float64) == 8 * 24 * 8
    assert scan_bytes(2, 3, 4, torch.bfloat16) == 8 * 24 * 2


def test_copy_bandwidth_counts_read_and_write():
    r = copy_bandwidth(MiB, repeats=3)
    assert r["buffer_bytes"] == MiB and r["bytes_moved"] == 2 * MiB
    assert r["gbps"] == pytest.approx(r["bytes_moved"] / r["seconds"] / 1e9)


def test_num_threads_sets_and_restores():
    before = torch.get_num_threads()
    with num_threads(1) as n:
        assert n == 1 and torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with pytest.raises(ValueError, match="threads"):
        with num_threads(0):
            pass


def test_malloc_policy_retain_sets_glibc_thresholds_and_system_leaves_them():
    calls = []

    def mallopt(param, value):
        calls.append((param, value))
        return 1

    assert set_malloc_policy("system", mallopt).startswith("system") and calls == []
    assert set_malloc_policy("retain", mallopt).startswith("retain")
    assert calls == [(-3, 32 << 20), (-1, 1 << 30)]  # M_MMAP_THRESHOLD, M_TRIM_THRESHOLD
    assert set_malloc_policy("retain", lambda p, v: 0) == "system (mallopt refused)"
    with pytest.raises(ValueError, match="retain"):
        set_malloc_policy("jemalloc")
