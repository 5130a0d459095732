"""Every scan backend against the sequential reference: forward, grads of a, b, h0."""

import functools
import math

import pytest
import torch

import minrnn
from minrnn.ops import BACKENDS

from ..conftest import FAST_BACKENDS, SIGNED_BACKENDS, TOL, assert_close_scaled, make_scan_inputs, run_with_grads

LENGTHS = [1, 2, 3, 17, 64, 1000, 4097]


@functools.cache
def _reference(T, with_h0, positive):
    a, b, h0 = make_scan_inputs(2, T, 3, positive=positive, seed=T, with_h0=with_h0)
    w = torch.randn(2, T, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ref = run_with_grads(lambda *x: minrnn.scan(*x, backend="sequential"), (a, b, h0), w)
    return (a, b, h0), w, ref


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("T", LENGTHS)
@pytest.mark.parametrize("with_h0", [True, False])
def test_backend_matches_reference(backend, dtype, T, with_h0):
    positive = not BACKENDS[backend].signed
    inputs, w, ref = _reference(T, with_h0, positive)
    inputs = [None if x is None else x.to(dtype) for x in inputs]
    got = run_with_grads(lambda *x: minrnn.scan(*x, backend=backend), inputs, w)
    assert got[0].shape == (2, T, 3)
    for name, g, r in zip(["h", "grad a", "grad b", "grad h0"], got, ref):
        assert_close_scaled(g, r, TOL[dtype], f"{backend} {dtype} T={T} {name}")


@pytest.mark.parametrize("backend", ["sequential"] + FAST_BACKENDS)
@pytest.mark.parametrize("T", [1, 5, 17])
def test_gradcheck(backend, T):
    a, b, h0 = make_scan_inputs(2, T, 3, positive=not BACKENDS[backend].signed, seed=T)
    a = 0.2 + 0.7 * a  # keep the log backend's finite differences away from a = 0
    inputs = tuple(x.clone().requires_grad_() for x in (a, b, h0))
    assert torch.autograd.gradcheck(lambda *x: minrnn.scan(*x, backend=backend), inputs)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_long_sequence_with_saturated_gates(backend):
    """T = 65,536, decays of 1e-9 and 1 - 1e-7 in runs: finite, and equal to the loop."""
    T, C = 65536, 4
    gen = torch.Generator().manual_seed(0)
    near_one = torch.rand(1, T, C, generator=gen) < 0.5
    a = torch.where(near_one, 1 - 1e-7, 1e-9).double()
    b = torch.rand(1, T, C, generator=gen, dtype=torch.float64) + 0.01
    h0 = torch.rand(1, C, generator=gen, dtype=torch.float64)
    w = torch.randn(1, T, C, generator=gen, dtype=torch.float64)
    ref = run_with_grads(lambda *x: minrnn.scan(*x, backend="sequential"), (a, b, h0), w)
    for dtype in (torch.float64, torch.float32):
        got = run_with_grads(lambda *x: minrnn.scan(*x, backend=backend), [x.to(dtype) for x in (a, b, h0)], w)
        for name, g, r in zip(["h", "grad a", "grad b", "grad h0"], got, ref):
            assert torch.isfinite(g).all(), f"{backend} {dtype} {name} not finite"
            assert_close_scaled(g, r, TOL[dtype] * (10 if dtype == torch.float32 else 1), f"{backend} {dtype} {name}")


@pytest.mark.parametrize("backend", SIGNED_BACKENDS)
def test_signed_backends_take_negative_values(backend):
    a, b, h0 = make_scan_inputs(3, 50, 4, positive=False)
    assert (b < 0).any() and (h0 < 0).any()
    assert_close_scaled(minrnn.scan(a, b, h0, backend=backend), minrnn.scan(a, b, h0, backend="sequential"), 1e-12)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs(backend, dtype):
    a, b, h0 = make_scan_inputs(2, 300, 8, dtype=torch.float32, positive=not BACKENDS[backend].signed)
    a_h, b_h, h0_h = a.to(dtype), b.to(dtype), h0.to(dtype)
    h = minrnn.scan(a_h, b_h, h0_h, backend=backend)
    assert h.dtype == dtype
    # the exact answer for the rounded inputs, rounded once at the end
    ref = minrnn.scan(a_h.double(), b_h.double(), h0_h.double(), backend="sequential")
    assert_rounded_once(h, ref)


# Half of a unit in the last place, relative, and the smallest normal's spacing (float16's
# subnormals are spaced 2**-24): a result computed in float32 and rounded once is within
# that of the exact answer, elementwise; one computed in half precision step by step is not.
HALF_ULP = {torch.bfloat16: (2.0 ** -8, 0.0), torch.float16: (2.0 ** -11, 2.0 ** -25)}


def assert_rounded_once(h, ref, msg=""):
    """Every element of half-precision ``h`` is ``ref`` (float64) rounded once: within half an
    ulp of it (plus float32's accumulation error, a thousandth of that)."""
    rel, tiny = HALF_ULP[h.dtype]
    bound = (rel * ref.abs() + tiny) * (1 + 1e-3)
    excess = (h.double() - ref).abs() - bound
    assert (excess <= 0).all(), f"{msg}: {int((excess > 0).sum())} of {h.numel()} elements off by more than half an ulp"


def test_auto_is_a_registered_backend_and_matches():
    a, b, h0 = make_scan_inputs(2, 100, 3)
    assert_close_scaled(minrnn.scan(a, b, h0), minrnn.scan(a, b, h0, backend="sequential"), 1e-12)


# --- the log-input entry point --------------------------------------------------------


def test_log_scan_equals_scan_of_exponentials():
    a, b, h0 = make_scan_inputs(2, 77, 5, positive=True)
    h = minrnn.log_scan(a.log(), b.log(), h0.log())
    assert_close_scaled(h, minrnn.scan(a, b, h0, backend="sequential"), 1e-12)


def test_log_scan_zero_start_state_has_finite_gradients():
    a, b, _ = make_scan_inputs(2, 33, 5, positive=True)
    log_h0 = torch.full((2, 5), -math.inf, dtype=torch.float64, requires_grad=True)
    la, lb = a.log().requires_grad_(), b.log().requires_grad_()
    h = minrnn.log_scan(la, lb, log_h0)
    h.sum().backward()
    assert_close_scaled(h.detach(), minrnn.scan(a, b, backend="sequential"), 1e-12)
    for t in (la.grad, lb.grad, log_h0.grad):
        assert torch.isfinite(t).all()
    assert (log_h0.grad == 0).all()


def test_log_backend_zero_h0_entries_give_finite_gradients():
    a, b, h0 = make_scan_inputs(2, 40, 5, positive=True)
    h0[0, :2] = 0.0
    got = run_with_grads(lambda *x: minrnn.scan(*x, backend="log"), (a, b, h0), torch.ones(2, 40, 5))
    ref = run_with_grads(lambda *x: minrnn.scan(*x, backend="sequential"), (a, b, h0), torch.ones(2, 40, 5))
    for g, r in zip(got, ref):
        assert torch.isfinite(g).all()
        assert_close_scaled(g, r, 1e-12)


@pytest.mark.parametrize("what", ["b", "h0"])
def test_log_backend_rejects_negative_values_and_names_an_alternative(what):
    a, b, h0 = make_scan_inputs(2, 10, 3, positive=True)
    if what == "b":
        b[0, 3, 1] = -0.5
    else:
        h0[1, 0] = -0.5
    with pytest.raises(ValueError, match=f"{what}.*chunked"):
        minrnn.scan(a, b, h0, backend="log")


# --- bad input --------------------------------------------------------------------------


def _ok():
    return make_scan_inputs(2, 7, 3, dtype=torch.float32)


@pytest.mark.parametrize(
    "mutate, exc, pattern",
    [
        (lambda a, b, h0: (a[0], b, h0), ValueError, r"a must be \(batch, time, channels\)"),
        (lambda a, b, h0: (a, b[:, :5], h0), ValueError, r"b must have the shape of a"),
        (lambda a, b, h0: (a, b[..., :2], h0), ValueError, r"b must have the shape of a"),
        (lambda a, b, h0: (a, b, h0[:1]), ValueError, r"h0 must be \(batch, channels\) = \(2, 3\)"),
        (lambda a, b, h0: (a, b, h0[None]), ValueError, r"h0 must be \(batch, channels\)"),
        (lambda a, b, h0: (a, b.double(), h0), TypeError, r"b has dtype torch.float64 but a has torch.float32"),
        (lambda a, b, h0: (a, b, h0.double()), TypeError, r"h0 has dtype torch.float64"),
        (lambda a, b, h0: (a.long(), b.long(), None), TypeError, r"a must be a floating-point tensor"),
        (lambda a, b, h0: (a, b.int(), h0), TypeError, r"b must be a floating-point tensor"),
        (lambda a, b, h0: (a.numpy(), b, h0), TypeError, r"a must be a torch.Tensor"),
        (lambda a, b, h0: (a, b.to("meta"), h0), ValueError, r"b is on meta but a is on cpu"),
        (lambda a, b, h0: (a, b, h0.to("meta")), ValueError, r"h0 is on meta but a is on cpu"),
        (lambda a, b, h0: (a, b, h0.index_fill(0, torch.tensor([1]), float("inf"))), ValueError,
         r"h0 must be finite"),
        (lambda a, b, h0: (a, b, h0.index_fill(0, torch.tensor([0]), float("nan"))), ValueError,
         r"h0 must be finite"),
    ],
)
def test_bad_input_names_the_argument(mutate, exc, pattern):
    with pytest.raises(exc, match=pattern):
        minrnn.scan(*mutate(*_ok()))


def test_unknown_backend():
    with pytest.raises(ValueError, match="unknown backend 'fast'.*chunked"):
        minrnn.scan(*_ok(), backend="fast")


@pytest.mark.parametrize("backend", ["sequential"] + FAST_BACKENDS)
@pytest.mark.parametrize("shape", [(0, 7, 3), (2, 0, 3), (0, 0, 3)])
def test_empty_batch_or_sequence_gives_an_empty_result(backend, shape):
    """B = 0 or T = 0: an empty h on every backend, not an error (and gradients of the right,
    empty shapes)."""
    a = torch.rand(shape, requires_grad=True)
    b = torch.rand(shape, requires_grad=True)
    h0 = torch.rand(shape[0], shape[2], requires_grad=True)
    h = minrnn.scan(a, b, h0, backend=backend)
    assert h.shape == shape
    (h.sum() + h0.sum()).backward()
    assert a.grad is None or a.grad.shape == shape
