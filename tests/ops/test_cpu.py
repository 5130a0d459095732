"""The compiled CPU kernels beyond the generic backend suite: their fused cells' input
layouts, float32 exp, saved memory, and the fallback when numba is missing."""

import numpy as np
import pytest
import torch

import minrnn
import minrnn.functional as MF
from minrnn.ops import BACKENDS, cpu, resolve_backend
from minrnn.ops.cells import get_cell
from minrnn.ops.packing import pack_chunks

from ..conftest import assert_close_scaled, run_with_grads
from .test_scan import assert_rounded_once

pytestmark = pytest.mark.skipif(not cpu.available(), reason="numba is not installed")
if cpu.available():
    from minrnn.ops.cpu import functions


@pytest.fixture(autouse=True, params=["cache on", "cache off"])
def output_cache(request):
    """Every test here runs with the kernels' output cache taking every output (the suite's
    default, tests/conftest.py) and with it off (every output a fresh torch.empty)."""
    if request.param == "cache off":
        with cpu.output_cache_limit(0):
            yield
    else:
        yield


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
    packed = pack_chunks(pre.chunk(2, -1))
    assert packed.data_ptr() == pre.data_ptr() and torch.equal(packed, pre)
    parts = (torch.randn(2, 3, 4), torch.randn(2, 3, 4))
    assert torch.equal(pack_chunks(parts), torch.cat(parts, -1))
    # chunks in the wrong order are not mistaken for the packed tensor
    a, b = pre.chunk(2, -1)
    assert torch.equal(pack_chunks((b, a)), torch.cat([b, a], -1))


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
    weights = sum(p.numel() for p in layer.proj[0].parameters())  # held anyway, not extra memory
    assert sum(saved.values()) <= 4 * (elements + weights + B * H)


def test_half_inputs_run_through_float32_kernels():
    a, b = torch.rand(2, 40, 8), torch.randn(2, 40, 8)
    h = minrnn.scan(a.bfloat16(), b.bfloat16(), backend="cpu")
    assert h.dtype == torch.bfloat16
    assert_rounded_once(h, minrnn.scan(a.bfloat16().double(), b.bfloat16().double(), backend="sequential"))


def test_auto_prefers_cpu_kernels_and_falls_back_without_numba(monkeypatch):
    assert resolve_backend("auto", torch.device("cpu")).name == "cpu"
    from dataclasses import replace

    monkeypatch.setitem(BACKENDS, "cpu", replace(BACKENDS["cpu"], available=lambda: False))
    monkeypatch.setattr(minrnn.ops.registry, "_SKIPPED_FOR_AUTO", set())
    with pytest.warns(RuntimeWarning, match="'cpu' is not available .*numba"):  # said once, not silent
        assert resolve_backend("auto", torch.device("cpu")).name == "chunked"
    with pytest.raises(RuntimeError, match="backend 'cpu' is not available here.*numba"):
        minrnn.scan(torch.rand(1, 3, 2), torch.rand(1, 3, 2), backend="cpu")
    layer = minrnn.MinGRU(4, 6)
    y, _ = layer(torch.randn(2, 5, 4))  # still runs, on the pure-torch path
    assert y.shape == (2, 5, 6)


# --- the output cache ---------------------------------------------------------------------


def test_cache_reuses_a_block_only_once_nothing_views_it():
    cache = cpu.OutputCache(limit_bytes=1 << 30, min_bytes=0)
    t = cache.empty((4, 8, 16), torch.float32)
    ptr = t.data_ptr()
    view = t[:, -1]
    del t
    u = cache.empty((4, 8, 16), torch.float32)  # the first block is still viewed: a new one
    assert u.data_ptr() != ptr
    del view
    v = cache.empty((4, 8, 16), torch.float32)
    assert v.data_ptr() == ptr and cache.held_bytes == 0
    w = cache.empty((8, 8, 16), torch.float32)  # another size: never a block of the wrong size
    assert w.data_ptr() != ptr and w.shape == (8, 8, 16) and w.is_contiguous()


