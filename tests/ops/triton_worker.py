"""Runs the triton backend's kernels on CPU tensors under Triton's interpreter.

    TRITON_INTERPRET=1 python tests/ops/triton_worker.py CASES.pt RESULTS.pt

Used by tests/ops/test_triton.py in a subprocess, because the interpreter is chosen for
a whole process, before triton is imported. CASES.pt holds a list of dicts:

    {"inputs": (a, b, h0 or None), "weight": w or None, "block_t": int or None,
     "block_c": int or None, "non_contiguous": bool, "gradcheck": bool}

Cases with a "cell" key ("mingru" or "minlstm", with "normalize") run the fused cells instead
(the signed cells, which have no fused kernel, run minrnn.functional's generic path on
triton_scan):
    {"cell": ..., "normalize": bool, "inputs": (hidden, gate[s]..., h0 or None), "weight": w,
     "block_t", "block_c", "separate": bool, "reset": (B, T) bool or None}

RESULTS.pt gets, per case, [h, grad a, grad b, grad h0 (when h0 is given)] in float64
for the loss (h * w).sum() (h.sum() when w is None, whose upstream gradient is an
expanded, stride-0 tensor), or for gradcheck cases the pair (passed, message).
"""

import os
import sys

import torch

import minrnn.functional as MF
from minrnn.ops.cells import get_cell
from minrnn.ops.triton import triton_mingru, triton_minlstm, triton_scan


def _strided(x):
    # the same values, laid out (B, C, T) in memory
    return x.transpose(1, 2).contiguous().transpose(1, 2)


def run_cell_case(case):
    """A fused cell: inputs (hidden, gate[s]..., h0 or None). The parts are the column chunks of
    one leaf (the layers' copy-free layout) unless ``separate``; returns [h, grad of each part,
    grad h0 (when h0 is given)] in float64."""
    *parts, h0 = case["inputs"]
    tiles = dict(block_t=case["block_t"], block_c=case["block_c"])
    reset = case.get("reset")
    h0 = None if h0 is None else h0.detach().clone().requires_grad_()
    if case.get("separate"):
        leaves = [p.detach().clone().requires_grad_() for p in parts]
        chunks = leaves
    else:
        leaf = torch.cat(parts, dim=-1).detach().requires_grad_()
        chunks = leaf.chunk(len(parts), dim=-1)
    if case["cell"] == "mingru":
        h = triton_mingru(*chunks, h0, reset=reset, **tiles)
    elif case["cell"] == "minlstm":
        h = triton_minlstm(*chunks, h0, case["normalize"], reset=reset, **tiles)
    else:
        h = _generic_cell(case, chunks, h0, reset, tiles)
    (h * case["weight"]).sum().backward()
    grads = [x.grad for x in leaves] if case.get("separate") else list(leaf.grad.chunk(len(parts), dim=-1))
    return [h.detach().double()] + [g.double() for g in grads] + ([] if h0 is None else [h0.grad.double()])


def _generic_cell(case, chunks, h0, reset, tiles):
    """A cell no fused kernel knows, as minrnn.functional.run_cell runs it on the triton backend:
    its gates (a = 0 at document starts), then triton_scan (forward, and in reverse for the
    backward). On CUDA the public call itself; on CPU tensors (which run_cell would send to no
    GPU backend) the same Function."""
    spec = get_cell(case["cell"])
    options = {"normalize": case["normalize"]} if "normalize" in spec.option_names else {}
    if chunks[0].is_cuda:
        return MF.run_cell(spec, chunks, h0, reset=reset, backend="triton", **options)[0]
    opts = spec.options(**options)

    def gates(*p):
        return MF.apply_boundaries(*spec.gates(*p, *opts), None, reset)

    def scan(a, b, start):
        return triton_scan(a, b, start, **tiles)

    return MF._RecomputeGates.apply(gates, scan, h0, *chunks)


def run_case(case):
    if case.get("cell"):
        return run_cell_case(case)

    def fn(a, b, h0=None):
        if case.get("non_contiguous"):
            a, b = _strided(a), _strided(b)
        return triton_scan(a, b, h0, block_t=case["block_t"], block_c=case["block_c"])

    inputs = case["inputs"]
    if case.get("gradcheck"):
        leaves = tuple(x.clone().requires_grad_() for x in inputs if x is not None)
        try:
            return bool(torch.autograd.gradcheck(fn, leaves)), ""
        except Exception as e:  # gradcheck raises on a mismatch: the message is the finding
            return False, str(e)
    leaves = [None if x is None else x.detach().clone().requires_grad_() for x in inputs]
    h = fn(*leaves)
    weight = case["weight"]
    (h.sum() if weight is None else (h * weight).sum()).backward()
    return [h.detach().double()] + [x.grad.double() for x in leaves if x is not None]


def main(cases_path, results_path):
    if os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("set TRITON_INTERPRET=1: the kernels run on CPU tensors only under Triton's interpreter")
    cases = torch.load(cases_path)
    torch.save([run_case(c) for c in cases], results_path)


if __name__ == "__main__":
    main(*sys.argv[1:])
