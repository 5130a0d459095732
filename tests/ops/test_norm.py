"""RMSNorm (ops/norm.py): the numba kernels against the reference and the formula in float64,
the dispatch, and the errors."""

import pytest
import torch

from minrnn.ops import cpu
from minrnn.ops.norm import rms_norm, rms_norm_reference

from ..conftest import assert_close_scaled, run_with_grads

needs_numba = pytest.mark.skipif(not cpu.available(), reason="numba is not installed")


def make(shape, seed=0, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).float()
    w = (torch.randn(shape[-1], generator=gen, dtype=torch.float64) * 0.5 + 1).float()
    out_weight = torch.randn(*shape, generator=gen, dtype=torch.float64)
    return (x, w), out_weight


def formula(x, w, eps=1e-6):
    """y = w x / sqrt(mean(x^2) + eps), written out."""
    return w * x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps)


def test_reference_is_the_formula():
    (x, w), _ = make((2, 3, 5))
    torch.testing.assert_close(rms_norm_reference(x, w, 1e-6), formula(x.double(), w.double()).float(),
                               rtol=1e-6, atol=1e-6)


SHAPES = [(1, 1, 5), (3, 7, 119), (12, 64, 119), (2, 5, 1), (4, 33), (1, 1000, 17), (2, 3, 4, 9)]


@needs_numba
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("scale", [1.0, 1e3, 1e-3])
def test_cpu_kernel_matches_the_formula_and_the_reference(shape, scale):
    """Output and both gradients; odd widths, a width of 1, 2-D and 4-D inputs, one row and many
    (split into work items), rows so small that eps matters."""
    inputs, wout = make(shape, seed=len(shape) + shape[-1], scale=scale)
    got = run_with_grads(lambda x, w: rms_norm(x, w, 1e-6, backend="cpu"), inputs, wout)
    exact = run_with_grads(lambda x, w: formula(x, w), [v.double() for v in inputs], wout)
    ref = run_with_grads(lambda x, w: rms_norm_reference(x, w, 1e-6), inputs, wout)
    # dL/dx is a difference of two terms of size |w g r|, which cancel when D is 1: its error
    # is measured against them, for the kernel and the reference alike
    x, w = (v.double() for v in inputs)
    terms = (w * wout / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-6)).abs().max()
    for name, g, e, r in zip(["y", "dx", "dweight"], got, exact, ref):
        assert g.shape == e.shape, name
        scale = max(e.abs().max(), terms) if name == "dx" else e.abs().max()
        for what, value, rtol in (("the formula", g, 2e-6), ("the reference", r, 4e-6)):
            err = (value - e).abs().max()
            assert err <= rtol * scale, f"{name} vs {what}: max error {err:.3e} > {rtol:.1e} * {scale:.3e}"
        # the kernel no further from the formula than the reference, within rounding
        assert (g - e).abs().max() <= (r - e).abs().max() + 1e-7 * scale, name


@needs_numba
@pytest.mark.parametrize("shape", [(1, 1, 384), (32, 1, 384), (4, 300, 119)])
def test_without_a_gradient_the_output_is_the_same(shape):
    """No gradient to record (decoding): the forward alone, through the step kernel for a few rows
    and the parallel one for many, equal to the differentiable path's output."""
    (x, w), _ = make(shape, seed=shape[0])
    want = rms_norm(x.clone().requires_grad_(), w, 1e-6).detach()
    with torch.no_grad():
        got = rms_norm(x, w, 1e-6, backend="cpu")
    assert got.grad_fn is None
    torch.testing.assert_close(got, want, rtol=2e-7, atol=2e-7)
    # and without no_grad, when neither input asks for a gradient
    torch.testing.assert_close(rms_norm(x, w, 1e-6), want, rtol=2e-7, atol=2e-7)


@needs_numba
def test_cpu_kernel_reads_a_non_contiguous_input():
    (x, w), wout = make((5, 9, 12))
    xt = x.transpose(0, 1)  # (9, 5, 12), not contiguous
    got = run_with_grads(lambda x, w: rms_norm(x, w, 1e-6, backend="cpu"), [xt, w], wout.transpose(0, 1))
    want = run_with_grads(lambda x, w: formula(x, w), [xt.double(), w.double()], wout.transpose(0, 1))
    for g, e in zip(got, want):
        assert_close_scaled(g, e, 2e-6)


@needs_numba
def test_auto_takes_the_kernel_for_float32_cpu_only():
    (x, w), _ = make((2, 3, 8))
    x.requires_grad_()
    assert type(rms_norm(x, w).grad_fn).__name__ == "_RMSNormBackward"
    for dtype in (torch.float64, torch.bfloat16):
        xd, wd = x.detach().to(dtype).requires_grad_(), w.to(dtype)
        y = rms_norm(xd, wd)
        assert type(y.grad_fn).__name__ != "_RMSNormBackward"
        assert torch.equal(y, rms_norm_reference(xd, wd, 1e-6))
    # a float32 weight beside a half-precision x: the reference's type promotion, float32 out
    assert rms_norm(x.detach().bfloat16(), w).dtype == torch.float32


@needs_numba
def test_a_second_derivative_is_refused_not_wrong():
    (x, w), _ = make((2, 3, 8))
    x.requires_grad_()
    (g,) = torch.autograd.grad(rms_norm(x, w).pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError):
        g.sum().backward()


def test_empty_input_gives_an_empty_output():
    x = torch.zeros(0, 4, 8, requires_grad=True)
    y = rms_norm(x, torch.ones(8))
    assert y.shape == (0, 4, 8)
    y.sum().backward()


@pytest.mark.parametrize("kwargs,exc,text", [
    (dict(weight=torch.ones(7)), ValueError, "weight must be (D,)"),
    (dict(weight=torch.ones(8, 1)), ValueError, "weight must be (D,)"),
    (dict(eps=0.0), ValueError, "eps must be a positive number"),
    (dict(eps="1e-6"), ValueError, "eps must be a positive number"),
    (dict(backend="gpu"), ValueError, "unknown norm backend 'gpu'; expected 'auto' or one of"),
    (dict(backend="log"), ValueError, "backend 'log' has no norm"),
    (dict(x=torch.ones(2, 8, dtype=torch.long)), TypeError, "x must be a floating-point tensor"),
    (dict(x=[1.0] * 8), TypeError, "x must be a torch.Tensor"),
])
def test_errors_name_the_argument(kwargs, exc, text):
    args = dict(x=torch.randn(2, 8), weight=torch.ones(8), eps=1e-6)
    args.update(kwargs)
    with pytest.raises(exc, match=text.replace("(", r"\(").replace(")", r"\)")):
        rms_norm(**args)


@needs_numba
def test_cpu_backend_refuses_what_it_does_not_compute():
    with pytest.raises(ValueError, match="norm backend 'cpu' takes torch.float32 tensors, got torch.float64"):
        rms_norm(torch.randn(2, 8, dtype=torch.float64), torch.ones(8, dtype=torch.float64), backend="cpu")
    with pytest.raises(ValueError, match="got torch.bfloat16, torch.float32"):
        rms_norm(torch.randn(2, 8, dtype=torch.bfloat16), torch.ones(8), backend="cpu")


@pytest.mark.parametrize("backend", ["sequential", "chunked"])
def test_the_torch_backends_run_the_reference(backend):
    (x, w), _ = make((2, 3, 8))
    assert torch.equal(rms_norm(x, w, 1e-6, backend=backend), rms_norm_reference(x, w, 1e-6))