def test_cache_holds_at_most_its_limit_keeps_what_it_holds_and_reuses_the_newest():
    block = 4 * 8 * 16 * 4
    cache = cpu.OutputCache(limit_bytes=2 * block, min_bytes=0)
    ts = [cache.empty((4, 8, 16), torch.float32) for _ in range(3)]
    ptrs = [t.data_ptr() for t in ts]
    for i in range(3):  # freed in order 0, 1, 2
        ts[i] = None
    assert cache.held_bytes == 2 * block  # full when block 2 came back: block 2 was dropped
    first = cache.empty((4, 8, 16), torch.float32)
    second = cache.empty((4, 8, 16), torch.float32)
    assert (first.data_ptr(), second.data_ptr()) == (ptrs[1], ptrs[0])  # the most recently freed first
    assert cache.held_bytes == 0
    del first, second
    cache.clear()
    assert cache.held_bytes == 0


def test_cache_makes_room_by_dropping_sizes_no_longer_asked_for():
    block = 4 * 8 * 16 * 4
    cache = cpu.OutputCache(limit_bytes=2 * block, min_bytes=0, stale_after=3)
    old = [cache.empty((4, 8, 16), torch.float32) for _ in range(2)]
    old_ptrs = {t.data_ptr() for t in old}
    del old  # the cache is full of this size
    for _ in range(4):  # a new workload: another size, asked for more than stale_after times
        t = cache.empty((2, 8, 16), torch.float32)
        ptr = t.data_ptr()
        del t
    assert cache.held_bytes == block // 2 + block  # one old block made way for the new size
    again = cache.empty((2, 8, 16), torch.float32)
    assert again.data_ptr() == ptr and ptr not in old_ptrs


def test_cache_serves_a_cycle_larger_than_its_limit():
    """Two layers of different sizes, each taking and freeing its outputs in turn, every step in
    the same order (a training loop), with more outputs than the limit holds: the cache keeps
    serving what it holds (dropping the oldest instead would evict each layer's blocks just
    before that layer asks for them again)."""
    cache = cpu.OutputCache(limit_bytes=20 << 10, min_bytes=0)
    hits = []
    for _ in range(5):
        for floats in (1024, 2048):  # layer A: two 4 KiB outputs, layer B: two 8 KiB ones
            held = {b.ctypes.data for b in cache._idle.values()}
            ts = [cache.empty((floats,), torch.float32) for _ in range(2)]
            hits.append(sum(t.data_ptr() in held for t in ts))
            del ts
    assert hits[:2] == [0, 0] and hits[2:] == [2, 1] * 4  # A's two and one of B's, every step


def test_cache_blocks_are_64_byte_aligned():
    cache = cpu.OutputCache(limit_bytes=1 << 30, min_bytes=0)
    for n in (1, 3, 17, 1000):
        assert cache.empty((n,), torch.float32).data_ptr() % 64 == 0


def test_cache_off_and_small_outputs_are_plain_allocations():
    cache = cpu.OutputCache(limit_bytes=0)
    t = cache.empty((4, 8, 16), torch.float64)
    t.resize_(5, 8, 16)  # a plain allocation: resizable
    small = cpu.OutputCache(limit_bytes=1 << 30, min_bytes=1 << 20).empty((4, 8, 16), torch.float32)
    small.resize_(8, 8, 16)


