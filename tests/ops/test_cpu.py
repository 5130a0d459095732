"""The compiled CPU kernels beyond the generic backend suite: their fused cells' input
layouts, float32 exp, saved memory, and the fallback when numba is missing."""

import numpy as np
import pytest
import torch

import minrnn
import minrnn.functional as MF
from minrnn.ops import BACKENDS, cpu, resolve_backend

from ..conftest import assert_close_scaled

pytestmark = pytest.mark.skipif(not cpu.available(), reason="numba is not installed")


def test_exp32_is_accurate_over_the_float32_range():
    from numba import njit

    @njit
    def apply(x, out):
        for i in range(x.size):
            out[i] = cpu.exp32(x[i])

    x = torch.linspace(-87, 88, 200_001, dtype=torch.float32)
    out = np.empty(x.numel(), np.float32)
    apply(x.numpy(), out)
    rel = (torch.from_numpy(out).double() / torch.exp(x.double()) - 1).abs().max().item()
    assert rel < 2.5e-7  # ~2 ulp


@pytest.mark.parametrize("cell", ["mingru", "minlstm"])
@pytest.mark.parametrize("C", [1, 63, 64, 70, 200])
def test_fused_cell_layouts_agree(cell, C):
    """Chunks of one tensor (the copy-free path), separate tensors, and a non-unit channel
    stride all give the reference's values and gradients."""
    n = 2 if cell == "mingru" else 3
    B, T = 3, 37
    pre = torch.randn(B, T, n * C, dtype=torch.float64)
    h0 = torch.randn(B, C, dtype=torch.float64)
    w = torch.randn(B, T, C, dtype=torch.float64)

    def grads(make_parts, backend, mode="parallel"):
        leaf, h0_ = pre.clone().requires_grad_(), h0.clone().requires_grad_()
        parts = make_parts(leaf)
        fn = MF.mingru if cell == "mingru" else MF.minlstm
        h, last = fn(*parts, h0_, backend=backend, mode=mode)
        ((h * w).sum() + last.sum()).backward()
        return h.detach(), leaf.grad, h0_.grad

    ref = grads(lambda p: p.chunk(n, -1), "sequential", mode="sequential")
    layouts = {
        "chunks": lambda p: p.chunk(n, -1),
        "separate": lambda p: [c.contiguous() for c in p.chunk(n, -1)],
        "chunks of a wider tensor": lambda p: torch.cat([p, torch.ones_like(p[..., :3])], -1)[..., :n * C].chunk(n, -1),
        "channel-strided": lambda p: [c.transpose(1, 2).contiguous().transpose(1, 2) for c in p.chunk(n, -1)],
    }
    for name, make in layouts.items():
        for g, r in zip(grads(make, "cpu"), ref):
            assert_close_scaled(g, r, 1e-12, f"{cell} C={C} {name}")


def test_pack_reuses_the_linear_output_without_copying():
    lin = torch.nn.Linear(5, 8)
    pre = lin(torch.randn(2, 3, 5))
    packed = cpu._pack(pre.chunk(2, -1))
    assert packed.data_ptr() == pre.data_ptr() and torch.equal(packed, pre)
    parts = (torch.randn(2, 3, 4), torch.randn(2, 3, 4))
    assert torch.equal(cpu._pack(parts), torch.cat(parts, -1))
    # chunks in the wrong order are not mistaken for the packed tensor
    a, b = pre.chunk(2, -1)
    assert torch.equal(cpu._pack((b, a)), torch.cat([b, a], -1))


def test_fused_cell_saves_only_pre_activations_and_states():
    """What a minGRU layer keeps for backward: its Linear's input, the pre-activations and h."""
    B, T, D, H = 4, 50, 16, 32
    layer = minrnn.MinGRU(D, H, backend="cpu")
    x = torch.randn(B, T, D, requires_grad=True)
    saved = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y, _ = layer(x)
    elements = B * T * D + B * T * 2 * H + B * T * H  # x, pre-activations, h
    weights = layer.proj[0].weight.numel()
    assert sum(saved.values()) <= 4 * (elements + weights + B * H)


def test_half_inputs_run_through_float32_kernels():
    a, b = torch.rand(2, 40, 8), torch.randn(2, 40, 8)
    h = minrnn.scan(a.bfloat16(), b.bfloat16(), backend="cpu")
    assert h.dtype == torch.bfloat16
    assert_close_scaled(h.float(), minrnn.scan(a.bfloat16().float(), b.bfloat16().float(), backend="sequential"), 2 ** -7)


def test_auto_prefers_cpu_kernels_and_falls_back_without_numba(monkeypatch):
    assert resolve_backend("auto", torch.device("cpu")).name == "cpu"
    from dataclasses import replace

    monkeypatch.setitem(BACKENDS, "cpu", replace(BACKENDS["cpu"], available=lambda: False))
    assert resolve_backend("auto", torch.device("cpu")).name == "chunked"
    with pytest.raises(RuntimeError, match="backend 'cpu' is not available here.*numba"):
        minrnn.scan(torch.rand(1, 3, 2), torch.rand(1, 3, 2), backend="cpu")
    layer = minrnn.MinGRU(4, 6)
    y, _ = layer(torch.randn(2, 5, 4))  # still runs, on the pure-torch path
    assert y.shape == (2, 5, 6)
