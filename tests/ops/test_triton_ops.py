"""The triton backend's kernels as torch.library custom ops (``minrnn.ops.triton``).

Here, with no GPU and no interpreter: the ops' schemas, and their fake implementations and
registered backwards, by tracing a forward and backward on fake tensors (the kernels never
run): each kernel is one node of the graph. In a subprocess under Triton's interpreter
(TRITON_INTERPRET=1, CPU tensors; triton_ops_worker.py): ``torch.library.opcheck`` on every op,
and torch.compile(fullgraph=True) of the fused cells and the scan equal to eager.
"""

import importlib.util
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from minrnn.ops import triton as T
from minrnn.ops.cells import get_cell

from .test_triton import _subprocess_env

HAS_TRITON = importlib.util.find_spec("triton") is not None


def test_every_op_is_registered_with_its_schema():
    assert [op._qualname for op in T.OPS] == [
        "minrnn::triton_scan", "minrnn::triton_scan_backward", "minrnn::triton_cell", "minrnn::triton_cell_backward"]
    schema = str(torch.ops.minrnn.triton_cell.default._schema)
    assert schema.startswith("minrnn::triton_cell(Tensor pre, Tensor? h0, Tensor? reset, str cell, bool normalize, "
                             "SymInt? block_t, SymInt? block_c, SymInt? num_warps) -> Tensor")
    assert str(torch.ops.minrnn.triton_scan_backward.default._schema).endswith("-> (Tensor, Tensor, Tensor)")


def _traced(fn, *args):
    """fn's forward and backward traced on fake tensors (no kernel runs): the minrnn ops in the
    graph, counted, and the fake values of its outputs."""
    graph = make_fx(fn, tracing_mode="fake")(*args).graph
    ops = Counter(str(n.target) for n in graph.nodes if str(n.target).startswith("minrnn."))
    return ops, [n.meta["val"] for n in graph.find_nodes(op="output")[0].args[0]]


@pytest.mark.parametrize("with_h0", [True, False])
def test_scan_traces_as_one_node_each_way(with_h0):
    a, b = (torch.randn(2, 7, 3, requires_grad=True) for _ in range(2))
    h0 = torch.randn(2, 3, requires_grad=True) if with_h0 else None

    def step(a, b, *h0):
        h = T.triton_scan(a, b, *h0)
        return (h, *torch.autograd.grad(h.sum(), [a, b, *h0]))

    ops, (h, *grads) = _traced(step, a, b, *([h0] if with_h0 else []))
    assert ops == {"minrnn.triton_scan.default": 1, "minrnn.triton_scan_backward.default": 1}
    assert h.shape == (2, 7, 3) and [g.shape for g in grads] == [(2, 7, 3), (2, 7, 3)] + ([(2, 3)] if with_h0 else [])


@pytest.mark.parametrize("cell", ["mingru", "minlstm"])
def test_fused_cells_trace_as_one_node_each_way(cell):
    n = get_cell(cell).n_pre
    parts = [torch.randn(2, 7, 5, dtype=torch.bfloat16, requires_grad=True) for _ in range(n)]
    h0 = torch.randn(2, 5, dtype=torch.bfloat16, requires_grad=True)
    reset = torch.zeros(2, 7, dtype=torch.bool)
    fused = T.triton_mingru if cell == "mingru" else T.triton_minlstm

    def step(h0, reset, *parts):
        h = fused(*parts, h0, reset=reset)
        return (h, *torch.autograd.grad(h.float().sum(), [*parts, h0]))

    ops, (h, *grads) = _traced(step, h0, reset, *parts)
    assert ops == {"minrnn.triton_cell.default": 1, "minrnn.triton_cell_backward.default": 1}
    assert h.shape == (2, 7, 5) and h.dtype == torch.bfloat16
    assert [g.shape for g in grads] == [(2, 7, 5)] * n + [(2, 5)]
    assert all(g.dtype == torch.bfloat16 for g in grads)


OPCHECK_CASES = (
    [f"{op}-{h}" for op in ("scan", "scan_backward") for h in ("h0", "noh0")]
    + [f"{op}-{c}" for c in ("mingru-h0-reset", "minlstm-noh0-reset", "minlstm-unnormalized-h0")
       for op in ("cell", "cell_backward")]
)


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    out = tmp_path_factory.mktemp("triton_ops") / "results.json"
    worker = Path(__file__).with_name("triton_ops_worker.py")
    proc = subprocess.run([sys.executable, str(worker), str(out)], env=_subprocess_env(TRITON_INTERPRET="1"),
                          capture_output=True, text=True, timeout=600)
    if proc.returncode:
        pytest.fail(f"the interpreter worker failed:\n{proc.stdout}\n{proc.stderr}")
    return json.loads(out.read_text())


@pytest.mark.skipif(not HAS_TRITON, reason="the triton package is not installed")
def test_opcheck_and_compile_under_the_interpreter(interpreted):
    assert sorted(interpreted) == sorted(OPCHECK_CASES + ["compile-fullgraph"])
    failed = {name: error for name, error in interpreted.items() if error}
    assert not failed, "\n".join(f"{name}:\n{error}" for name, error in failed.items())