@pytest.mark.parametrize("cell", ["scan", "mingru", "minlstm"])
def test_outputs_from_reused_blocks_do_not_alias_live_results(cell):
    """Two passes in a row, the first one's outputs and gradients kept: the second pass gets
    reused blocks, and neither pass's numbers change."""
    B, T, C = 3, 29, 20

    def run(seed):
        gen = torch.Generator().manual_seed(seed)
        n = {"scan": 2, "mingru": 2, "minlstm": 3}[cell]
        xs = [torch.randn(B, T, C, generator=gen, dtype=torch.float64) for _ in range(n)]
        h0 = torch.randn(B, C, generator=gen, dtype=torch.float64)
        if cell == "scan":
            xs[0] = torch.sigmoid(xs[0])
        fns = {"scan": (cpu.cpu_scan, lambda a, b, h: minrnn.scan(a, b, h, backend="sequential")),
               "mingru": (cpu.cpu_mingru, lambda x, k, h: MF.mingru(x, k, h, mode="sequential")[0]),
               "minlstm": (lambda x, f, i, h: cpu.cpu_minlstm(x, f, i, h, True),
                           lambda x, f, i, h: MF.minlstm(x, f, i, h, mode="sequential")[0])}[cell]
        out = []
        for fn in fns:
            leaves = [x.clone().requires_grad_() for x in (*xs, h0)]
            h = fn(*leaves)
            h.backward(torch.ones_like(h))
            out.append([h.detach()] + [x.grad for x in leaves])
        return out

    first_fast, first_ref = run(0)
    kept = [t.clone() for t in first_fast]
    for _ in range(3):
        second_fast, second_ref = run(1)
        for got, want in zip(second_fast, second_ref):
            assert_close_scaled(got, want, 1e-12)
        del second_fast
    for got, want, copy in zip(first_fast, first_ref, kept):
        assert torch.equal(got, copy)
        assert_close_scaled(got, want, 1e-12)


def test_cache_limit_from_the_environment_is_checked(monkeypatch):
    monkeypatch.setenv("MINRNN_CPU_CACHE_MB", "64")
    assert cpu.buffers._default_limit() == 64 << 20
    monkeypatch.setenv("MINRNN_CPU_CACHE_MB", "lots")
    with pytest.raises(ValueError, match="MINRNN_CPU_CACHE_MB"):
        cpu.buffers._default_limit()


