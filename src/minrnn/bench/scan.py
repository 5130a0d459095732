"""Scan suite: the recurrence h_t = a_t h_{t-1} + b_t alone, forward + backward, for every
backend that runs on the device, beside the machine's copy bandwidth; and its float32
error against a float64 sequential loop.

Per backend and T (tensors (B, T, C), N = B T C elements):
    ms          median time of ``backward(scan(a, b), dh)`` (a, b require grad)
    gbps        ``measure.scan_bytes`` (8 N elements) / time: the traffic a fused kernel
                needs, so 100 % of copy bandwidth is the ceiling a streaming kernel can reach
    pct_copy    gbps as a percentage of ``measure.copy_bandwidth``, measured in this run
    max_abs_err max |h - h64| of the float32 forward, with |h| <= 3 by construction
    grad_rel_err max over da, db of max |g - g64| / max |g64|

Inputs: decays a = U(0,1)^(1/4) (skewed towards 1: long memory, where rounding
accumulates) and b = (1 - a) u with |u| <= 3, so every h_t is an average of the u's
and |h| <= 3. u is in [-3, 3] for backends that take any sign and in [0.05, 3] for
positive-only ones (the ``inputs`` field says which).
"""

from __future__ import annotations

import time

import torch
from torch import Tensor

from ..ops import BACKENDS, resolve_backend, scan
from .layers import runnable_backends
from .measure import copy_bandwidth, scan_bytes
from .runner import Case, Result, progress, run_cases
from .settings import Settings


def scan_inputs(B: int, T: int, C: int, signed: bool, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """(a, b, dh) in float64 as the module doc says; dh ~ N(0, 1) is the upstream gradient."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.rand(B, T, C, generator=gen, dtype=torch.float64) ** 0.25
    u = torch.rand(B, T, C, generator=gen, dtype=torch.float64)
    u = 6 * u - 3 if signed else 0.05 + 2.95 * u
    dh = torch.randn(B, T, C, generator=gen, dtype=torch.float64)
    return a, (1 - a) * u, dh


def _forward_backward(fn, a: Tensor, b: Tensor, dh: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    a = a.detach().requires_grad_()
    b = b.detach().requires_grad_()
    h = fn(a, b)
    torch.autograd.backward(h, dh)
    return h.detach(), a.grad, b.grad


def accuracy(backend: str, a64: Tensor, b64: Tensor, dh64: Tensor, ref, dtype: torch.dtype, device) -> dict:
    """Errors of ``backend`` in ``dtype`` against ``ref`` = (h, da, db) in float64."""
    h, da, db = _forward_backward(lambda a, b: scan(a, b, backend=backend),
                                  *(t.to(device, dtype) for t in (a64, b64, dh64)))
    h_ref, da_ref, db_ref = ref

    def rel(g, g_ref):
        return ((g.double().cpu() - g_ref).abs().max() / g_ref.abs().max().clamp_min(1e-300)).item()

    return {"max_abs_err": (h.double().cpu() - h_ref).abs().max().item(),
            "grad_rel_err": max(rel(da, da_ref), rel(db, db_ref))}


def _case(backend: str, a: Tensor, b: Tensor, dh: Tensor) -> Case:
    def step():
        torch.autograd.backward(scan(a, b, backend=backend), dh)

    def reset():
        a.grad = b.grad = None

    return Case(backend, step, reset)


def run(settings: Settings) -> dict:
    """Run the suite; returns {"copy": {...}, "rows": [...]}."""
    dev, dt = settings.device, settings.dtype
    copy = copy_bandwidth(settings.copy_bytes, settings.copy_repeats, dev)
    progress(f"scan: copy bandwidth {copy['gbps']:.2f} GB/s ({copy['buffer_bytes'] / 2**20:.0f} MiB buffers)")
    backends = runnable_backends(dev)
    auto = resolve_backend("auto", dev).name
    B, C = settings.scan_batch, settings.scan_channels
    rows: list[dict] = []
    previous: dict[str, Result] = {}
    prev_T = None
    for T in settings.lengths:
        t0 = time.perf_counter()
        inputs, refs = {}, {}
        for signed in {BACKENDS[be].signed for be in backends}:
            a64, b64, dh64 = inputs[signed] = scan_inputs(B, T, C, signed, settings.seed)
            refs[signed] = _forward_backward(lambda a, b: scan(a, b, backend="sequential"), a64, b64, dh64)
        leaves = {s: tuple(t.to(dev, dt).requires_grad_(i < 2) for i, t in enumerate(v)) for s, v in inputs.items()}
        cases = [_case(be, *leaves[BACKENDS[be].signed]) for be in backends]
        results = run_cases(cases, dev, settings.budget, previous, scale=T / prev_T if prev_T else 1.0)
        moved = scan_bytes(B, T, C, dt)
        for be in backends:
            res, signed = results[be], BACKENDS[be].signed
            row = {"backend": be, "default": be == auto, "B": B, "T": T, "C": C, "elements": B * T * C,
                   "inputs": "signed" if signed else "positive", "bytes": moved, **res.fields(),
                   "gbps": None, "pct_copy": None, "max_abs_err": None, "grad_rel_err": None}
            if res.ms is not None:
                row["gbps"] = moved / (res.ms / 1e3) / 1e9
                row["pct_copy"] = 100 * row["gbps"] / copy["gbps"]
                row.update(accuracy(be, *inputs[signed], refs[signed], dt, dev))
            rows.append(row)
        previous, prev_T = results, T
        del inputs, refs, leaves, cases
        progress(f"scan T={T}: {time.perf_counter() - t0:.1f} s")
    return {"copy": copy, "shape": {"B": B, "C": C}, "rows": rows}
