"""The expanded-state recurrence (minrnn.ops.expanded): the chunkwise form and the scan over the
state's entries held to the per-step loop (values, every gradient, final state, padding,
document starts, odd lengths, float32/float64/bfloat16), and the n = 1 case held to the cells."""

import pytest
import torch

from minrnn.functional import run_cell
from minrnn.ops import BACKENDS, cpu
from minrnn.ops.cells import get_cell
from minrnn.ops.expanded import (
    expanded_gates,
    expanded_scan,
    expanded_scan_chunked,
    expanded_scan_reference,
    expanded_scan_states,
    expanded_step,
    expanded_step_fused,
)

FAST = {
    "chunked4": lambda *a, **kw: expanded_scan_chunked(*a, chunk_size=4, **kw),
    "chunked16": lambda *a, **kw: expanded_scan_chunked(*a, chunk_size=16, **kw),
    "states": expanded_scan_states,
    "states-sequential": lambda *a, **kw: expanded_scan_states(*a, backend="sequential", **kw),
}
TOL = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=1e-5, atol=1e-5),
       torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


def inputs(B=2, T=13, H=3, n=4, d=5, dtype=torch.float64, seed=0, h0=True):
    gen = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    q, k, v = r(B, T, H, n), torch.sigmoid(r(B, T, H, n)), r(B, T, H, d)
    log_a = -torch.nn.functional.softplus(r(B, T, H, n))
    tensors = [x.to(dtype).requires_grad_() for x in (q, k, v, log_a)]
    state = r(B, H, n, d).to(torch.float32 if dtype == torch.bfloat16 else dtype).requires_grad_() if h0 else None
    return tensors, state


def boundaries(B, T, seed=1):
    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand(B, T, generator=gen) > 0.25
    reset = torch.rand(B, T, generator=gen) > 0.7
    reset[0, 0] = True  # a reset at t = 0 ignores h0
    return mask, reset


def outputs_and_grads(fn, tensors, h0, weights_dtype=None, **kw):
    """fn's outputs and the gradients of a fixed random weighting of them; ``weights_dtype``
    rounds the output's weights through that dtype (a reference then weighs as a bf16 run does)."""
    o, h = fn(*tensors, h0, **kw)
    gen = torch.Generator().manual_seed(7)
    wo = torch.randn(o.shape, generator=gen, dtype=torch.float64).to(weights_dtype or o.dtype).to(o.dtype)
    wh = torch.randn(h.shape, generator=gen, dtype=torch.float64).to(h.dtype)
    wanted = tensors + ([h0] if h0 is not None else [])
    grads = torch.autograd.grad((o * wo).float().sum() + (h * wh).float().sum(), wanted)
    return o, h, grads


@pytest.mark.parametrize("method", list(FAST))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("T", [1, 7, 13])
@pytest.mark.parametrize("bounds", ["none", "mask", "reset", "both"])
def test_fast_forms_equal_the_loop(method, dtype, T, bounds):
    tensors, h0 = inputs(T=T, dtype=dtype)
    mask, reset = boundaries(2, T)
    kw = {"none": {}, "mask": dict(mask=mask), "reset": dict(reset=reset), "both": dict(mask=mask, reset=reset)}[bounds]
    o_ref, h_ref, g_ref = outputs_and_grads(expanded_scan_reference, tensors, h0, **kw)
    o, h, grads = outputs_and_grads(FAST[method], tensors, h0, **kw)
    assert o.dtype == dtype and h.dtype == dtype
    torch.testing.assert_close(o, o_ref, **TOL[dtype])
    torch.testing.assert_close(h, h_ref, **TOL[dtype])
    for name, g, g0 in zip(("q", "k", "v", "log_a", "h0"), grads, g_ref):
        torch.testing.assert_close(g, g0, **TOL[dtype], msg=f"gradient of {name}")


@pytest.mark.skipif(not cpu.HAVE_NUMBA, reason="the states method's CPU kernel is numba's")
def test_states_on_the_cpu_backend_run_one_kernel_and_others_the_scan():
    """"states" above runs the compiled kernel ("auto" on the CPU), "states-sequential" the scan."""
    tensors, h0 = inputs(T=5)
    assert type(expanded_scan_states(*tensors, h0)[0].grad_fn).__name__ == "_StatesKernelBackward"
    o, _ = expanded_scan_states(*tensors, h0, backend="sequential")
    assert "StatesKernel" not in type(o.grad_fn).__name__