def test_peak_memory_counts_cached_outputs():
    """The bench's profiler-based peak must see the cell's outputs even when the cache holds
    blocks it would otherwise hand out again."""
    from minrnn.bench.measure import peak_memory

    B, T, C = 4, 64, 32
    pre = torch.randn(B, T, 2 * C, requires_grad=True)

    def step():
        cpu.cpu_mingru(pre[..., :C], pre[..., C:], None).sum().backward()

    for _ in range(2):  # the cache now holds h and dL/dpre blocks of these sizes
        step()
        pre.grad = None  # before the measured step, as peak_memory asks: a free inside it may count
    assert peak_memory(step) >= B * T * C * 4 + B * T * 2 * C * 4


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_normalized_minlstm_gates_hold_far_below_the_exp_range(dtype):
    """Forget and input pre-activations both far negative (below float32 exp's -87): the
    normalised gates are a ratio of two underflowing sigmoids, which must still come out as
    the reference's sigmoid(log f - log i), forward and backward."""
    gen = torch.Generator().manual_seed(0)
    B, T, C = 2, 9, 8
    x = torch.randn(B, T, C, generator=gen, dtype=torch.float64)
    f = -100.0 - 100.0 * torch.rand(B, T, C, generator=gen, dtype=torch.float64)
    i = -100.0 - 100.0 * torch.rand(B, T, C, generator=gen, dtype=torch.float64)
    f[0, :, :2], i[0, :, :2] = 60.0, -150.0  # and mixed signs, both orders
    f[1, :, :2], i[1, :, :2] = -150.0, 60.0
    h0 = torch.randn(B, C, generator=gen, dtype=torch.float64)
    w = torch.randn(B, T, C, generator=gen, dtype=torch.float64)
    ref = run_with_grads(lambda *a: MF.minlstm(*a[:3], a[3], normalize=True, mode="sequential")[0], (x, f, i, h0), w)
    got = run_with_grads(lambda *a: cpu.cpu_minlstm(*a, True), [t.to(dtype) for t in (x, f, i, h0)], w)
    for name, g, r in zip(["h", "grad hidden", "grad forget", "grad input", "grad h0"], got, ref):
        assert torch.isfinite(g).all(), name
        assert_close_scaled(g, r, 1e-5 if dtype == torch.float32 else 1e-12, name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("one_row", [True, False], ids=["mixed-row", "row-each"])
def test_minlstm_gates_elementwise_on_both_sides_of_the_raw_threshold(dtype, one_row):
    """Every (forget, input) pair of a grid straddling cpu.RAW_BELOW (where the kernels stop
    keeping the exps and keep the pre-activations instead), alone in its row (which then takes
    the loop without lstm_gates) or all in one row (which has raw elements): h and every
    gradient elementwise against the float64 loop, relative, down to the subnormals. Through
    the cell Function and through a layer (identity projection, so pre = x exactly)."""
    ks = torch.tensor([-100.0, -87.0, -75.0, -61.0, -60.5, -59.5, -45.0, -20.0, -1.0, 0.0, 3.0, 30.0], dtype=torch.float64)
    f, i = ks.repeat_interleave(len(ks)), ks.repeat(len(ks))
    n = f.numel()
    shape = (1, 1, n) if one_row else (n, 1, 1)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, generator=gen, dtype=torch.float64).view(shape)
    f, i = f.view(shape), i.view(shape)
    h0 = torch.randn(shape[0], shape[2], generator=gen, dtype=torch.float64)
    w = torch.randn(shape, generator=gen, dtype=torch.float64)
    x, h0, w = (t.to(dtype).double() for t in (x, h0, w))  # the reference sees the same inputs
    ref = run_with_grads(lambda *a: MF.minlstm(*a[:3], a[3], normalize=True, mode="sequential")[0], (x, f, i, h0), w)
    # A gradient is a product of about six factors, each to ~2 ulp (exp32's error is up to
    # 2.5e-7) and rounded again as they are multiplied: ~2e-6 in float32 at worst. And float32's
    # exp stops at exp(-87) ~ 1.6e-38 rather than going subnormal (cpu.exp32), so a value that
    # small may be off by about that much.
    rtol, atol = (4e-6, 1e-36) if dtype == torch.float32 else (1e-13, 1e-300)
    names = ["h", "grad hidden", "grad forget", "grad input", "grad h0"]
    got = run_with_grads(lambda *a: cpu.cpu_minlstm(*a, True), [t.to(dtype) for t in (x, f, i, h0)], w)
    for name, g, r in zip(names, got, ref):
        torch.testing.assert_close(g, r, rtol=rtol, atol=atol, msg=lambda m, name=name: f"cell, {name}: {m}")
    C = shape[2]
    eye = torch.eye(3 * C, dtype=dtype)
    got = run_with_grads(lambda p, h: cpu.cpu_projected_cell(get_cell("minlstm"), p, eye, None, h, (True,)),
                         [torch.cat([x, f, i], -1).to(dtype), h0.to(dtype)], w)
    dpre = got[1].split(C, -1)
    for name, g, r in zip(names, [got[0], *dpre, got[2]], ref):
        torch.testing.assert_close(g, r, rtol=rtol, atol=atol, msg=lambda m, name=name: f"layer, {name}: {m}")


def _fused_ops(t):
    """Names of the autograd nodes that produced ``t`` (one level: the fused Function or not)."""
    return type(t.grad_fn).__name__


