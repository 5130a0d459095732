"""A/B of how the CPU kernels' large outputs are allocated: the package's block cache
against plain torch.empty, and against plain torch.empty with glibc told to keep freed
memory (mallopt: no mmap for large blocks, no trimming of the heap's top).

Each variant runs in its own process (mallopt settings hold for a whole process), timing a
training step of one MinGRU layer (forward + backward); the variants are interleaved over
several rounds and the median per-step time of each is reported.

    python benchmarks/cpu_output_buffers.py --rounds 5 --shape 16 4096 128

Variants: ``cache`` (the output cache on), ``empty`` (every output a fresh torch.empty),
``mallopt`` (torch.empty, with M_MMAP_MAX=0 and M_TRIM_THRESHOLD=2**40 set at start).
A variant the package does not offer (e.g. ``cache`` once the cache is gone) is skipped.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import subprocess
import sys
import time

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4


def _child(variant: str, shape: list[int], steps: int) -> None:
    if variant == "mallopt":
        libc = ctypes.CDLL("libc.so.6")
        assert libc.mallopt(M_MMAP_MAX, 0) == 1 and libc.mallopt(M_TRIM_THRESHOLD, 1 << 40) == 1
    import torch

    import minrnn

    torch.manual_seed(0)
    B, T, C = shape
    layer = minrnn.MinGRU(C, C, backend="cpu")
    x = torch.randn(B, T, C, requires_grad=True)
    times = []
    for _ in range(steps + 2):
        t0 = time.perf_counter()
        y, _ = layer(x)
        y.sum().backward()
        times.append(time.perf_counter() - t0)
    print(json.dumps(statistics.median(times[2:])))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", type=int, nargs=3, default=[16, 4096, 128], metavar=("B", "T", "C"))
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--variants", default="cache,empty,mallopt")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        _child(args.child, args.shape, args.steps)
        return
    env_for = {"cache": {"MINRNN_CPU_CACHE_MB": "1024"}, "empty": {"MINRNN_CPU_CACHE_MB": "0"},
               "mallopt": {"MINRNN_CPU_CACHE_MB": "0"}}
    results: dict[str, list[float]] = {v: [] for v in args.variants.split(",")}
    for _ in range(args.rounds):
        for v in results:
            env = dict(os.environ, **env_for[v])
            out = subprocess.run([sys.executable, __file__, "--child", v, "--shape", *map(str, args.shape),
                                  "--steps", str(args.steps)], env=env, capture_output=True, text=True)
            if out.returncode:
                raise SystemExit(out.stderr.strip().splitlines()[-1])
            results[v].append(json.loads(out.stdout.strip().splitlines()[-1]))
    B, T, C = args.shape
    print(f"MinGRU({C}, {C}) training step, x ({B}, {T}, {C}) float32, {os.cpu_count()} CPUs, "
          f"{args.rounds} rounds x {args.steps} steps; median of round medians (min..max), ms")
    for v, ts in results.items():
        print(f"  {v:8s} {1e3 * statistics.median(ts):8.2f}  ({1e3 * min(ts):.2f} .. {1e3 * max(ts):.2f})")


if __name__ == "__main__":
    main()
