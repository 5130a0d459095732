"""The cpu backend's fused kernels with document starts (``reset``): the edge cases of the
kernels themselves, beyond tests/ops/test_document_resets.py's random rows. Each result is
held to the loop over the documents (each run alone from zeros, the first from h0)."""

import pytest
import torch
import torch.nn.functional as F

import minrnn.functional as MF
from minrnn.ops import BACKENDS, cpu
from minrnn.ops.cells import get_cell

from ..conftest import assert_close_scaled
from .test_document_resets import per_document

pytestmark = pytest.mark.skipif(not cpu.available(), reason="numba is not installed")
if cpu.available():
    from minrnn.ops.cpu import functions

# (cell, options): minLSTM with and without normalisation takes different gradient formulas
CELLS = [("mingru", {}), ("minlstm", {"normalize": True}), ("minlstm", {"normalize": False})]
TOL = {torch.float64: 1e-12, torch.float32: 2e-6}


def reset_pattern(name: str, B: int, T: int) -> torch.Tensor:
    """(B, T) bool document starts of a named kind; row 1 is always left without any."""
    reset = torch.zeros(B, T, dtype=torch.bool)
    if name == "at t=0":  # h0 is ignored there, and receives no gradient
        reset[0, 0] = True
        reset[2:, 0] = True
    elif name == "consecutive":  # one-token documents back to back
        reset[0, 3:7] = True
        reset[2, [0, 1, T - 2, T - 1]] = True
    elif name == "every position":
        reset[0] = True
        reset[2:] = True
    elif name == "scattered":
        reset[0, [5, 11]] = True
        reset[2, [1, T - 1]] = True
    else:
        raise ValueError(name)
    return reset


def _pre(cell, B, T, C, dtype, seed, wider=0):
    """The cell's pre-activations as the column chunks of one (B, T, n*C + wider) leaf (strided
    inputs, as a layer's Linear gives them), and that leaf."""
    n = get_cell(cell).n_pre
    gen = torch.Generator().manual_seed(seed)
    leaf = (3 * torch.randn(B, T, n * C + wider, generator=gen, dtype=torch.float64)).to(dtype).requires_grad_()
    return leaf, leaf[..., : n * C].chunk(n, -1)


def _grads(h, inputs, weight):
    return torch.autograd.grad((h * weight).sum() + h[:, -1].sum(), inputs)


@pytest.mark.parametrize("cell,options", CELLS, ids=["mingru", "minlstm", "minlstm-unnormalized"])
@pytest.mark.parametrize("pattern,dtype", [("at t=0", torch.float64), ("consecutive", torch.float64),
                                           ("every position", torch.float64), ("scattered", torch.float64),
                                           ("at t=0", torch.float32), ("scattered", torch.float32)], ids=str)
def test_fused_cell_with_resets_equals_documents_alone(cell, options, pattern, dtype):
    """Column slices of a wider tensor, channels split into several work items (B = 3 < two
    per thread), h0 given: h, every gradient and dh0 match the loop over the documents; a row
    whose first document starts at t = 0 gets dh0 = 0 exactly."""
    B, T, C = 3, 19, 37
    leaf, parts = _pre(cell, B, T, C, dtype, seed=len(pattern), wider=5)
    h0 = torch.randn(B, C, dtype=dtype).requires_grad_()
    reset = reset_pattern(pattern, B, T)
    spec = get_cell(cell)
    h, last = MF.run_cell(cell, parts, h0, reset=reset, backend="cpu", **options)
    assert type(h.grad_fn).__name__ == "_CellBackward"  # the fused kernels, not the composed path
    want = per_document(spec, parts, h0, spec.options(**options), None, reset)
    weight = torch.randn(B, T, C, dtype=dtype)
    got_grads = _grads(h, (leaf, h0), weight)
    want_grads = _grads(want, (leaf, h0), weight)
    for name, g, w in zip(["h", "dpre", "dh0"], (h, *got_grads), (want, *want_grads)):
        assert_close_scaled(g.detach(), w.detach(), TOL[dtype], f"{pattern} {name}")
    assert torch.equal(last, h[:, -1])
    starts_at_0 = reset[:, 0]
    assert torch.equal(got_grads[1][starts_at_0], torch.zeros_like(h0[starts_at_0]))
    assert (got_grads[1][~starts_at_0] != 0).all()