@pytest.mark.parametrize("cell", ["mingru", "minlstm"])
def test_layers_take_the_fused_projected_cell_when_they_can(cell):
    cls = minrnn.MinGRU if cell == "mingru" else minrnn.MinLSTM
    layer = cls(6, 5, backend="cpu")
    x = torch.randn(2, 9, 6, requires_grad=True)
    y, _ = layer(x)
    assert _fused_ops(y) == "_ProjectedCellBackward"
    # half precision and autocast go through nn.Linear (the kernels compute float32/64 only)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_auto, _ = layer(x)
    assert _fused_ops(y_auto) != "_ProjectedCellBackward"
    assert_close_scaled(y_auto.float(), y.detach(), 2 ** -6, "autocast")
    # a hooked projection is called as a module, so the hook still applies
    calls = []
    layer.proj[0].register_forward_hook(lambda m, inp, out: calls.append(1) or out * 0.5)
    y_hooked, _ = layer(x)
    assert calls == [1]
    lin = layer.proj[0]
    n = 2 if cell == "mingru" else 3
    pre = (0.5 * torch.nn.functional.linear(x, lin.weight, lin.bias)).chunk(n, -1)
    ref, _ = (MF.mingru(*pre) if cell == "mingru" else MF.minlstm(*pre, normalize=True))
    assert_close_scaled(y_hooked, ref, 1e-6, "hooked")


@pytest.mark.parametrize("cell", ["mingru", "minlstm"])
def test_projected_cell_grads_for_any_subset_of_inputs(cell):
    """Frozen weights, an input that needs no gradient, a non-contiguous x: each gradient that
    is asked for matches F.linear + the reference, and none is made up for the others."""
    n = 2 if cell == "mingru" else 3
    B, T, I, C = 3, 21, 7, 10
    x = torch.randn(B, I, T, dtype=torch.float64).transpose(1, 2)  # non-contiguous
    w, b, h0 = torch.randn(n * C, I, dtype=torch.float64), torch.randn(n * C, dtype=torch.float64), torch.randn(B, C, dtype=torch.float64)
    dy = torch.randn(B, T, C, dtype=torch.float64)

    def grads(fn, wanted):
        leaves = [t.detach().clone().requires_grad_(k in wanted) for k, t in zip("xwbh", (x, w, b, h0))]
        h, _ = fn(*leaves)
        torch.autograd.backward(h, dy)
        return [t.grad for t in leaves]

    def ref(x_, w_, b_, h0_):
        pre = torch.nn.functional.linear(x_, w_, b_).chunk(n, -1)
        return MF.mingru(*pre, h0_, mode="sequential") if cell == "mingru" else MF.minlstm(*pre, h0_, mode="sequential")

    for wanted in ["x", "wb", "h", "xwbh"]:
        got = grads(lambda *t: MF.projected_cell(cell, *t, backend="cpu"), wanted)
        want = grads(ref, wanted)
        for k, g, r in zip("xwbh", got, want):
            if k in wanted:
                assert_close_scaled(g, r, 1e-12, f"{wanted}: d{k}")
            else:
                assert g is None


def test_projected_cell_passes_gradcheck():
    torch.manual_seed(3)
    for cell, n in (("mingru", 2), ("minlstm", 3)):
        x = torch.randn(2, 6, 3, dtype=torch.float64, requires_grad=True)
        w = torch.randn(n * 4, 3, dtype=torch.float64, requires_grad=True)
        b = torch.randn(n * 4, dtype=torch.float64, requires_grad=True)
        h0 = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
        spec = get_cell(cell)
        assert torch.autograd.gradcheck(lambda *t, spec=spec: cpu.cpu_projected_cell(spec, *t, spec.options()), (x, w, b, h0))


