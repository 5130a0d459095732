"""Identities of the scan, checked by hypothesis over shapes and values, per backend."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import minrnn
from minrnn.ops import BACKENDS

from ..conftest import FAST_BACKENDS, assert_close_scaled

ALL = ["sequential"] + FAST_BACKENDS


@st.composite
def scan_case(draw, backends=ALL):
    B = draw(st.integers(1, 3))
    T = draw(st.integers(1, 150))
    C = draw(st.integers(1, 4))
    seed = draw(st.integers(0, 2**31 - 1))
    backend = draw(st.sampled_from(backends))
    gen = torch.Generator().manual_seed(seed)
    a = torch.rand(B, T, C, generator=gen, dtype=torch.float64) * draw(st.floats(0.1, 1.2))
    signed = BACKENDS[backend].signed

    def vals(*shape):
        x = torch.randn(*shape, generator=gen, dtype=torch.float64)
        return x if signed else x.abs() + 0.01

    return backend, a, vals(B, T, C), vals(B, T, C), vals(B, C), vals(B, C), draw(st.integers(1, T))


@settings(max_examples=60, deadline=None)
@given(scan_case(), st.floats(0.1, 3.0), st.floats(0.1, 3.0))
def test_linear_in_b_and_h0(case, alpha, beta):
    """scan(a, alpha b1 + beta b2, alpha h1 + beta h2) = alpha scan(a, b1, h1) + beta scan(a, b2, h2)."""
    backend, a, b1, b2, h1, h2, _ = case
    lhs = minrnn.scan(a, alpha * b1 + beta * b2, alpha * h1 + beta * h2, backend=backend)
    rhs = alpha * minrnn.scan(a, b1, h1, backend=backend) + beta * minrnn.scan(a, b2, h2, backend=backend)
    assert_close_scaled(lhs, rhs, 1e-11)


@settings(max_examples=60, deadline=None)
@given(scan_case())
def test_chunking_is_associative(case):
    """Scanning [0, k) then [k, T) from the state at k equals scanning [0, T) at once."""
    backend, a, b, _, h0, _, k = case
    whole = minrnn.scan(a, b, h0, backend=backend)
    first = minrnn.scan(a[:, :k], b[:, :k], h0, backend=backend)
    parts = [first]
    if k < a.shape[1]:
        parts.append(minrnn.scan(a[:, k:], b[:, k:], first[:, -1], backend=backend))
    assert_close_scaled(torch.cat(parts, dim=1), whole, 1e-11)


@settings(max_examples=40, deadline=None)
@given(scan_case(backends=FAST_BACKENDS))
def test_every_backend_agrees_with_the_loop(case):
    """Every backend but the loop itself (which it would trivially agree with) against the loop."""
    backend, a, b, _, h0, _, _ = case
    assert_close_scaled(minrnn.scan(a, b, h0, backend=backend), minrnn.scan(a, b, h0, backend="sequential"), 1e-11)