@pytest.mark.parametrize("cell,options", CELLS, ids=["mingru", "minlstm", "minlstm-unnormalized"])
def test_no_starts_is_the_same_as_no_resets_bit_for_bit(cell, options):
    """An all-False ``reset`` runs the kernels' reset branch and gives exactly what None gives."""
    leaf, parts = _pre(cell, 2, 23, 70, torch.float32, seed=4)
    h0 = torch.randn(2, 70).requires_grad_()
    w = torch.randn(2, 23, 70)
    none, _ = MF.run_cell(cell, parts, h0, backend="cpu", **options)
    false, _ = MF.run_cell(cell, parts, h0, reset=torch.zeros(2, 23, dtype=torch.bool), backend="cpu", **options)
    assert torch.equal(none, false)
    for g, r in zip(_grads(none, (leaf, h0), w), _grads(false, (leaf, h0), w)):
        assert torch.equal(g, r)


@pytest.mark.parametrize("cell,options", CELLS, ids=["mingru", "minlstm", "minlstm-unnormalized"])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_in_place_backward_with_resets_equals_the_separate_buffer_one(cell, options, with_bias, dtype):
    """The layer's kernels (``keep``: the forward leaves its exps in the pre-activations and
    the backward writes dL/dpre over them) give bit for bit what the separate-buffer kernels
    give, with document starts, and both match the loop over the documents."""
    spec = get_cell(cell)
    opts = spec.options(**options)
    n, B, T, C = spec.n_pre, 3, 17, 21
    pre = torch.randn(B, T, n * C, dtype=dtype) * 3
    bias = torch.randn(n * C, dtype=dtype) if with_bias else None
    h0, dh = torch.randn(B, C, dtype=dtype), torch.randn(B, T, C, dtype=dtype)
    reset = reset_pattern("consecutive", B, T) | reset_pattern("at t=0", B, T)

    def run(keep):
        p = pre.clone()
        h, start = functions._cell_forward(p, bias, h0, spec, opts, keep=keep, reset=reset)
        dpre, dbias, dh0 = functions._cell_backward(p, bias, h, start, dh, spec, opts, in_place=keep, reset=reset)
        return h, dpre.clone(), dbias, dh0

    separate, in_place = run(False), run(True)
    for name, r, k in zip(["h", "dpre", "dbias", "dh0"], separate, in_place):
        assert torch.equal(r, k), f"{name}: max difference {(r - k).abs().max().item():.3e}"
    leaf, h0_ = pre.clone().requires_grad_(), h0.clone().requires_grad_()
    full = leaf if bias is None else leaf + bias
    want = per_document(spec, full.chunk(n, -1), h0_, opts, None, reset)
    want_dpre, want_dh0 = torch.autograd.grad(want, (leaf, h0_), dh)
    for name, got, w in zip(["h", "dpre", "dbias", "dh0"], separate,
                            (want, want_dpre, want_dpre.sum(1), want_dh0)):
        assert_close_scaled(got, w.detach(), TOL[dtype], name)


