"""What document starts (``reset``) cost in the cpu backend's fused cells: a training step
(forward + backward) of the fused cell alone (``run_cell`` on pre-activations) and of a layer's
fused projection and cell (``projected_cell``), minGRU and minLSTM, float32.

Variants, timed in one process, taking turns step by step (so that a busy machine slows
each alike), median over the repeats:

    off        no resets (the path every run without packed documents takes)
    on         resets passed to the fused kernels
    composed   resets through the composed path (the gates, then the scan kernel: what
               backend "cpu" ran before its kernels took resets)
    base-off   with --baseline DIR: the package of the checkout at DIR (another commit),
               imported beside this one as ``minrnn_baseline``, no resets: whether taking
               resets made the reset-free kernels slower

    python benchmarks/cpu_cell_resets.py --threads 1 --repeats 30
    git worktree add /tmp/base <commit> && python benchmarks/cpu_cell_resets.py --baseline /tmp/base

Documents are random, one start per ``--doc-len`` positions on average.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import os
import statistics
import sys
import time
from pathlib import Path

import torch

import minrnn.functional as MF
from minrnn.ops import BACKENDS

CASES = [(level, cell) for level in ("cell", "layer") for cell in ("mingru", "minlstm")]


def _import_baseline(checkout: Path):
    """The minrnn package of another checkout, as a second package ``minrnn_baseline``."""
    init = checkout / "src" / "minrnn" / "__init__.py"
    if not init.is_file():
        raise SystemExit(f"--baseline must be a checkout of minrnn (with src/minrnn), got {checkout}")
    spec = importlib.util.spec_from_file_location("minrnn_baseline", init, submodule_search_locations=[str(init.parent)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["minrnn_baseline"] = module
    with _ops_renamed("minrnn::", "minrnn_baseline::"):
        spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def _ops_renamed(prefix: str, replacement: str):
    """torch.library.custom_op with ``prefix`` names registered under ``replacement``: a second
    copy of the package defining minrnn:: ops would replace this one's registrations (torch
    destroys an op's old library when it is defined again), leaving this package's op handles
    dangling. The baseline's eager paths, the ones timed, do not call its ops."""
    real = torch.library.custom_op

    def custom_op(name, *args, **kwargs):
        if isinstance(name, str) and name.startswith(prefix):
            name = replacement + name[len(prefix):]
        return real(name, *args, **kwargs)

    torch.library.custom_op = custom_op
    try:
        yield
    finally:
        torch.library.custom_op = real


@contextlib.contextmanager
def _composed():
    """Backend "cpu" as if its kernels took no resets: run_cell and projected_cell compose."""
    fused = BACKENDS["cpu"]
    BACKENDS["cpu"] = dataclasses.replace(fused, cell_resets=False)
    try:
        yield
    finally:
        BACKENDS["cpu"] = fused


def _steps(level: str, cell: str, shape, reset, baseline) -> dict:
    """One training step per variant, as callables that time themselves (seconds)."""
    B, T, C = shape
    n = 2 if cell == "mingru" else 3
    dy = torch.randn(B, T, C)
    if level == "cell":
        leaves = [torch.randn(B, T, n * C, requires_grad=True)]
    else:
        leaves = [torch.randn(B, T, C, requires_grad=True), (torch.randn(n * C, C) / C ** 0.5).requires_grad_(),
                  torch.zeros(n * C, requires_grad=True)]

    def step(functional, **kw):
        for t in leaves:
            t.grad = None
        t0 = time.perf_counter()
        if level == "cell":
            h, _ = functional.run_cell(cell, leaves[0].chunk(n, -1), backend="cpu", **kw)
        else:
            h, _ = functional.projected_cell(cell, *leaves, backend="cpu", **kw)
        h.backward(dy)
        return time.perf_counter() - t0

    def composed():
        with _composed():
            return step(MF, reset=reset)

    variants = {"off": lambda: step(MF), "on": lambda: step(MF, reset=reset), "composed": composed}
    if baseline is not None:
        variants["base-off"] = lambda: step(baseline.functional)
    return variants


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", type=int, nargs=3, default=[8, 1024, 256], metavar=("B", "T", "C"))
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--doc-len", type=int, default=128, help="mean document length (default 128)")
    p.add_argument("--threads", type=int, help="torch and numba threads (default: theirs)")
    p.add_argument("--baseline", type=Path, help="a checkout of another commit, to time its reset-free kernels")
    args = p.parse_args(argv)
    baseline = _import_baseline(args.baseline.resolve()) if args.baseline else None
    if args.threads:
        import numba

        torch.set_num_threads(args.threads)
        numba.set_num_threads(args.threads)
    torch.manual_seed(0)
    B, T, C = args.shape
    reset = torch.rand(B, T) < 1 / args.doc_len
    reset[:, 0] = True
    print(f"training step (forward + backward), B={B} T={T} C={C} float32, one document start per "
          f"{args.doc_len} positions, {torch.get_num_threads()} threads of {os.cpu_count()} CPUs, "
          f"{args.repeats} repeats taking turns; median ms")
    names = ["off", "on", "composed"] + (["base-off"] if baseline else [])
    head = "   on/off  composed/on" + ("  off/base-off" if baseline else "")
    print(f"  {'case':14s}" + "".join(f"{v:>10s}" for v in names) + head)
    for level, cell in CASES:
        variants = _steps(level, cell, args.shape, reset, baseline)
        for fn in variants.values():  # compile or load the kernels, warm up
            fn(), fn()
        times = {v: [] for v in variants}
        for r in range(args.repeats):
            order = list(variants)[r % len(variants):] + list(variants)[:r % len(variants)]
            for v in order:
                times[v].append(variants[v]())
        med = {v: 1e3 * statistics.median(ts) for v, ts in times.items()}
        ratios = f"   {med['on'] / med['off']:6.3f}  {med['composed'] / med['on']:11.2f}"
        if baseline:
            ratios += f"  {med['off'] / med['base-off']:12.3f}"
        print(f"  {level + ' ' + cell:14s}" + "".join(f"{med[v]:10.2f}" for v in names) + ratios, flush=True)


if __name__ == "__main__":
    main()