@pytest.mark.parametrize("method", ["chunked4", "states"])
def test_bfloat16_inputs_keep_a_float32_state(method):
    tensors, h0 = inputs(T=11, dtype=torch.bfloat16)
    exact = [t.detach().double().requires_grad_() for t in tensors]
    o_ref, h_ref, g_ref = outputs_and_grads(expanded_scan_reference, exact, h0.detach().double().requires_grad_(),
                                            weights_dtype=torch.bfloat16)
    o, h, grads = outputs_and_grads(FAST[method], tensors, h0)
    assert o.dtype == torch.bfloat16 and h.dtype == torch.float32
    torch.testing.assert_close(o.double(), o_ref, **TOL[torch.bfloat16])
    torch.testing.assert_close(h.double(), h_ref, **TOL[torch.bfloat16])
    for g, g0 in zip(grads, g_ref):
        torch.testing.assert_close(g.double(), g0, **TOL[torch.bfloat16])


def test_no_gradient_is_lost_to_a_reset_or_a_saturated_decay():
    """-inf decays at document starts and decays near 0 or 1 give finite gradients everywhere."""
    tensors, h0 = inputs(T=9)
    with torch.no_grad():
        tensors[3][:, 2] = -60.0  # a ~ 1e-26
        tensors[3][:, 5] = -1e-12  # a ~ 1
    reset = torch.zeros(2, 9, dtype=torch.bool)
    reset[:, [0, 4]] = True
    for fn in (expanded_scan_chunked, expanded_scan_states):
        _, _, grads = outputs_and_grads(fn, tensors, h0, reset=reset)
        assert all(torch.isfinite(g).all() for g in grads)
        assert torch.count_nonzero(grads[-1]) == 0  # reset at t = 0: h0 is not read


def test_padding_is_the_identity_and_documents_give_what_they_give_alone():
    (q, k, v, log_a), h0 = inputs(B=1, T=10)
    mask = torch.ones(1, 10, dtype=torch.bool)
    mask[0, 3:6] = False
    o, h = expanded_scan_chunked(q, k, v, log_a, h0, mask=mask, chunk_size=4)
    keep = mask[0]
    o2, h2 = expanded_scan_reference(q[:, keep], k[:, keep], v[:, keep], log_a[:, keep], h0)
    torch.testing.assert_close(o[:, keep], o2)
    torch.testing.assert_close(h, h2)
    # two documents packed: the second starts at 6 from a zero state
    reset = torch.zeros(1, 10, dtype=torch.bool)
    reset[0, 6] = True
    o, h = expanded_scan_chunked(q, k, v, log_a, h0, reset=reset, chunk_size=4)
    first, _ = expanded_scan_reference(q[:, :6], k[:, :6], v[:, :6], log_a[:, :6], h0)
    second, h_second = expanded_scan_reference(q[:, 6:], k[:, 6:], v[:, 6:], log_a[:, 6:])
    torch.testing.assert_close(o, torch.cat([first, second], 1))
    torch.testing.assert_close(h, h_second)


def test_state_carried_across_calls_equals_one_call():
    (q, k, v, log_a), h0 = inputs(T=12)
    o, h = expanded_scan(q, k, v, log_a, h0, method="chunked", chunk_size=4)
    o1, h1 = expanded_scan(q[:, :5], k[:, :5], v[:, :5], log_a[:, :5], h0, method="states")
    o2, h2 = expanded_scan(q[:, 5:], k[:, 5:], v[:, 5:], log_a[:, 5:], h1, method="chunked", chunk_size=3)
    torch.testing.assert_close(torch.cat([o1, o2], 1), o)
    torch.testing.assert_close(h2, h)


@pytest.mark.parametrize("cell,n_gates", [("mingru", 1), ("minlstm", 2)])
def test_one_slot_read_with_q_one_is_the_cell(cell, n_gates):
    """n = 1, d = 1 per head and q = 1: the expanded recurrence is the cell's own h."""
    gen = torch.Generator().manual_seed(3)
    pre = tuple(torch.randn(2, 9, 6, generator=gen, dtype=torch.float64) for _ in range(1 + n_gates))
    spec = get_cell(cell)
    log_a, k, v = expanded_gates(spec, pre, spec.options())
    shape = (2, 9, 6, 1)
    o, h = expanded_scan_chunked(torch.ones(shape, dtype=torch.float64), k.view(shape), v.view(shape),
                                 log_a.view(shape), chunk_size=4)
    h_cell, last = run_cell(cell, pre, backend="sequential")
    torch.testing.assert_close(o.view(2, 9, 6), h_cell)
    torch.testing.assert_close(h.view(2, 6), last)


def signed_inputs(B=2, T=13, H=3, n=4, d=5, dtype=torch.float64, seed=0):
    """As ``inputs`` with the decays given as a in (-1, 1), both signs present."""
    tensors, h0 = inputs(B, T, H, n, d, dtype, seed)
    gen = torch.Generator().manual_seed(seed + 11)
    a = torch.tanh(2 * torch.randn(B, T, H, n, generator=gen, dtype=torch.float64)).to(dtype).requires_grad_()
    return tensors[:3] + [a], h0