@pytest.mark.parametrize("cell,options", CELLS, ids=["mingru", "minlstm", "minlstm-unnormalized"])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no-bias"])
def test_projected_cell_with_resets_fused_and_backward_again(cell, options, with_bias):
    """A layer's projection and cell as one Function with document starts: its gradients for x,
    weight, bias and h0 match F.linear + the loop over the documents, also on a second and
    third backward through the same graph (which recompute the consumed pre-activations)."""
    spec = get_cell(cell)
    n, B, T, I, C = spec.n_pre, 3, 15, 6, 9
    gen = torch.Generator().manual_seed(11)
    leaves = [torch.randn(*s, generator=gen, dtype=torch.float64).requires_grad_()
              for s in ((B, T, I), (n * C, I), (n * C,), (B, C))]
    x, w, b, h0 = leaves
    b = b if with_bias else None
    reset = reset_pattern("scattered", B, T) | reset_pattern("at t=0", B, T)
    h, _ = MF.projected_cell(cell, x, w, b, h0, reset=reset, backend="cpu", **options)
    assert type(h.grad_fn).__name__ == "_ProjectedCellBackward"
    want = per_document(spec, F.linear(x, w, b).chunk(n, -1), h0, spec.options(**options), None, reset)
    assert_close_scaled(h.detach(), want.detach(), 1e-12, "h")
    wanted = [t for t in (x, w, b, h0) if t is not None]
    for i in range(3):
        dy = torch.randn(B, T, C, generator=gen, dtype=torch.float64)
        got = torch.autograd.grad(h, wanted, dy, retain_graph=i < 2)
        ref = torch.autograd.grad(want, wanted, dy, retain_graph=True)
        for k, (g, r) in enumerate(zip(got, ref)):
            assert_close_scaled(g, r, 1e-12, f"backward {i + 1}: grad {k}")


@pytest.mark.parametrize("cell", ["mingru", "minlstm"])
def test_resets_run_the_fused_kernels_not_the_composed_path(cell, monkeypatch):
    """backend 'cpu' declares that its fused cells take resets, and run_cell / projected_cell
    hand them over: with the composed path (gates, then the scan) made to fail, both still run."""
    assert BACKENDS["cpu"].cell_resets

    def composed(*args, **kwargs):
        raise AssertionError("the composed path ran")

    monkeypatch.setattr(MF._RecomputeGates, "apply", composed)
    monkeypatch.setattr(MF, "cell_on_pre_activations", composed)
    n = get_cell(cell).n_pre
    reset = reset_pattern("scattered", 3, 16)
    parts = [torch.randn(3, 16, 4, requires_grad=True) for _ in range(n)]
    h, _ = MF.run_cell(cell, parts, reset=reset, backend="cpu")
    assert type(h.grad_fn).__name__ == "_CellBackward"
    h.sum().backward()
    x, w = torch.randn(3, 16, 5, requires_grad=True), torch.randn(n * 4, 5, requires_grad=True)
    h, _ = MF.projected_cell(cell, x, w, reset=reset, backend="cpu")
    assert type(h.grad_fn).__name__ == "_ProjectedCellBackward"
    h.sum().backward()


def test_the_benchmark_times_every_variant_and_puts_the_backend_back(capsys, monkeypatch):
    """benchmarks/cpu_cell_resets.py on tiny sizes, this checkout as its own baseline: a row per
    case with every variant's time (timings are never asserted), and backend "cpu" as it was."""
    from ..scripts import ROOT, load_script

    monkeypatch.delitem(__import__("sys").modules, "minrnn_baseline", raising=False)
    before = BACKENDS["cpu"]
    load_script("benchmarks", "cpu_cell_resets").main(["--shape", "2", "16", "8", "--repeats", "1",
                                                       "--baseline", str(ROOT)])
    assert BACKENDS["cpu"] is before
    # the second copy of the package left this one's custom ops registered as they were
    from torch._library.custom_ops import OPDEFS

    from minrnn.ops import triton as triton_ops
    from minrnn.ops.cpu import library as cpu_ops

    for op in (*cpu_ops.OPS, *triton_ops.OPS):
        assert OPDEFS.get(op._qualname) is op, op._qualname
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[2:]]
    assert [r[:2] for r in rows] == [["cell", "mingru"], ["cell", "minlstm"], ["layer", "mingru"], ["layer", "minlstm"]]
    assert all(len(r) == 2 + 4 + 3 and all(float(v) > 0 for v in r[2:]) for r in rows)
