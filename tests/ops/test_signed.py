"""The signed cells (transitions in (-1, 1)): their equations, every backend that takes them
held to the sequential reference, the log backend's refusal, and what they are for (parity)."""

import pytest
import torch

import minrnn.functional as MF
from minrnn.ops import BACKENDS, resolve_backend
from minrnn.ops.cells import get_cell
from minrnn.ops.log import log_cell

from ..conftest import SIGNED_BACKENDS, assert_close_scaled, run_with_grads
from .test_scan import assert_rounded_once

# (cell, options): minLSTM signed with and without the normalised gates
CASES = [("mingru_signed", {}), ("minlstm_signed", {"normalize": True}), ("minlstm_signed", {"normalize": False})]
IDS = ["mingru_signed", "minlstm_signed", "minlstm_signed-unnormalized"]
REL = {torch.float32: 2e-5, torch.float64: 1e-11}


def _pre(cell, B, T, C, dtype=torch.float64, seed=0, scale=3.0):
    gen = torch.Generator().manual_seed(seed)
    n = get_cell(cell).n_pre
    return [(scale * torch.randn(B, T, C, generator=gen, dtype=torch.float64)).to(dtype) for _ in range(n)]


def test_signed_gates_are_the_unsigned_ones_with_a_mapped_to_2a_minus_1():
    hidden, gate, inp = _pre("minlstm_signed", 2, 50, 4, scale=4.0)
    a, b = get_cell("mingru_signed").gates(hidden, gate)
    z = torch.sigmoid(gate)
    torch.testing.assert_close(a, 1 - 2 * z, rtol=0, atol=1e-15)
    torch.testing.assert_close(b, z * MF.g(hidden), rtol=1e-14, atol=0)
    for normalize in (True, False):
        a, b = get_cell("minlstm_signed").gates(hidden, gate, inp, normalize)
        a0, b0 = MF.minlstm_gates(hidden, gate, inp, normalize)
        torch.testing.assert_close(a, 2 * a0 - 1, rtol=0, atol=1e-15)
        torch.testing.assert_close(b, b0, rtol=0, atol=0)
    assert (a < 0).any() and (a > 0).any() and (a.abs() < 1).all()


@pytest.mark.parametrize("cell,options", CASES, ids=IDS)
def test_saturated_transitions_reach_plus_and_minus_one_with_nonzero_gradients(cell, options):
    """Pre-activations of +-40: a within 1e-16 of +-1 in float64, and its gradient tiny but not
    zero (tanh's 1 - tanh^2 would round it to exactly 0)."""
    spec = get_cell(cell)
    pre = [torch.zeros(2, dtype=torch.float64) for _ in range(spec.n_pre)]
    pre[1] = torch.tensor([40.0, -40.0], dtype=torch.float64, requires_grad=True)  # the decay slot
    if spec.n_pre == 3:
        pre[2] = torch.tensor([-40.0, 40.0], dtype=torch.float64)
    a, _ = spec.gates(*pre, *spec.options(**options))
    remember = spec.decay_bias_sign * pre[1].detach() > 0
    torch.testing.assert_close(a, torch.where(remember, 1.0, -1.0).double(), rtol=0, atol=1e-16)
    a.sum().backward()
    assert (pre[1].grad != 0).all() and torch.isfinite(pre[1].grad).all()