@pytest.mark.parametrize("cell", ["mingru", "minlstm"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("C", [1, 19, 128])
def test_layer_backward_in_place_equals_the_separate_buffer_one(cell, dtype, C):
    """A layer's kernels reuse its pre-activations: the forward leaves its exps there, and
    the backward writes dL/dpre over them. That must give bit for bit what recomputing into
    a new buffer gives, also where the exps underflow (float64 past ~745, where the kept
    value is -0.0), at +-0, at subnormals and for minLSTM elements kept raw (below -60)."""
    n = 2 if cell == "mingru" else 3
    B, T = 3, 29
    pre = torch.randn(B, T, n * C, dtype=dtype) * 4
    flat = pre.view(-1)
    special = torch.tensor([0.0, -0.0, 1e-40, -1e-40, 30.0, -30.0, 90.0, -90.0, 800.0, -800.0, 1e5, -1e5], dtype=dtype)
    idx = torch.randperm(flat.numel())[: 4 * special.numel()]
    flat[idx] = special.repeat(4)
    bias = torch.randn(n * C, dtype=dtype)
    h0 = torch.randn(B, C, dtype=dtype)
    dh = torch.randn(B, T, C, dtype=dtype)

    def run(reuse):
        p = pre.clone()
        spec = get_cell(cell)
        h, start = functions._cell_forward(p, bias, h0, spec, spec.options(), keep=reuse)
        kept = not torch.equal(p, pre)
        dpre, dbias, dh0 = functions._cell_backward(p, bias, h, start, dh, spec, spec.options(), in_place=reuse)
        assert (dpre.data_ptr() == p.data_ptr()) == reuse  # in place: dL/dpre written over pre
        return (h, dpre.clone(), dbias, dh0), kept

    (separate, kept_before), (in_place, kept) = run(False), run(True)
    assert not kept_before and kept
    for name, r, k in zip(["h", "dpre", "dbias", "dh0"], separate, in_place):
        assert torch.isfinite(k).all(), name
        assert torch.equal(r, k), f"{name}: max difference {(r - k).abs().max().item():.3e}"


@pytest.mark.parametrize("cell", ["mingru", "minlstm"])
def test_projected_cell_backward_again_with_retain_graph(cell):
    """The first backward writes dL/dpre over the saved pre-activations (minGRU); each later
    one through the same graph recomputes them, and every one gives the reference's grads."""
    cls = minrnn.MinGRU if cell == "mingru" else minrnn.MinLSTM
    layer = cls(6, 5, backend="cpu").double()
    ref_layer = cls(6, 5, backend="sequential").double()
    ref_layer.load_state_dict(layer.state_dict())
    x = torch.randn(2, 11, 6, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(1, 2, 5, dtype=torch.float64, requires_grad=True)
    y, _ = layer(x, h0)
    dys = [torch.randn_like(y) for _ in range(3)]
    y_ref, _ = ref_layer(x, h0)
    for i, dy in enumerate(dys):
        got = torch.autograd.grad(y, [x, h0, *layer.parameters()], dy, retain_graph=i < 2)
        want = torch.autograd.grad(y_ref, [x, h0, *ref_layer.parameters()], dy, retain_graph=True)
        for name, g, r in zip(["x", "h0", "weight", "bias"], got, want):
            assert_close_scaled(g, r, 1e-12, f"backward {i + 1}: d{name}")


def test_profiler_sees_fresh_outputs_not_cached_blocks():
    """While PyTorch's profiler runs, the kernels' outputs are plain allocations it records."""
    from torch.profiler import ProfilerActivity, profile

    a, b = torch.rand(4, 64, 512), torch.randn(4, 64, 512)
    cpu.cpu_scan(a, b)  # a block of this size is now idle in the cache
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        h = cpu.cpu_scan(a, b)
    allocated = [e.nbytes() for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    assert h.numel() * 4 in allocated


SECOND_ORDER_CASES = {
    "scan": lambda x: cpu.cpu_scan(torch.sigmoid(x), x),
    "cell": lambda x: cpu.cpu_mingru(x, x),
    "projected cell": lambda x: cpu.cpu_projected_cell(get_cell("mingru"), x, torch.ones(8, 4), None, None),
    "conv": lambda x: cpu.cpu_causal_conv(x, torch.ones(4, 1, 3), None),
}


@pytest.mark.parametrize("case", sorted(SECOND_ORDER_CASES))
def test_second_derivatives_are_refused_not_wrong(case):
    """The kernels' backward is not itself differentiable: asking for a second derivative raises
    instead of treating the first one as a constant."""
    x = torch.randn(2, 5, 4, requires_grad=True)
    (g,) = torch.autograd.grad(SECOND_ORDER_CASES[case](x).pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError):
        g.sum().backward()
