"""The causal depthwise conv (ops/conv.py): the numba kernel against torch's conv1d, the
dispatch, and the errors."""

import dataclasses

import pytest
import torch

from minrnn import ops
from minrnn.ops import cpu
from minrnn.ops.conv import causal_conv, causal_conv_reference

from ..conftest import assert_close_scaled, run_with_grads

needs_numba = pytest.mark.skipif(not cpu.available(), reason="numba is not installed")


def make(B, T, C, K, dtype, seed=0, bias=True):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, C, generator=gen, dtype=torch.float64).to(dtype)
    w = torch.randn(C, 1, K, generator=gen, dtype=torch.float64).to(dtype)
    b = torch.randn(C, generator=gen, dtype=torch.float64).to(dtype) if bias else None
    out_weight = torch.randn(B, T, C, generator=gen, dtype=torch.float64)
    return (x, w, b), out_weight


def test_reference_is_the_causal_formula():
    """The reference itself, against y_t = bias + sum_j w_j x_{t-K+1+j} written out."""
    (x, w, b), _ = make(2, 9, 3, 4, torch.float64)
    y = causal_conv_reference(x, w, b)
    for t in range(9):
        want = b.clone()
        for j in range(4):
            s = t - 3 + j
            if s >= 0:
                want = want + w[:, 0, j] * x[:, s]
        torch.testing.assert_close(y[:, t], want.expand(2, 3), rtol=0, atol=1e-12)


@needs_numba
@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-12), (torch.float32, 2e-6)])
@pytest.mark.parametrize("B,T,C,K", [(1, 1, 5, 4), (3, 2, 9, 4), (2, 3, 7, 4), (1, 300, 8, 3), (12, 64, 119, 4),
                                     (5, 37, 16, 1), (4, 17, 33, 7)])
@pytest.mark.parametrize("bias", [True, False])
def test_cpu_kernel_matches_the_reference(B, T, C, K, dtype, rtol, bias):
    """Output and every gradient (x, weight, bias); T below, at and above K, a single row
    (split along time into several work items) and many rows."""
    inputs, wout = make(B, T, C, K, dtype, seed=B * T + C, bias=bias)
    got = run_with_grads(lambda *a: causal_conv(*a, backend="cpu"), inputs, wout)
    exact = run_with_grads(causal_conv_reference, [None if v is None else v.double() for v in inputs], wout)
    assert len(got) == len(exact) == (4 if bias else 3)
    for name, g, r in zip(["y", "dx", "dweight", "dbias"], got, exact):
        assert g.shape == r.shape, name
        assert_close_scaled(g, r, rtol, msg=name)


@needs_numba
def test_cpu_kernel_gradcheck():
    (x, w, b), _ = make(2, 6, 3, 4, torch.float64)
    leaves = [v.requires_grad_() for v in (x, w, b)]
    assert torch.autograd.gradcheck(lambda *a: causal_conv(*a, backend="cpu"), leaves)


@needs_numba
def test_cpu_kernel_takes_strided_input_and_2d_weight():
    (x, w, b), _ = make(3, 11, 6, 4, torch.float32)
    x_strided = x.transpose(1, 2).contiguous().transpose(1, 2)
    y = causal_conv(x_strided, w.reshape(6, 4), b, backend="cpu")
    torch.testing.assert_close(y, causal_conv_reference(x, w, b), rtol=1e-6, atol=1e-6)


@needs_numba
def test_time_split_covers_every_step():
    """The work items of one row cover each time step once, whatever T and thread count."""
    import numba

    for B in (1, 2, 3, 8):
        for T in (1, 2, 5, 64, 1001):
            span = cpu.conv.time_span(B, T)
            assert 1 <= span <= T
            assert -(-T // span) * span >= T
            if B < 2 * numba.get_num_threads() and T > 1:
                assert span < T  # a short batch is split along time


def test_auto_takes_the_kernel_on_cpu_and_the_reference_elsewhere(monkeypatch):
    calls = []
    registered = ops.BACKENDS["cpu"]
    spy = dataclasses.replace(registered, conv=lambda *a: calls.append(a) or causal_conv_reference(*a),
                              available=lambda: True)
    monkeypatch.setitem(ops.BACKENDS, "cpu", spy)
    (x, w, b), _ = make(2, 5, 3, 4, torch.float32)
    causal_conv(x, w, b)
    assert len(calls) == 1
    causal_conv(x.half(), w.half(), b.half())  # not a kernel dtype: the reference
    causal_conv(x, w, b, backend="sequential")
    causal_conv(x, w, b, backend="chunked")
    assert len(calls) == 1
    # no numba: the reference, after one warning that the kernels are missing
    monkeypatch.setitem(ops.BACKENDS, "cpu", dataclasses.replace(spy, available=lambda: False))
    monkeypatch.setattr(ops.registry, "_SKIPPED_FOR_AUTO", set())
    with pytest.warns(RuntimeWarning, match="backend 'cpu' is not available"):
        causal_conv(x, w, b)
    assert len(calls) == 1
    with pytest.raises(RuntimeError, match="conv backend 'cpu' is not available here.*numba"):
        causal_conv(x, w, b, backend="cpu")


@needs_numba
def test_cpu_backend_refuses_what_it_cannot_compute():
    (x, w, b), _ = make(2, 5, 3, 4, torch.float32)
    with pytest.raises(ValueError, match="conv backend 'cpu' takes torch.float32/torch.float64 tensors, got torch.bfloat16"):
        causal_conv(x.bfloat16(), w.bfloat16(), b.bfloat16(), backend="cpu")


@pytest.mark.parametrize("args,match,exc", [
    (dict(x=torch.zeros(2, 5)), r"x must be \(batch, time, channels\)", ValueError),
    (dict(weight=torch.zeros(4, 1, 4)), r"weight must be \(channels, 1, K\).*channels = 3", ValueError),
    (dict(weight=torch.zeros(3, 2, 4)), r"weight must be \(channels, 1, K\)", ValueError),
    (dict(bias=torch.zeros(4)), r"bias must be \(channels,\) = \(3,\)", ValueError),
    (dict(weight=torch.zeros(3, 1, 4, dtype=torch.float64)), "weight has dtype torch.float64 but x has torch.float32", TypeError),
    (dict(x=torch.zeros(2, 5, 3, dtype=torch.long)), "x must be a floating-point tensor", TypeError),
    (dict(bias=[0.0, 0.0, 0.0]), "bias must be a torch.Tensor, got list", TypeError),
    (dict(backend="fast"), "unknown conv backend 'fast'", ValueError),
])
def test_errors_name_the_argument(args, match, exc):
    kw = dict(x=torch.zeros(2, 5, 3), weight=torch.zeros(3, 1, 4), bias=torch.zeros(3), backend="auto")
    kw.update(args)
    with pytest.raises(exc, match=match):
        causal_conv(kw["x"], kw["weight"], kw["bias"], backend=kw["backend"])



@pytest.mark.parametrize("backend", ["auto", "sequential", "chunked"] + (["cpu"] if cpu.available() else []))
@pytest.mark.parametrize("shape", [(0, 5, 3), (2, 0, 3)])
def test_empty_batch_or_sequence_gives_an_empty_output(backend, shape):
    x = torch.zeros(shape, requires_grad=True)
    w = torch.randn(3, 1, 4, requires_grad=True)
    y = causal_conv(x, w, torch.zeros(3), backend=backend)
    assert y.shape == shape
    y.sum().backward()
    assert x.grad.shape == shape and torch.equal(w.grad, torch.zeros_like(w))