def _h0(B, C, dtype, seed=1):
    return torch.randn(B, C, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


@pytest.mark.parametrize("cell,options", CASES, ids=IDS)
@pytest.mark.parametrize("backend", ["auto"] + SIGNED_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("T", [1, 2, 31, 65, 300])
def test_every_signed_backend_matches_the_reference(cell, options, backend, dtype, T):
    """h, the final state and the gradients of every pre-activation and of h0 against the
    float64 loop on the same (rounded) inputs; odd lengths cross the chunk boundaries."""
    B, C = 3, 5
    pre = _pre(cell, B, T, C, dtype, seed=T)
    h0 = _h0(B, C, dtype)
    w = torch.randn(B, T + 1, C, generator=torch.Generator().manual_seed(2), dtype=torch.float64)

    def run(*leaves, **kw):
        h, last = MF.run_cell(cell, leaves[:-1], leaves[-1], **options, **kw)
        assert last.dtype == h.dtype and last.shape == (B, C)
        return torch.cat([h, last.unsqueeze(1)], 1)  # the loss reads the final state too

    got = run_with_grads(lambda *x: run(*x, backend=backend), (*pre, h0), w)
    ref = run_with_grads(lambda *x: run(*x, mode="sequential"), [x.double() for x in (*pre, h0)], w)
    names = ["h"] + [f"grad {n}" for n in get_cell(cell).pre_names] + ["grad h0"]
    for name, g, r in zip(names, got, ref):
        assert torch.isfinite(g).all(), name
        assert_close_scaled(g, r, REL[dtype], f"{backend} {name}")


@pytest.mark.parametrize("cell,options", CASES, ids=IDS)
@pytest.mark.parametrize("backend", ["auto"] + SIGNED_BACKENDS)
def test_final_state_carries_across_calls_and_steps_equal_the_sequence(cell, options, backend):
    B, T, C = 2, 77, 4
    pre = _pre(cell, B, T, C, seed=3)
    h0 = _h0(B, C, torch.float64)
    h_seq, last_seq = MF.run_cell(cell, pre, h0, mode="sequential", **options)
    k = 40
    h_a, last_a = MF.run_cell(cell, [p[:, :k] for p in pre], h0, backend=backend, **options)
    h_b, last_b = MF.run_cell(cell, [p[:, k:] for p in pre], last_a, backend=backend, **options)
    assert_close_scaled(torch.cat([h_a, h_b], 1), h_seq, 1e-12, "two calls")
    assert_close_scaled(last_b, last_seq, 1e-12, "final state")
    h, steps = h0, []
    for t in range(T):
        h = MF.cell_step(cell, [p[:, t] for p in pre], h, **options)
        steps.append(h)
    assert_close_scaled(torch.stack(steps, 1), h_seq, 1e-12, "steps")


@pytest.mark.parametrize("cell,options", CASES, ids=IDS)
@pytest.mark.parametrize("backend", ["auto"] + SIGNED_BACKENDS)
def test_projected_cell_and_padding_mask_match_the_reference(cell, options, backend):
    """The layer's entry point (projection + cell; the cpu backend's fused projection knows
    only the unsigned cells, so this is its composed path) and a padding mask (identity steps)."""
    spec = get_cell(cell)
    B, T, I, C = 3, 33, 6, 4
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(B, T, I, generator=gen, dtype=torch.float64)
    weight = torch.randn(spec.n_pre * C, I, generator=gen, dtype=torch.float64)
    bias = torch.randn(spec.n_pre * C, generator=gen, dtype=torch.float64)
    h0 = _h0(B, C, torch.float64)
    w = torch.randn(B, T, C, generator=gen, dtype=torch.float64)
    mask = torch.rand(B, T, generator=gen) > 0.3

    def composed(x, weight, bias, h0, mask=None, **kw):
        pre = torch.nn.functional.linear(x, weight, bias).chunk(spec.n_pre, -1)
        return MF.run_cell(cell, pre, h0, mask=mask, **options, **kw)[0]

    ref = run_with_grads(lambda *a: composed(*a, mode="sequential"), (x, weight, bias, h0), w)
    got = run_with_grads(lambda *a: MF.projected_cell(cell, *a, backend=backend, **options)[0], (x, weight, bias, h0), w)
    for name, g, r in zip(["h", "grad x", "grad weight", "grad bias", "grad h0"], got, ref):
        assert_close_scaled(g, r, 1e-12, f"projected {name}")
    ref = run_with_grads(lambda *a: composed(*a, mask=mask, mode="sequential"), (x, weight, bias, h0), w)
    got = run_with_grads(lambda *a: MF.projected_cell(cell, *a, mask=mask, backend=backend, **options)[0],
                         (x, weight, bias, h0), w)
    for name, g, r in zip(["h", "grad x", "grad weight", "grad bias", "grad h0"], got, ref):
        assert_close_scaled(g, r, 1e-12, f"masked {name}")
    # a padded step is the identity: the state before it passes unchanged
    h = got[0]
    for i in range(B):
        for t in range(1, T):
            if not mask[i, t]:
                torch.testing.assert_close(h[i, t], h[i, t - 1], rtol=0, atol=0)


@pytest.mark.parametrize("cell,options", CASES, ids=IDS)
@pytest.mark.parametrize("backend", ["auto"] + SIGNED_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_accumulates_in_float32_and_rounds_once(cell, options, backend, dtype):
    pre = [p.to(dtype) for p in _pre(cell, 2, 200, 8, torch.float32, seed=5, scale=2.0)]
    h, last = MF.run_cell(cell, pre, backend=backend, **options)
    assert h.dtype == dtype and last.dtype == torch.float32
    ref, ref_last = MF.run_cell(cell, [p.double() for p in pre], mode="sequential", **options)
    assert_close_scaled(last.double(), ref_last, 1e-6, "final state")  # kept in float32
    # A signed transition lets h cancel to near zero, where float32's accumulation error
    # (absolute, ~1e-7 of the scale) exceeds half an ulp of h: so h is the float32 result,
    # rounded once, exactly, and that float32 result is held to the loop above
    h32, _ = MF.run_cell(cell, [p.float() for p in pre], backend=backend, **options)
    assert torch.equal(h, h32.to(dtype))
    assert_close_scaled(h32.double(), ref, REL[torch.float32], "float32 h")
    unsigned_like = ref.abs() > 1e-2  # far from zero, the unsigned cells' bound holds too
    assert_rounded_once(h[unsigned_like], ref[unsigned_like], "h")


@pytest.mark.parametrize("cell", ["mingru_signed", "minlstm_signed"])
def test_log_backend_refuses_with_one_line_naming_the_cell_and_the_backends_that_take_it(cell):
    spec = get_cell(cell)
    pre = _pre(cell, 1, 5, 2)
    takers = sorted(name for name, be in BACKENDS.items() if be.signed)
    for call in (lambda: MF.run_cell(cell, pre, backend="log"),
                 lambda: MF.projected_cell(cell, torch.randn(1, 5, 3, dtype=torch.float64),
                                           torch.randn(spec.n_pre * 2, 3, dtype=torch.float64), backend="log"),
                 lambda: log_cell(spec, pre, None, spec.options(), None)):
        with pytest.raises(ValueError) as err:
            call()
        message = str(err.value)
        assert "\n" not in message and repr(cell) in message and "'log'" in message
        assert all(repr(name) in message for name in ["auto", *takers]) and "'log'," not in message
    assert "log" not in takers and "chunked" in takers


def test_auto_picks_a_backend_that_takes_signed_transitions():
    assert resolve_backend("auto", torch.device("cpu")).signed
    assert all(be.signed for be in BACKENDS.values() if be.auto_rank is not None)


def test_unsigned_cells_still_run_on_the_log_backend():
    pre = _pre("mingru", 1, 9, 2)
    h, _ = MF.mingru(*pre, backend="log")
    assert_close_scaled(h, MF.mingru(*pre, mode="sequential")[0], 1e-12)


def _parity_weights(cell, bits):
    """Pre-activations that make the signed cell count 1s modulo 2: a 1 flips (a = -1, b = g),
    a 0 keeps (a = +1, b = 0); h is then 0 after an even number of 1s and g after an odd one."""
    big = 30.0
    s = 2.0 * bits.double() - 1  # +1 for a 1, -1 for a 0
    hidden = torch.full_like(s, 0.5)  # g(0.5) = 1
    if cell == "mingru_signed":
        return [hidden, big * s]  # z -> 1 on a 1: a = 1 - 2z -> -1, b = z g -> g
    return [hidden, -big * s, big * s]  # f' -> 0, i' -> 1 on a 1


@pytest.mark.parametrize("cell", ["mingru_signed", "minlstm_signed"])
@pytest.mark.parametrize("backend", ["auto"] + SIGNED_BACKENDS)
def test_signed_cell_computes_parity_over_256_steps(cell, backend):
    """What the sign is for: a hand-set signed cell tracks parity exactly at length 256, the
    longest test length of the Chomsky tasks; its unsigned counterpart cannot flip a sign."""
    gen = torch.Generator().manual_seed(6)
    bits = torch.randint(0, 2, (8, 256, 1), generator=gen)
    h, _ = MF.run_cell(cell, _parity_weights(cell, bits), backend=backend)
    parity = bits.cumsum(1) % 2
    torch.testing.assert_close(h, parity.double() * 1.0, rtol=0, atol=1e-9)
    unsigned = cell.removesuffix("_signed")
    h_unsigned, _ = MF.run_cell(unsigned, _parity_weights(cell, bits), backend=backend)
    assert ((h_unsigned > 0.5) != parity.bool()).any()


def test_functional_signed_flags_pick_the_signed_cells():
    hidden, gate, inp = _pre("minlstm_signed", 2, 7, 3)
    h, _ = MF.mingru(hidden, gate, signed=True)
    torch.testing.assert_close(h, MF.run_cell("mingru_signed", (hidden, gate))[0])
    h, _ = MF.minlstm(hidden, gate, inp, normalize=False, signed=True)
    torch.testing.assert_close(h, MF.run_cell("minlstm_signed", (hidden, gate, inp), normalize=False)[0])
    torch.testing.assert_close(MF.mingru_step(hidden[:, 0], gate[:, 0], signed=True), h_first("mingru_signed", hidden, gate))
    torch.testing.assert_close(MF.minlstm_step(hidden[:, 0], gate[:, 0], inp[:, 0], signed=True),
                               h_first("minlstm_signed", hidden, gate, inp))
    with pytest.raises(TypeError, match="signed must be True or False"):
        MF.mingru(hidden, gate, signed=1)


def h_first(cell, *pre):
    return MF.run_cell(cell, [p[:, :1] for p in pre], mode="sequential")[0][:, 0]
