"""The CPU kernels as torch.library custom ops (``minrnn.ops.cpu.library``): ``opcheck`` on
every op (schema, fake implementation, autograd registration, AOT dispatch), and the ops'
values and gradients against the eager autograd Functions (float64, gradcheck for one each)."""

import pytest
import torch
from torch.library import opcheck

from minrnn.ops import cpu

pytestmark = pytest.mark.skipif(not cpu.available(), reason="numba is not installed")
if cpu.available():
    from minrnn.ops.cells import get_cell
    from minrnn.ops.cpu import functions, library
    from minrnn.ops.cpu.conv import cpu_causal_conv
    from minrnn.ops.cpu.norm import cpu_rms_norm

B, T, C, I, K = 2, 5, 4, 6, 3


def _leaf(*shape, dtype=torch.float64, positive=False):
    x = torch.rand(*shape, dtype=dtype) if positive else torch.randn(*shape, dtype=dtype)
    return x.requires_grad_()


def _resets():
    reset = torch.zeros(B, T, dtype=torch.bool)
    reset[0, 2] = reset[1, 0] = True
    return reset


def _grads(out, inputs, seed=1):
    """Gradients of a fixed random projection of ``out`` w.r.t. the inputs that require one."""
    g = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(seed))
    wanted = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    return torch.autograd.grad(out, wanted, g)


def _same(op_out, eager_out, inputs):
    torch.testing.assert_close(op_out, eager_out, rtol=1e-12, atol=1e-12)
    for got, want in zip(_grads(op_out, inputs), _grads(eager_out, inputs)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("with_h0", [True, False])
def test_scan_op(with_h0):
    a, b = _leaf(B, T, C, positive=True), _leaf(B, T, C)
    h0 = _leaf(B, C) if with_h0 else None
    opcheck(library.scan_op, (a, b, h0))
    _same(library.scan_op(a, b, h0), functions._Scan.apply(a, b, h0), (a, b, h0))
    assert torch.autograd.gradcheck(lambda *t: library.scan_op(*t), (a, b, h0))


@pytest.mark.parametrize("cell,options,with_h0,with_reset", [
    ("mingru", [], True, True), ("minlstm", [True], False, True), ("minlstm", [False], True, False)])
def test_cell_op(cell, options, with_h0, with_reset):
    spec = get_cell(cell)
    pre = _leaf(B, T, spec.n_pre * C)
    h0 = _leaf(B, C) if with_h0 else None
    reset = _resets() if with_reset else None
    opcheck(library.cell_op, (pre, h0, cell, options, reset))
    eager = functions._Cell.apply(pre, h0, spec, tuple(options), reset)
    _same(library.cell_op(pre, h0, cell, options, reset), eager, (pre, h0))
    assert torch.autograd.gradcheck(lambda p, h: library.cell_op(p, h, cell, options, reset), (pre, h0))


@pytest.mark.parametrize("cell,options,with_bias,with_reset", [
    ("mingru", [], True, True), ("minlstm", [True], False, False)])
def test_projected_cell_op(cell, options, with_bias, with_reset):
    spec = get_cell(cell)
    x, weight, h0 = _leaf(B, T, I), _leaf(spec.n_pre * C, I), _leaf(B, C)
    bias = _leaf(spec.n_pre * C) if with_bias else None
    reset = _resets() if with_reset else None
    args = (x, weight, bias, h0, cell, options, reset)
    opcheck(library.projected_cell_op, args)
    h, pre = library.projected_cell_op(*args)
    torch.testing.assert_close(pre, (x @ weight.t()).detach())  # the saved pre-activations, bias not added
    _same(h, functions._ProjectedCell.apply(x, weight, bias, h0, spec, tuple(options), reset), (x, weight, bias, h0))
    assert torch.autograd.gradcheck(
        lambda *t: library.projected_cell_op(*t, cell, options, reset)[0], (x, weight, bias, h0))


@pytest.mark.parametrize("weight_shape,with_bias", [((C, 1, K), True), ((C, K), False)])
def test_causal_conv_op(weight_shape, with_bias):
    x, weight = _leaf(B, T, C), _leaf(*weight_shape)
    bias = _leaf(C) if with_bias else None
    opcheck(library.causal_conv_op, (x, weight, bias))
    _same(library.causal_conv_op(x, weight, bias), cpu_causal_conv(x, weight, bias), (x, weight, bias))
    assert torch.autograd.gradcheck(lambda *t: library.causal_conv_op(*t), (x, weight, bias))


def test_rms_norm_op():
    # float32 only (the kernel's dtype): compared with the eager Function, which runs the same kernels
    x, weight = _leaf(B, T, C, dtype=torch.float32), _leaf(C, dtype=torch.float32)
    opcheck(library.rms_norm_op, (x, weight, 1e-6))
    y, r = library.rms_norm_op(x, weight, 1e-6)
    torch.testing.assert_close(r, x.detach().pow(2).mean(-1).add(1e-6).rsqrt().reshape(-1))
    _same(y, cpu_rms_norm(x, weight, 1e-6), (x, weight))


def test_every_op_is_registered_under_the_minrnn_namespace():
    names = {op._qualname for op in library.OPS}
    assert names == {f"minrnn::cpu_{n}" for n in (
        "scan", "scan_backward", "cell", "cell_backward", "projected_cell", "causal_conv", "causal_conv_backward",
        "rms_norm", "rms_norm_backward")}
    for name in names:
        assert hasattr(torch.ops.minrnn, name.split("::")[1])


def test_the_public_ops_call_the_custom_ops_under_compile():
    """Traced by dynamo, ``cpu_cell`` (the public op) is one node: the custom op."""
    from torch._dynamo.testing import CompileCounterWithBackend

    counter = CompileCounterWithBackend("eager")
    pre = torch.randn(B, T, 2 * C)
    spec = get_cell("mingru")
    compiled = torch.compile(lambda p: functions.cpu_cell(spec, p.chunk(2, -1), None, ()), backend=counter,
                             fullgraph=True)
    torch.testing.assert_close(compiled(pre), functions.cpu_cell(spec, pre.chunk(2, -1), None, ()))
    targets = [n.target for n in counter.graphs[0].graph.nodes if n.op == "call_function"]
    assert torch.ops.minrnn.cpu_cell in targets
