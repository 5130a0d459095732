"""Where a minGRU or minLSTM layer's training step goes on CPU, beside its input projection (issue 3).

    python benchmarks/cpu_cell_breakdown.py                    # minGRU, T = 256 and 4096, every core
    python benchmarks/cpu_cell_breakdown.py --cell minlstm --lengths 256 --threads 1 --repeats 31

For one layer (B = 16, input = hidden = 128 by default), median ms of:

    projection       nn.Linear(D, nD) forward + backward with a fixed upstream gradient (the floor;
                     n = 2 pre-activations per unit for minGRU, 3 for minLSTM)
    matmuls alone    the three matmuls of that projection without its bias (x W^T, dY W, dY^T x)
    layer            minrnn.MinGRU / MinLSTM forward + backward (the `cpu` backend: the projection
                     and the cell as one Function whose kernels add the bias and sum its gradient)
    kernel fwd/bwd   the fused cell's numba kernels alone, outputs preallocated (no allocation),
                     recomputing the exps in the backward (the cell Function's way)
    kernel fwd, kept / kernel bwd, in place   the same as the layer runs them: the forward
                     leaves its exps in the pre-activations, the backward reads them and writes
                     dL/dpre over them (restored, untimed, before each call)
    cell fwd+bwd     the cell's autograd Function on fixed pre-activations, output cache on
    cell, cache off  the same with every output a fresh allocation (MINRNN_CPU_CACHE_MB=0)
    scan, cache on/off  the bare scan's forward + backward, both ways

All candidates are timed in one process, their repeats interleaved, after warm-up, with the
garbage collector paused. ``--between flush`` writes a 64 MiB buffer before every timed call
(each part starts with cold caches, as after a candidate that churns through memory in
`minrnn bench`); ``--between idle`` sleeps 30 ms before each (the thread pools fall asleep
and the cores go idle, so each part pays for waking them). `minrnn bench` is the benchmark of record; this script splits the
layer's cost into its parts when working on the kernels.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time

import numpy as np
import torch

import minrnn
from minrnn.ops import cpu as K


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cell", choices=["mingru", "minlstm"], default="mingru",
                    help="which layer (minLSTM with its normalised gates, the layer's default)")
    ap.add_argument("--lengths", type=int, nargs="+", default=[256, 4096])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--threads", type=int, default=None, help="torch and numba threads (default: every core)")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--json", default=None, help="also write the medians here")
    ap.add_argument("--between", choices=["nothing", "flush", "idle"], default="nothing",
                    help="untimed, before every timed call: nothing, a 64 MiB write (cold caches) or a 30 ms sleep")
    args = ap.parse_args(argv)
    if not K.available():
        raise SystemExit("numba is not installed: the cpu backend is unavailable")
    from minrnn.ops.cells import get_cell
    from minrnn.ops.cpu.functions import _CELL_KERNELS, _Cell, _column_args
    from minrnn.ops.cpu.launch import channel_block, flat_view

    if args.threads:
        import numba

        torch.set_num_threads(args.threads)
        numba.set_num_threads(args.threads)
    B, D = args.batch, args.width
    kind = args.cell
    n = 2 if kind == "mingru" else 3
    normalize = [True] if kind == "minlstm" else []  # the minLSTM kernels' extra argument
    out = {}
    for T in args.lengths:
        torch.manual_seed(0)
        x = torch.randn(B, T, D, requires_grad=True)
        layer = (minrnn.MinGRU if kind == "mingru" else minrnn.MinLSTM)(D, D, backend="cpu")
        proj = layer.proj[0]
        dy, dy2 = torch.randn(B, T, D), torch.randn(B, T, n * D)
        pre = torch.randn(B, T, n * D)
        pre_leaf = pre.clone().requires_grad_()
        pre_kept = pre.clone()  # overwritten by the kept forward, as the layer's are
        a = torch.rand(B, T, D, requires_grad=True)
        b = torch.randn(B, T, D, requires_grad=True)
        # preallocated outputs for the bare kernels
        h, dpre = torch.empty(B, T, D), torch.empty(B, T, n * D)
        start, dh0 = torch.zeros(B, D), torch.empty(B, D)
        spec = get_cell(kind)
        hs = np.array([T * D, D], dtype=np.int64)
        blk = channel_block(B, D)
        bias, dbias = proj.bias.detach().numpy(), np.empty((B, n * D), dtype=np.float32)
        kernels = _CELL_KERNELS[kind]
        pre_columns, dpre_columns = _column_args(pre, n), _column_args(dpre, n)
        x2, w = x.detach().view(B * T, D), proj.weight.detach()

        def projection():
            x.grad = None
            proj.zero_grad(set_to_none=True)
            torch.autograd.backward(proj(x), dy2)

        def matmuls():
            torch.mm(x2, w.t())
            torch.mm(dy2.view(B * T, n * D), w)
            torch.mm(dy2.view(B * T, n * D).t(), x2)

        def whole_layer():
            x.grad = None
            layer.zero_grad(set_to_none=True)
            torch.autograd.backward(layer(x)[0], dy)

        kept_columns = _column_args(pre_kept, n)

        def kernel_fwd(keep=False):
            kernels.forward(*(kept_columns if keep else pre_columns), bias, start.numpy(), *normalize, keep,
                            h.view(-1).numpy(), hs, B, T, D, blk)

        def kernel_bwd():
            kernels.backward(*pre_columns, bias, *flat_view(h), start.numpy(), *flat_view(dy), *normalize,
                             *dpre_columns[0::2], dpre_columns[1], dh0.numpy(), dbias, B, T, D, blk)

        kernel_fwd(True)
        kept_state = pre_kept.clone()

        def restore_kept():
            pre_kept.copy_(kept_state)

        def kernel_bwd_in_place():
            kernels.backward_in_place(*kept_columns, *flat_view(h), start.numpy(), *flat_view(dy), *normalize,
                                      dh0.numpy(), dbias, B, T, D, blk)

        def cell():
            pre_leaf.grad = None
            torch.autograd.backward(_Cell.apply(pre_leaf, None, spec, tuple(normalize)), dy)

        def scan():
            a.grad = b.grad = None
            torch.autograd.backward(K.cpu_scan(a, b, None), dy)

        def uncached(fn):
            def run():
                with K.output_cache_limit(0):
                    fn()
            return run

        # name -> the timed call, or (an untimed preparation, the timed call)
        cases = {"projection": projection, "matmuls alone": matmuls, "layer": whole_layer, "kernel fwd": kernel_fwd,
                 "kernel bwd": kernel_bwd, "kernel fwd, kept": lambda: kernel_fwd(True),
                 "kernel bwd, in place": (restore_kept, kernel_bwd_in_place), "cell fwd+bwd": cell,
                 "cell, cache off": uncached(cell), "scan, cache on": scan, "scan, cache off": uncached(scan)}
        cases = {name: c if isinstance(c, tuple) else (None, c) for name, c in cases.items()}
        for prepare, fn in cases.values():  # warm-up (and numba compilation)
            for _ in range(2):
                if prepare:
                    prepare()
                fn()
        times = {name: [] for name in cases}
        flush = torch.empty(16 << 20) if args.between == "flush" else None
        gc.disable()
        try:
            for _ in range(args.repeats):
                for name, (prepare, fn) in cases.items():
                    if prepare:
                        prepare()
                    if flush is not None:
                        flush.fill_(1.0)
                    elif args.between == "idle":
                        time.sleep(0.03)
                    t0 = time.perf_counter()
                    fn()
                    times[name].append(time.perf_counter() - t0)
        finally:
            gc.enable()
        med = {name: 1e3 * statistics.median(v) for name, v in times.items()}
        out[T] = med
        between = "" if args.between == "nothing" else f", {args.between} before each"
        print(f"{kind}, B={B} D={D} T={T}, {torch.get_num_threads()} threads, median ms of {args.repeats}{between}:")
        for name, ms in med.items():
            print(f"  {name:20s} {ms:9.3f}" + (f"   ({ms / med['projection']:.2f}x projection)"
                                               if name == "layer" else ""))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"settings": vars(args), "median_ms": out}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