SIGNED_BACKENDS = ["auto"] + [b for b in ("sequential", "chunked", "triton") if b in BACKENDS and BACKENDS[b].signed
                              and (b != "triton" or torch.cuda.is_available())]


@pytest.mark.parametrize("backend", SIGNED_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("T", [1, 7, 13])
@pytest.mark.parametrize("bounds", ["none", "mask", "reset", "both"])
def test_signed_decays_in_the_states_method_equal_the_loop(backend, dtype, T, bounds):
    """a in (-1, 1) given with a=: the states method ("auto": the CPU kernel; the others the
    scan backends that take negative transitions) against the loop, every gradient included."""
    tensors, h0 = signed_inputs(T=T, dtype=dtype)
    mask, reset = boundaries(2, T)
    kw = {"none": {}, "mask": dict(mask=mask), "reset": dict(reset=reset), "both": dict(mask=mask, reset=reset)}[bounds]

    def as_a(fn, **more):
        return lambda q, k, v, a, h0, **kw: fn(q, k, v, None, h0, a=a, **more, **kw)

    o_ref, h_ref, g_ref = outputs_and_grads(as_a(expanded_scan_reference), tensors, h0, **kw)
    o, h, grads = outputs_and_grads(as_a(expanded_scan, backend=backend), tensors, h0, **kw)
    assert o.dtype == dtype and h.dtype == dtype
    torch.testing.assert_close(o, o_ref, **TOL[dtype])
    torch.testing.assert_close(h, h_ref, **TOL[dtype])
    for name, g, g0 in zip(("q", "k", "v", "a", "h0"), grads, g_ref):
        torch.testing.assert_close(g, g0, **TOL[dtype], msg=f"gradient of {name}")


def test_signed_decays_in_bfloat16_keep_a_float32_state():
    tensors, h0 = signed_inputs(T=11, dtype=torch.bfloat16)
    h0 = h0.detach().float().requires_grad_()
    exact = [t.detach().double().requires_grad_() for t in tensors]

    def states(q, k, v, a, h0, **kw):
        return expanded_scan_states(q, k, v, None, h0, a=a, **kw)

    def loop(q, k, v, a, h0, **kw):
        return expanded_scan_reference(q, k, v, None, h0, a=a, **kw)

    o_ref, h_ref, g_ref = outputs_and_grads(loop, exact, h0.detach().double().requires_grad_(),
                                            weights_dtype=torch.bfloat16)
    o, h, grads = outputs_and_grads(states, tensors, h0)
    assert o.dtype == torch.bfloat16 and h.dtype == torch.float32
    torch.testing.assert_close(o.double(), o_ref, **TOL[torch.bfloat16])
    torch.testing.assert_close(h.double(), h_ref, **TOL[torch.bfloat16])
    for g, g0 in zip(grads, g_ref):
        torch.testing.assert_close(g.double(), g0, **TOL[torch.bfloat16])


def test_signed_decays_are_refused_by_the_chunked_form_and_the_log_backend():
    (q, k, v, a), h0 = signed_inputs(T=5)
    with pytest.raises(ValueError, match="need method='states'"):
        expanded_scan(q, k, v, None, h0, a=a, method="chunked")
    with pytest.raises(ValueError, match="backend='log' works in log space and needs a > 0"):
        expanded_scan(q, k, v, None, h0, a=a, backend="log")


@pytest.mark.parametrize("cell,n_gates", [("mingru_signed", 1), ("minlstm_signed", 2)])
def test_one_slot_read_with_q_one_is_the_signed_cell(cell, n_gates):
    """The signed cells' gates as (a, k, v): n = 1, d = 1 and q = 1 give the cell's own h,
    negative transitions included."""
    gen = torch.Generator().manual_seed(3)
    pre = tuple(torch.randn(2, 9, 6, generator=gen, dtype=torch.float64) for _ in range(1 + n_gates))
    spec = get_cell(cell)
    a, k, v = expanded_gates(spec, pre, spec.options())
    assert bool((a < 0).any()) and bool((a > 0).any()) and bool(((a > -1) & (a < 1)).all())
    shape = (2, 9, 6, 1)
    o, h = expanded_scan_states(torch.ones(shape, dtype=torch.float64), k.view(shape), v.view(shape), None,
                                a=a.view(shape))
    h_cell, last = run_cell(cell, pre, backend="sequential")
    torch.testing.assert_close(o.view(2, 9, 6), h_cell)
    torch.testing.assert_close(h.view(2, 6), last)


def torch_step(spec, pre, h, options, mask, H, n):
    """The mixer's torch step from its projection [hidden | gates | query]: the fused step's reference."""
    B, E = pre.shape[0], pre.shape[1] - spec.n_pre * H * n
    parts = pre.split([E] + [H * n] * spec.n_pre, dim=-1)
    log_a, k, v = expanded_gates(spec, parts[:-1], options)
    q, k, log_a, v = parts[-1].view(B, H, n), k.view(B, H, n), log_a.view(B, H, n), v.view(B, H, E // H)
    if mask is not None:
        k, log_a = k * mask[:, None, None], log_a * mask[:, None, None]
    return expanded_step(q, k, v, log_a, torch.zeros(B, H, n, E // H, dtype=pre.dtype) if h is None else h)


@pytest.mark.skipif(not cpu.HAVE_NUMBA, reason="the fused step is a numba kernel")
@pytest.mark.parametrize("cell,options", [("mingru", ()), ("minlstm", (True,)), ("minlstm", (False,))])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("state", ["zeros", "given", "masked"])
def test_fused_step_equals_the_torch_step(cell, options, dtype, state):
    """Gates, update and read in one kernel: the torch step's output and state, padded rows kept."""
    spec, B, H, n, d = get_cell(cell), 3, 5, 4, 3
    gen = torch.Generator().manual_seed(5)
    pre = (4 * torch.randn(B, H * d + spec.n_pre * H * n, generator=gen, dtype=torch.float64)).to(dtype)
    pre[0, :4] = torch.tensor([-90.0, 90.0, 0.0, -0.0])  # saturated and zero pre-activations
    h = None if state == "zeros" else torch.randn(B, H, n, d, generator=gen, dtype=torch.float64).to(dtype)
    mask = torch.tensor([True, False, True]) if state == "masked" else None
    with torch.no_grad():
        o, h_new = expanded_step_fused(spec, pre, h, options, mask, H, n)
        o_ref, h_ref = torch_step(spec, pre, h, options, mask, H, n)
    assert o.dtype == dtype and h_new.shape == (B, H, n, d)
    torch.testing.assert_close(o, o_ref.reshape(B, H * d), **TOL[dtype])
    torch.testing.assert_close(h_new, h_ref, **TOL[dtype])
    if mask is not None:
        assert torch.equal(h_new[1], h[1])


def test_fused_step_leaves_autograd_half_precision_and_other_cells_to_torch():
    spec, pre = get_cell("mingru"), torch.randn(2, 6 + 2 * 8)
    assert expanded_step_fused(spec, pre.requires_grad_(), None, (), None, 2, 4) is None
    assert expanded_step_fused(spec, pre.detach().bfloat16(), None, (), None, 2, 4) is None
    with torch.no_grad():
        assert expanded_step_fused(get_cell("mingru_signed"), pre, None, (), None, 2, 4) is None


def test_empty_sequence_returns_h0():
    (q, k, v, log_a), h0 = inputs(T=0)
    for fn in (expanded_scan_reference, expanded_scan_chunked, expanded_scan_states):
        o, h = fn(q, k, v, log_a, h0)
        assert o.shape == (2, 0, 3, 5)
        torch.testing.assert_close(h, h0)


def test_bad_arguments_are_named():
    (q, k, v, log_a), h0 = inputs(T=4)
    with pytest.raises(ValueError, match="k must have the shape of q"):
        expanded_scan_chunked(q, k[..., :2], v, log_a)
    with pytest.raises(ValueError, match=r"h0 must be \(batch, heads, n, d\)"):
        expanded_scan_states(q, k, v, log_a, h0[:, :, :2])
    with pytest.raises(ValueError, match="v must be"):
        expanded_scan_reference(q, k, v[:, :2], log_a)
    with pytest.raises(ValueError, match="chunk_size must be a positive integer"):
        expanded_scan_chunked(q, k, v, log_a, chunk_size=0)
    with pytest.raises(ValueError, match="method must be one of"):
        expanded_scan(q, k, v, log_a, method="fast")
    with pytest.raises(TypeError, match="reset must be a bool tensor"):
        expanded_scan(q, k, v, log_a, reset=torch.zeros(2, 4))
    with pytest.raises(TypeError, match="exactly one of log_a .* and a="):
        expanded_scan_states(q, k, v, log_a, a=log_a.exp())
    with pytest.raises(TypeError, match="exactly one of log_a .* and a="):
        expanded_scan_reference(q, k, v, None)
    with pytest.raises(ValueError, match="the chunked form takes log_a"):
        expanded_scan_chunked(q, k, v, None)
    with pytest.raises(ValueError, match="a must have the shape of q"):
        expanded_scan_states(q, k, v, None, a=log_a[..., :2].exp())
