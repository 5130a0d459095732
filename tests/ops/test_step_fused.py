"""The fused decoding-step kernels (minrnn.ops.step on numba) against their torch references:
conv + window + RMSNorm, RMSNorm alone, and both cells' state update, float32 and float64,
odd widths, padded rows, with and without a carried state."""

import pytest
import torch

from minrnn.ops import cpu
from minrnn.ops import step as S
from minrnn.ops.cells import get_cell

pytestmark = pytest.mark.skipif(not cpu.available(), reason="the fused step kernels need numba")

# float32: a few ulps of the largest value (the kernels sum in another order); float64: the
# cell and conv to ~1e-15. RMSNorm runs in float32 in both (as MinRNNRMSNorm), so its float64
# output agrees to float32's precision only.
TOL = {torch.float32: 2e-6, torch.float64: 1e-13}
NORM_TOL = {torch.float32: 2e-6, torch.float64: 2e-6}
SHAPES = [(1, 7), (3, 33), (5, 1)]  # (batch, channels): odd widths, a width of 1


def close(got, want, tol):
    assert got.shape == want.shape and got.dtype == want.dtype
    scale = max(want.abs().max().item(), 1.0)
    assert (got - want).abs().max().item() <= tol * scale


def inputs(B, C, dtype, seed=0, scale=3.0):
    gen = torch.Generator().manual_seed(seed)
    return lambda *shape: (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype)


def keep_mask(B, masked):
    if not masked:
        return None
    keep = torch.ones(B, dtype=torch.bool)
    keep[::2] = False
    return keep


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("B,D", SHAPES)
@pytest.mark.parametrize("K", [1, 2, 4])
@pytest.mark.parametrize("masked", [False, True])
def test_conv_norm_step_matches_its_reference(dtype, B, D, K, masked):
    r = inputs(B, D, dtype)
    x, window, weight, bias, norm_w = r(B, D), r(B, D, K - 1), r(D, K), r(D), r(D)
    keep = keep_mask(B, masked)
    assert S.fused_applies(x, window, weight, bias, norm_w)
    got = S.conv_norm_step(x, keep, window, weight, bias, norm_w, 1e-6)
    want = S.conv_norm_step_reference(x, keep, window, weight, bias, norm_w, 1e-6)
    close(got[0], want[0], TOL[dtype])
    close(got[1], want[1], NORM_TOL[dtype])
    assert torch.equal(got[2], want[2])  # the window is a copy: exact
    if masked and K > 1:  # a padded row feeds the conv a zero
        assert torch.all(got[2][~keep][..., -1] == 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("B,D", SHAPES)
def test_rms_norm_matches_its_reference(dtype, B, D):
    r = inputs(B, D, dtype)
    x, w = r(B, D), r(D)
    close(S.rms_norm(x, w, 1e-5), S.rms_norm_reference(x, w, 1e-5), NORM_TOL[dtype])


CELL_CASES = [("mingru", ()), ("minlstm", (True,)), ("minlstm", (False,))]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("B,E", SHAPES)
@pytest.mark.parametrize("cell,options", CELL_CASES)
@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_cell_step_matches_its_reference(dtype, B, E, cell, options, with_state, masked):
    spec = get_cell(cell)
    r = inputs(B, E, dtype, scale=4.0)
    pre = r(B, spec.n_pre * E)
    h = r(B, E) if with_state else None
    keep = keep_mask(B, masked)
    got = S.cell_step(spec, pre, h, options, keep)
    want = S.cell_step_reference(spec, pre, h, options, keep)
    close(got, want, TOL[dtype])
    if masked:  # a padded row keeps its state (zeros without one)
        assert torch.equal(got[~keep], torch.zeros_like(got[~keep]) if h is None else h[~keep])


@pytest.mark.parametrize("cell,options", CELL_CASES)
def test_cell_step_is_accurate_for_saturated_gates(cell, options):
    """Pre-activations of +-60: the kernels' exp and gate forms keep both sides of a gate."""
    spec = get_cell(cell)
    pre = torch.tensor([[60.0, -60.0, 0.5, 60.0, -60.0, -0.5] + ([60.0, -60.0, 2.0] if spec.n_pre == 3 else [])],
                       dtype=torch.float64)
    h = torch.tensor([[1.0, 2.0, -3.0]], dtype=torch.float64)
    close(S.cell_step(spec, pre, h, options), S.cell_step_reference(spec, pre, h, options, None), 1e-13)


def test_the_references_run_where_the_kernels_do_not():
    """Half precision (and autograd) go through the torch references, state kept in float32."""
    spec = get_cell("mingru")
    pre = torch.randn(2, 8, dtype=torch.bfloat16)
    assert not S.fused_applies(pre)
    state = S.cell_step(spec, pre, None)
    assert state.dtype == torch.float32
    close(state, S.cell_step_reference(spec, pre.float(), None, (), None), 1e-6)
    w = torch.randn(4, requires_grad=True)
    x = torch.randn(2, 4)
    assert not S.fused_applies(x, w)
    S.rms_norm(x, w, 1e-6).sum().backward()
    assert w.grad is not None
