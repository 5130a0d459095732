"""minGRU and minLSTM cells: the equations, and every way of evaluating them agreeing."""

import functools

import pytest
import torch
import torch.nn.functional as F

import minrnn.functional as MF
from minrnn.ops import BACKENDS

from .conftest import FAST_BACKENDS, assert_close_scaled
from .ops.test_scan import assert_rounded_once

CELLS = ["mingru", "minlstm", "minlstm-unnormalized"]
REL = {torch.float32: 1e-5, torch.float64: 1e-10}


def _pre(cell, B, T, C, dtype, seed=0, scale=2.0):
    gen = torch.Generator().manual_seed(seed)
    n = 2 if cell == "mingru" else 3
    return [(scale * torch.randn(B, T, C, generator=gen, dtype=torch.float64)).to(dtype) for _ in range(n)]


def _seq(cell, pre, h0, **kw):
    if cell == "mingru":
        return MF.mingru(*pre, h0, **kw)
    return MF.minlstm(*pre, h0, normalize=(cell == "minlstm"), **kw)


def _step(cell, pre_t, h):
    if cell == "mingru":
        return MF.mingru_step(*pre_t, h)
    return MF.minlstm_step(*pre_t, h, normalize=(cell == "minlstm"))


def _h0(backend, B, C, dtype, seed=1):
    h0 = torch.randn(B, C, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    if not BACKENDS[backend].signed:
        h0 = h0.abs() + 0.1  # a log-space scan holds positive states only
    return h0.to(dtype)


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("backend", ["auto"] + FAST_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("T", [1, 2, 31, 300])
def test_parallel_sequential_step_and_chunked_agree(cell, backend, dtype, T):
    B, C = 3, 5
    pre = _pre(cell, B, T, C, dtype, seed=T)
    h0 = _h0("chunked" if backend == "auto" else backend, B, C, dtype)
    assert (h0 != 0).all()
    h_par, last_par = _seq(cell, pre, h0, backend=backend)
    h_seq, last_seq = _seq(cell, pre, h0, mode="sequential")
    # step by step
    h, steps = h0, []
    for t in range(T):
        h = _step(cell, [p[:, t] for p in pre], h)
        steps.append(h)
    h_step = torch.stack(steps, 1)
    # two halves, the first's final state as the second's start state
    k = T // 2
    if k:
        h_a, last_a = _seq(cell, [p[:, :k] for p in pre], h0, backend=backend)
        h_b, last_b = _seq(cell, [p[:, k:] for p in pre], last_a, backend=backend)
        h_chunk = torch.cat([h_a, h_b], 1)
        assert_close_scaled(h_chunk, h_seq, REL[dtype], "chunked")
        assert_close_scaled(last_b, last_seq, REL[dtype], "chunked final")
    assert_close_scaled(h_par, h_seq, REL[dtype], "parallel")
    assert_close_scaled(h_step, h_seq, REL[dtype], "step")
    assert_close_scaled(last_par, h_seq[:, -1], REL[dtype], "final state")
    assert last_par.shape == (B, C) and h_par.shape == (B, T, C)


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_gradients_match_the_loop(cell, backend):
    B, T, C = 2, 45, 4
    pre = _pre(cell, B, T, C, torch.float64)
    h0 = _h0(backend, B, C, torch.float64)
    w = torch.randn(B, T, C, dtype=torch.float64)

    def grads(**kw):
        leaves = [p.clone().requires_grad_() for p in pre] + [h0.clone().requires_grad_()]
        h, last = _seq(cell, leaves[:-1], leaves[-1], **kw)
        ((h * w).sum() + last.sum()).backward()
        return [x.grad for x in leaves]

    for g, r in zip(grads(backend=backend), grads(mode="sequential")):
        assert_close_scaled(g, r, 1e-10)


def test_mingru_equation_by_hand():
    """h_1 = (1 - z) h0 + z g(h~): h0 is used as it is, never passed through g."""
    hidden = torch.tensor([[[-1.0, 0.0, 2.0]]], dtype=torch.float64)
    gate = torch.tensor([[[0.3, -2.0, 5.0]]], dtype=torch.float64)
    h0 = torch.tensor([[-4.0, 0.25, 7.0]], dtype=torch.float64)
    z = torch.sigmoid(gate[0, 0])
    g = torch.stack([torch.sigmoid(torch.tensor(-1.0, dtype=torch.float64)), torch.tensor(0.5, dtype=torch.float64), torch.tensor(2.5, dtype=torch.float64)])
    want = (1 - z) * h0[0] + z * g
    for backend in ["sequential", "chunked", "auto"]:
        h, last = MF.mingru(hidden, gate, h0, backend=backend)
        torch.testing.assert_close(h[0, 0], want, rtol=1e-14, atol=0)


def test_minlstm_equation_by_hand():
    hidden, forget, inp = (torch.tensor([[[v]]], dtype=torch.float64) for v in (1.5, 0.7, -0.4))
    h0 = torch.tensor([[-2.0]], dtype=torch.float64)
    f, i = torch.sigmoid(forget), torch.sigmoid(inp)
    want_norm = f / (f + i) * h0 + i / (f + i) * (hidden + 0.5)
    want_raw = f * h0 + i * (hidden + 0.5)
    torch.testing.assert_close(MF.minlstm(hidden, forget, inp, h0)[0], want_norm, rtol=1e-14, atol=0)
    torch.testing.assert_close(MF.minlstm(hidden, forget, inp, h0, normalize=False)[0], want_raw, rtol=1e-14, atol=0)


def test_g_and_log_g():
    x = torch.linspace(-60, 60, 2001, dtype=torch.float64)
    g = MF.g(x)
    assert (g > 0).all()
    torch.testing.assert_close(g, torch.where(x >= 0, x + 0.5, torch.sigmoid(x)))
    torch.testing.assert_close(MF.log_g(x), torch.log(g))
    # continuous at 0: both branches give 0.5
    assert MF.g(torch.tensor(0.0)).item() == 0.5 == torch.sigmoid(torch.tensor(0.0)).item()


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_saturated_gates_and_zero_state_give_no_nan(cell, backend):
    """Pre-activations of +-50 and exact zeros in h0: finite forward and backward."""
    B, T, C = 2, 40, 6
    gen = torch.Generator().manual_seed(0)
    pre = [(50.0 * torch.sign(torch.randn(B, T, C, generator=gen))).requires_grad_() for _ in range(2 if cell == "mingru" else 3)]
    h0 = torch.zeros(B, C)
    h0[1] = 0.5
    h0.requires_grad_()
    h, last = _seq(cell, pre, h0, backend=backend)
    (h.sum() + last.sum()).backward()
    for t in [h, last] + [p.grad for p in pre] + [h0.grad]:
        assert torch.isfinite(t).all()
    ref_leaves = [p.detach().double().requires_grad_() for p in pre] + [h0.detach().double().requires_grad_()]
    ref, ref_last = _seq(cell, ref_leaves[:-1], ref_leaves[-1], mode="sequential")
    (ref.sum() + ref_last.sum()).backward()
    assert_close_scaled(h.double(), ref, 1e-5)
    for name, got, leaf in zip(["hidden", "gate 1", "gate 2"][:len(pre)] + ["h0"], [p.grad for p in pre] + [h0.grad],
                               ref_leaves):
        assert_close_scaled(got.double(), leaf.grad, 1e-5, f"grad {name}")


@functools.lru_cache(maxsize=1)
def _long_case():
    """T = 65,536 with gates near 0 and near 1 (|pre-activation| 15..25), and the float64 loop's answer."""
    B, T, C = 1, 65536, 3
    gen = torch.Generator().manual_seed(0)
    sign = torch.where(torch.rand(B, T, C, generator=gen) < 0.5, -1.0, 1.0)
    gate = (sign * (15 + 10 * torch.rand(B, T, C, generator=gen))).double()
    hidden = torch.randn(B, T, C, generator=gen, dtype=torch.float64)
    h0 = torch.rand(B, C, generator=gen, dtype=torch.float64)
    w = torch.randn(B, T, C, generator=gen, dtype=torch.float64)
    inputs = (hidden, gate, h0)
    return inputs, w, _run_long(inputs, w, torch.float64, mode="sequential")


def _run_long(inputs, w, dtype, **kw):
    leaves = [x.detach().to(dtype).clone().requires_grad_() for x in inputs]
    h, _ = MF.mingru(*leaves, **kw)
    (h * w.to(dtype)).sum().backward()
    return [h.detach().double()] + [x.grad.double() for x in leaves]


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_long_sequence_near_saturated_gates_matches_reference(backend):
    inputs, w, ref = _long_case()
    got = _run_long(inputs, w, torch.float32, backend=backend)
    for name, g, r in zip(["h", "grad hidden", "grad gate", "grad h0"], got, ref):
        assert torch.isfinite(g).all(), name
        assert_close_scaled(g, r, 2e-5, name)


def test_log_backend_rejects_negative_state():
    pre = _pre("mingru", 1, 5, 2, torch.float64)
    with pytest.raises(ValueError, match="h0.*chunked"):
        MF.mingru(*pre, -torch.ones(1, 2, dtype=torch.float64), backend="log")


@pytest.mark.parametrize("backend", ["auto"] + FAST_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs_accumulate_in_float32(dtype, backend):
    pre = _pre("mingru", 2, 200, 8, torch.float32)
    h, last = MF.mingru(*(p.to(dtype) for p in pre), backend=backend)
    assert h.dtype == dtype and last.dtype == torch.float32
    ref, ref_last = MF.mingru(*(p.to(dtype).double() for p in pre), mode="sequential")
    assert_close_scaled(last.double(), ref_last, 1e-6)  # state kept in float32
    assert_rounded_once(h, ref)


def test_bad_input():
    x = torch.randn(2, 5, 3)
    with pytest.raises(ValueError, match="mode must be one of"):
        MF.mingru(x, x, mode="fast")
    with pytest.raises(ValueError, match=r"gate must have the shape of hidden"):
        MF.mingru(x, x[:, :4])
    with pytest.raises(ValueError, match=r"h0 must be \(batch, channels\) = \(2, 3\)"):
        MF.mingru(x, x, torch.zeros(3, 3))
    with pytest.raises(TypeError, match="input has dtype torch.float64"):
        MF.minlstm(x, x, x.double())
    with pytest.raises(TypeError, match="gate_t must be a floating-point tensor"):
        MF.mingru_step(x[:, 0], x[:, 0].long())
    with pytest.raises(ValueError, match=r"h must be \(batch, channels\)"):
        MF.mingru_step(x[:, 0], x[:, 0], torch.zeros(2, 4))


# --- a layer: projection + cell (minrnn.functional.projected_cell) ------------------------


def _projected_inputs(cell, B, T, I, C, dtype, bias=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    n = 2 if cell == "mingru" else 3
    x = torch.randn(B, T, I, generator=gen, dtype=torch.float64)
    w = torch.randn(n * C, I, generator=gen, dtype=torch.float64) / I ** 0.5
    b = torch.randn(n * C, generator=gen, dtype=torch.float64) if bias else None
    h0 = torch.randn(B, C, generator=gen, dtype=torch.float64)
    return [None if t is None else t.to(dtype) for t in (x, w, b, h0)]


def _projected_ref(cell, x, w, b, h0):
    """The composition spelled out, in float64, through the step loop."""
    n = 2 if cell == "mingru" else 3
    pre = F.linear(x, w, b).chunk(n, dim=-1)
    return _seq(cell, pre, h0, mode="sequential")


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("backend", ["auto"] + FAST_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("T,B,bias,with_h0", [(1, 3, True, True), (37, 1, True, False), (64, 5, False, True),
                                              (129, 2, True, True)])
def test_projected_cell_is_linear_then_cell(cell, backend, dtype, T, B, bias, with_h0):
    """Value, final state and the gradients of x, weight, bias and h0 against F.linear followed
    by the loop; B = 1 makes the CPU kernels split channels into blocks."""
    C, I = 40, 24
    x, w, b, h0 = _projected_inputs(cell, B, T, I, C, dtype, bias)
    if not BACKENDS[backend].signed if backend != "auto" else False:
        h0 = h0.abs() + 0.1  # a log-space scan holds positive states only
    h0 = h0 if with_h0 else None
    weight = torch.randn(B, T, C, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    normalize = cell == "minlstm"
    name = "mingru" if cell == "mingru" else "minlstm"

    def run(fn, tensors):
        leaves = [None if t is None else t.detach().clone().requires_grad_() for t in tensors]
        h, last = fn(*leaves)
        ((h.double() * weight).sum() + last.double().sum()).backward()
        return [h.double(), last.double()] + [t.grad.double() for t in leaves if t is not None]

    options = {"normalize": normalize} if name == "minlstm" else {}
    got = run(lambda *t: MF.projected_cell(name, *t, backend=backend, **options), (x, w, b, h0))
    want = run(lambda *t: _projected_ref(cell, *t), [None if t is None else t.double() for t in (x, w, b, h0)])
    labels = ["h", "h_last", "dx", "dweight"] + (["dbias"] if bias else []) + (["dh0"] if with_h0 else [])
    for label, g, r in zip(labels, got, want):
        assert_close_scaled(g, r, REL[dtype], f"{label} {backend}")


def test_projected_cell_bad_input():
    x, w, b, h0 = _projected_inputs("mingru", 2, 5, 3, 4, torch.float32)
    cells = r"\['mingru', 'mingru_signed', 'minlstm', 'minlstm_signed'\]"
    with pytest.raises(ValueError, match=rf"cell must be one of {cells}, got 'gru'"):
        MF.projected_cell("gru", x, w, b)
    with pytest.raises(ValueError, match=r"x must be \(batch, time, input_size\)"):
        MF.projected_cell("mingru", x[0], w, b)
    with pytest.raises(ValueError, match=r"weight must be \(2 \* hidden_size, input_size=3\)"):
        MF.projected_cell("mingru", x, w[:, :2], b)
    with pytest.raises(ValueError, match=r"weight must be \(3 \* hidden_size"):
        MF.projected_cell("minlstm", x, w, b)  # 8 rows do not split into 3 chunks
    with pytest.raises(ValueError, match=r"bias must be \(8,\)"):
        MF.projected_cell("mingru", x, w, b[:5])
    with pytest.raises(TypeError, match="weight must be a floating-point tensor"):
        MF.projected_cell("mingru", x, w.long(), b)
    for backend in ["auto"] + FAST_BACKENDS:
        with pytest.raises(ValueError, match=r"h0 must be \(batch, channels\) = \(2, 4\)"):
            MF.projected_cell("mingru", x, w, b, h0[:, :3], backend=backend)
        h, last = MF.projected_cell("mingru", x[:, :0], w, b, h0, backend=backend)
        assert h.shape == (2, 0, 4) and torch.equal(last, h0)
    with pytest.raises(TypeError, match="cell 'mingru' has no option 'normalize'"):
        MF.projected_cell("mingru", x, w, b, normalize=True)


# --- gradients for any subset of inputs, masks, edge cases ---------------------------------


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("wanted", ["hidden", "hidden+h0", "gates", "h0"])
def test_gradients_of_any_subset_of_inputs_match_the_loop(cell, backend, wanted):
    """Only some inputs require grad (minGRU's decay then has no graph when only hidden is
    wanted): each gradient asked for equals the loop's, and the others stay None."""
    B, T, C = 2, 70, 3
    pre = _pre(cell, B, T, C, torch.float64)
    h0 = _h0(backend, B, C, torch.float64)
    w = torch.randn(B, T, C, dtype=torch.float64)
    need = {"hidden": [0], "hidden+h0": [0, "h0"], "gates": list(range(1, len(pre))), "h0": ["h0"]}[wanted]

    def grads(**kw):
        leaves = [p.clone().requires_grad_(i in need) for i, p in enumerate(pre)]
        h_0 = h0.clone().requires_grad_("h0" in need)
        h, last = _seq(cell, leaves, h_0, **kw)
        ((h * w).sum() + last.sum()).backward()
        return [x.grad for x in leaves + [h_0]]

    for got, want in zip(grads(backend=backend), grads(mode="sequential")):
        if want is None:
            assert got is None
        else:
            assert_close_scaled(got, want, 1e-10)


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("backend", ["sequential"] + FAST_BACKENDS)
def test_mask_makes_padding_an_identity_step(cell, backend):
    """With a (B, T) mask, every row equals the cell run over its real positions alone (the
    state passes padded positions unchanged), value, final state and gradients; and the
    step loop with the same mask agrees."""
    B, T, C = 3, 40, 4
    pre = _pre(cell, B, T, C, torch.float64, seed=5)
    h0 = _h0(backend, B, C, torch.float64)
    gen = torch.Generator().manual_seed(2)
    mask = torch.rand(B, T, generator=gen) > 0.3
    mask[0, :5] = False  # left padding
    mask[1, -7:] = False  # right padding
    leaves = [p.clone().requires_grad_() for p in pre]
    h, last = _seq(cell, leaves, h0, mask=mask, backend=backend)
    (h * mask.unsqueeze(-1)).sum().backward()  # the real positions' outputs, as the rows alone have
    for row in range(B):
        real = mask[row]
        row_leaves = [p[row:row + 1].clone().requires_grad_() for p in pre]
        want, want_last = _seq(cell, [p[:, real] for p in row_leaves], h0[row:row + 1], mode="sequential")
        want.sum().backward()
        got = h[row, real]
        assert_close_scaled(got, want[0], 1e-12, f"row {row}")
        assert_close_scaled(last[row], want_last[0], 1e-12, f"row {row} final state")
        # at a padded position the state is the one before it (exactly, but in log space)
        held = torch.cat([h0[row:row + 1], h[row, :-1]])[~real]
        assert_close_scaled(h[row, ~real], held, 0 if BACKENDS[backend].signed else 1e-12, f"row {row} held")
        for p, q in zip(leaves, row_leaves):
            assert_close_scaled(p.grad[row], q.grad[0], 1e-12, f"row {row} grad")
            assert torch.equal(p.grad[row, ~real], torch.zeros_like(p.grad[row, ~real]))
    h_loop, last_loop = _seq(cell, pre, h0, mask=mask, mode="sequential")
    assert_close_scaled(h.detach(), h_loop, 1e-12, "step loop")


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("backend", ["sequential"] + FAST_BACKENDS)
def test_empty_batch_or_sequence(cell, backend):
    for B, T in ((0, 6), (2, 0), (0, 0)):
        pre = [p.requires_grad_() for p in _pre(cell, B, T, 3, torch.float32)]
        h, last = _seq(cell, pre, None, backend=backend)
        assert h.shape == (B, T, 3) and torch.equal(last, torch.zeros(B, 3))
        h0 = torch.rand(B, 3)
        h, last = _seq(cell, pre, h0, backend=backend)
        assert torch.equal(last, h0)
        h.sum().backward()


@pytest.mark.parametrize("backend", ["sequential"] + FAST_BACKENDS)
@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_non_finite_start_state_is_refused_on_every_backend(backend, bad):
    pre = _pre("mingru", 2, 5, 3, torch.float64)
    h0 = torch.ones(2, 3, dtype=torch.float64)
    h0[1, 2] = bad
    with pytest.raises(ValueError, match="h0 must be finite"):
        MF.mingru(*pre, h0, backend=backend)
    x, w, b, _ = _projected_inputs("mingru", 2, 5, 3, 4, torch.float64)
    with pytest.raises(ValueError, match="h0 must be finite"):
        MF.projected_cell("mingru", x, w, b, torch.full((2, 4), bad, dtype=torch.float64), backend=backend)


def test_mask_bad_input():
    pre = _pre("mingru", 2, 5, 3, torch.float32)
    with pytest.raises(TypeError, match=r"mask must be a bool tensor \(batch, time\)"):
        MF.mingru(*pre, mask=torch.ones(2, 5))
    with pytest.raises(ValueError, match=r"mask must be \(batch, time\) = \(2, 5\), got shape \(2, 4\)"):
        MF.mingru(*pre, mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"mask must be \(batch,\) = \(2,\)"):
        MF.mingru_step(pre[0][:, 0], pre[1][:, 0], mask=torch.ones(3, dtype=torch.bool))
