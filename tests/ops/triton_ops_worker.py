"""``torch.library.opcheck`` on the triton backend's custom ops, and ``torch.compile`` of the
fused cells with fullgraph=True, on CPU tensors under Triton's interpreter.

    TRITON_INTERPRET=1 python tests/ops/triton_ops_worker.py RESULTS.json

Used by tests/ops/test_triton_ops.py in a subprocess (the interpreter is chosen for a whole
process, before triton is imported). RESULTS.json gets {case name: "" (passed) or the error}.
"""

import json
import os
import sys
import traceback

import torch
from torch._dynamo.testing import CompileCounterWithBackend
from torch.library import opcheck

from minrnn.ops import triton as T
from minrnn.ops.cells import get_cell

B, L, C = 2, 5, 3
TILES = (4, 2, None)  # block_t, block_c, num_warps: a sequence of two tiles, a partial channel block


def _leaf(*shape, positive=False):
    x = torch.rand(*shape, dtype=torch.float64) if positive else torch.randn(*shape, dtype=torch.float64)
    return x.requires_grad_()


def _resets():
    reset = torch.zeros(B, L, dtype=torch.bool)
    reset[0, 2] = reset[1, 0] = True
    return reset


def opcheck_cases():
    """name -> (op, args) for every op: with and without h0 and resets, each fused cell."""
    cases = {}
    for with_h0 in (True, False):
        a, b = _leaf(B, L, C, positive=True), _leaf(B, L, C)
        h0 = _leaf(B, C) if with_h0 else None
        tag = "h0" if with_h0 else "noh0"
        cases[f"scan-{tag}"] = (T.scan_op, (a, b, h0, *TILES))
        h = T.scan_op(a, b, h0, *TILES).detach()
        cases[f"scan_backward-{tag}"] = (T.scan_backward_op, (a.detach(), h, None if h0 is None else h0.detach(),
                                                              torch.randn(B, L, C, dtype=torch.float64), *TILES))
    for name, cell, normalize, with_h0, with_reset in (
            ("mingru-h0-reset", "mingru", False, True, True), ("minlstm-noh0-reset", "minlstm", True, False, True),
            ("minlstm-unnormalized-h0", "minlstm", False, True, False)):
        n = get_cell(cell).n_pre
        pre, h0 = _leaf(B, L, n * C), (_leaf(B, C) if with_h0 else None)
        reset = _resets() if with_reset else None
        cases[f"cell-{name}"] = (T.cell_op, (pre, h0, reset, cell, normalize, *TILES))
        h = T.cell_op(pre, h0, reset, cell, normalize, *TILES).detach()
        cases[f"cell_backward-{name}"] = (T.cell_backward_op, (
            pre.detach(), h, None if h0 is None else h0.detach(), reset, torch.randn(B, L, C, dtype=torch.float64),
            cell, normalize, *TILES))
    return cases


def compile_case():
    """A minGRU and a minLSTM over resets, then a scan, compiled whole (aot_eager): equal to eager,
    outputs and gradients, one frame."""
    hidden, gate, forget, h0 = _leaf(B, L, C), _leaf(B, L, C), _leaf(B, L, C), _leaf(B, C)
    reset = _resets()

    def f(hidden, gate, forget, h0):
        h = T.triton_mingru(hidden, gate, h0, reset=reset, block_t=4, block_c=2)
        h = T.triton_minlstm(h, forget, gate, h0, reset=reset, block_t=4, block_c=2)
        return T.triton_scan(torch.sigmoid(gate), h, None, block_t=4, block_c=2)

    counter = CompileCounterWithBackend("aot_eager")
    leaves = (hidden, gate, forget, h0)
    weights = torch.randn(B, L, C, dtype=torch.float64)
    results = []
    for fn in (torch.compile(f, fullgraph=True, backend=counter), f):
        out = fn(*leaves)
        results.append((out.detach(), torch.autograd.grad((out * weights).sum(), leaves)))
    (c, cg), (e, eg) = results
    torch.testing.assert_close(c, e)
    for x, y in zip(cg, eg, strict=True):
        torch.testing.assert_close(x, y)
    assert counter.frame_count == 1, counter.frame_count


def main(results_path):
    if os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("set TRITON_INTERPRET=1: the kernels run on CPU tensors only under Triton's interpreter")
    torch.manual_seed(0)
    results = {}
    for name, (op, args) in opcheck_cases().items():
        try:
            opcheck(op, args)
            results[name] = ""
        except Exception:  # the failure is the finding: reported by the test, per case
            results[name] = traceback.format_exc()
    try:
        compile_case()
        results["compile-fullgraph"] = ""
    except Exception:
        results["compile-fullgraph"] = traceback.format_exc()
    with open(results_path, "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main(sys.argv[1])
