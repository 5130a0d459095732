"""The scan and whole layers on a GPU, forward + backward: minrnn's Triton kernels against
the chunked backend, the paper's log-space form in plain autograd, cuDNN's nn.GRU / nn.LSTM
and flash-linear-attention's HGRN kernels (the same recurrence, h = exp(g) h + x).

    python benchmarks/gpu_scan.py                       # on a CUDA GPU: a few minutes
    python benchmarks/gpu_scan.py --dry-run             # every code path, tiny sizes, on the CPU

Before timing it checks on the GPU that the Triton backend equals the sequential loop
(forward and every gradient; float32, bfloat16, float64; lengths 1, 1000, 4097) and that
fla's kernels compute the same function; the verdicts go into the output. Then it times, at
B=16, C in {128, 1024}, T in {256, 1024, 4096, 16384}, each op's forward + backward (the
median of repeats between CUDA events, after warm-up, with the L2 cache flushed before
each repeat), prints Markdown tables and writes JSON (the GPU's name, torch / triton / fla
versions, date, every figure) to --out (default runs/gpu_scan.json, untracked).

Rows fail soft: an op that is missing (fla not installed), runs out of memory or raises is
recorded with a note and the run goes on; rows past --budget-s are skipped with a note.

flash-linear-attention is optional. Its kernels are in the pure-Python wheel fla-core
(needs einops, triton); on a machine without network, download it elsewhere with
``pip download --no-deps fla-core -d .whl`` and install it there with
``pip install --no-index --no-deps --target /tmp/site .whl/*.whl`` plus PYTHONPATH=/tmp/site.

--dry-run runs every path on tiny CPU sizes: the chunked backend stands in for the Triton
one and a chunked scan of exp(g) for fla's kernels; its figures mean nothing.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

try:
    import minrnn
except ImportError:  # run from a checkout without installing it
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    import minrnn

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "runs" / "gpu_scan.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class Setting:
    """What a run measures: full sizes on CUDA, or the dry run's stand-ins on the CPU."""

    def __init__(self, dry_run: bool, dtype: torch.dtype, budget_s: float):
        self.dry_run, self.dtype = dry_run, dtype
        self.device = torch.device("cpu" if dry_run else "cuda")
        self.scan_backend = "chunked" if dry_run else "triton"
        self.B = 2 if dry_run else 16
        self.Cs = (3, 8) if dry_run else (128, 1024)
        self.Ts = (1, 5, 16) if dry_run else (256, 1024, 4096, 16384)
        self.warmup, self.min_reps, self.max_reps, self.target_ms = (1, 2, 2, 1.0) if dry_run else (2, 3, 25, 400.0)
        self.deadline = time.monotonic() + budget_s
        # zeroed before each timed repeat so that no input is still in L2 (50-60 MB on H100/H200)
        self.flush = None if dry_run else torch.empty(256 * 2**20, dtype=torch.int8, device=self.device)
        self.hgrn = _load_hgrn(dry_run)

    def rand(self, *shape, fn=None):
        x = torch.randn(*shape, device=self.device)
        return (x if fn is None else fn(x)).to(self.dtype).requires_grad_()

    def time_ms(self, fn) -> float:
        if self.device.type == "cuda":
            self.flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3

    def measure(self, fn) -> tuple[float, int]:
        """Median ms of forward+backward, and how many repeats it took."""
        for _ in range(self.warmup):  # the first call compiles (Triton) or autotunes (fla)
            self.time_ms(fn)
        est = self.time_ms(fn)
        reps = max(self.min_reps, min(self.max_reps, int(self.target_ms / max(est, 1e-3))))
        return statistics.median(self.time_ms(fn) for _ in range(reps)), reps


def _load_hgrn(dry_run: bool):
    """{name: fn(x, g) -> o} for fla's HGRN kernels, or a note saying why there are none."""
    if dry_run:
        stand_in = lambda x, g: minrnn.scan(g.exp(), x, backend="chunked")  # noqa: E731
        return {"fla fused_recurrent_hgrn": stand_in, "fla chunk_hgrn": stand_in}
    try:
        import fla
        from fla.ops.hgrn import chunk_hgrn, fused_recurrent_hgrn
    except Exception as e:  # ImportError, or a triton that this fla does not support
        return f"fla not importable ({type(e).__name__}: {e})"
    return {"fla fused_recurrent_hgrn": lambda x, g: fused_recurrent_hgrn(x, g)[0],
            "fla chunk_hgrn": lambda x, g: chunk_hgrn(x, g)[0],
            "_version": getattr(fla, "__version__", "?")}


# --- the ops: each builds its inputs once and returns a forward+backward closure ---------


def _grad_step(forward, leaves, out_shape, s: Setting):
    dout = torch.randn(out_shape, device=s.device, dtype=s.dtype)

    def step():
        # allow_unused: with T = 1 and no h0 a decay is never used (h_1 = b_1)
        torch.autograd.grad(forward(), leaves, dout, allow_unused=True)

    return step


def scan_op(backend: str):
    def make(s: Setting, B, T, C):
        a = s.rand(B, T, C, fn=torch.sigmoid)  # decays in (0, 1)
        b = s.rand(B, T, C, fn=lambda x: x.abs() + 0.1)  # positive, so every form can run it
        return _grad_step(lambda: minrnn.scan(a, b, backend=backend), (a, b), (B, T, C), s)

    return make


def log_space_op(s: Setting, B, T, C):
    """The paper's form: a* = cumsum(log a), log h = a* + logcumsumexp(log b - a*)."""
    log_a = s.rand(B, T, C, fn=F.logsigmoid)
    log_b = s.rand(B, T, C, fn=lambda x: (x.abs() + 0.1).log())

    def forward():
        a_star = torch.cumsum(log_a, dim=1)
        return torch.exp(a_star + torch.logcumsumexp(log_b - a_star, dim=1))

    return _grad_step(forward, (log_a, log_b), (B, T, C), s)


def hgrn_op(name: str):
    def make(s: Setting, B, T, C):
        if isinstance(s.hgrn, str):
            raise LookupError(s.hgrn)
        g = s.rand(B, T, C, fn=F.logsigmoid)  # log of the decay
        x = s.rand(B, T, C, fn=lambda v: v.abs() + 0.1)
        return _grad_step(lambda: s.hgrn[name](x, g), (x, g), (B, T, C), s)

    return make


def module_op(build):
    """A layer fed x (B, T, C); gradients for x and every parameter."""

    def make(s: Setting, B, T, C):
        layer = build(C).to(device=s.device, dtype=s.dtype)
        x = s.rand(B, T, C)
        return _grad_step(lambda: layer(x)[0], (x, *layer.parameters()), (B, T, C), s)

    return make


def ops(s: Setting) -> dict[str, dict]:
    """{table: {op name: make}}; in each table the first op is minrnn's."""
    ours = "minrnn triton" if not s.dry_run else "minrnn triton (dry run: chunked)"
    scan = {ours: scan_op(s.scan_backend), "minrnn chunked": scan_op("chunked"),
            "log-space, paper's form (autograd)": log_space_op,
            "fla fused_recurrent_hgrn": hgrn_op("fla fused_recurrent_hgrn"),
            "fla chunk_hgrn": hgrn_op("fla chunk_hgrn")}
    # cuDNN's layers are timed once, in the layer table; the scan table quotes them for scale
    layers = {f"minrnn.MinGRU ({s.scan_backend})": module_op(lambda C: minrnn.MinGRU(C, C, backend=s.scan_backend)),
              f"minrnn.MinLSTM ({s.scan_backend})": module_op(lambda C: minrnn.MinLSTM(C, C, backend=s.scan_backend)),
              "cuDNN nn.GRU": module_op(lambda C: nn.GRU(C, C, batch_first=True)),
              "cuDNN nn.LSTM": module_op(lambda C: nn.LSTM(C, C, batch_first=True))}
    # layers first: the fused cells against cuDNN matter most, so a short --budget-s still times them
    return {"layer": layers, "scan": scan}


def ratios(table: str, names: list[str]) -> list[tuple[str, str]]:
    """(other, minrnn's) pairs whose time ratio the table shows."""
    if table == "scan":
        return [(other, names[0]) for other in names[1:]]
    return [("cuDNN nn.GRU", names[0]), ("cuDNN nn.LSTM", names[1])]


# --- correctness on the device, before any timing -----------------------------------------


def _fwd_grads(fn, inputs, dout):
    leaves = [None if x is None else x.detach().clone().requires_grad_() for x in inputs]
    h = fn(*leaves)
    grads = torch.autograd.grad(h, [x for x in leaves if x is not None], dout.to(h.dtype), materialize_grads=True)
    return [h.detach().double()] + [g.double() for g in grads]


def _rel_err(got, ref) -> float:
    return max(((g - r).abs().max() / r.abs().max().clamp_min(1e-30)).item() for g, r in zip(got, ref))


def checks(s: Setting) -> list[dict]:
    """The scan backend against the float64 loop, and fla's kernels against the backend."""
    out = []
    gen = torch.Generator(device=s.device).manual_seed(0)

    def inputs(B, T, C, dtype):
        a = torch.rand(B, T, C, generator=gen, device=s.device, dtype=torch.float64) ** 0.25
        b = torch.randn(B, T, C, generator=gen, device=s.device, dtype=torch.float64)
        h0 = torch.randn(B, C, generator=gen, device=s.device, dtype=torch.float64)
        dh = torch.randn(B, T, C, generator=gen, device=s.device, dtype=torch.float64)
        return [x.to(dtype) for x in (a, b, h0)], dh.to(dtype)

    cases = [(torch.float32, (3, 1, 5), 1e-5), (torch.float32, (3, 1000, 300), 1e-5),
             (torch.float32, (2, 4097, 130), 1e-5), (torch.bfloat16, (3, 1000, 300), 2 ** -7),
             (torch.float64, (2, 333, 70), 1e-12)]
    if s.dry_run:
        cases = [(dt, (2, min(T, 40), 3), tol) for dt, (_, T, _), tol in cases]
    for dtype, (B, T, C), tol in cases:
        x, dh = inputs(B, T, C, dtype)
        got = _fwd_grads(lambda *v: minrnn.scan(*v, backend=s.scan_backend), x, dh)
        ref = _fwd_grads(lambda *v: minrnn.scan(*v, backend="sequential"), [v.double() for v in x], dh.double())
        err = _rel_err(got, ref)
        out.append(dict(check=f"{s.scan_backend} == sequential (float64), h and grads a, b, h0",
                        dtype=str(dtype)[6:], shape=[B, T, C], max_rel_err=err, tol=tol, ok=err <= tol))
    if isinstance(s.hgrn, str):
        out.append(dict(check="fla HGRN == minrnn scan", ok=None, note=s.hgrn))
        return out
    B, T, C = (2, 40, 3) if s.dry_run else (4, 2000, 256)
    (a, b, _), dh = inputs(B, T, C, torch.float32)
    ours = _fwd_grads(lambda a_, b_: minrnn.scan(a_, b_, backend=s.scan_backend), [a, b], dh)
    for name, fn in s.hgrn.items():
        if name.startswith("_"):
            continue
        # fla takes (x, g) with a = exp(g): compare h, d/dx = d/db, d/dg = a d/da
        h, dx, dg = _fwd_grads(fn, [b, a.log()], dh)
        err = _rel_err([h, dx, dg], [ours[0], ours[2], ours[1] * a.double()])
        out.append(dict(check=f"{name} == minrnn {s.scan_backend}, h and grads", dtype="float32",
                        shape=[B, T, C], max_rel_err=err, tol=1e-4, ok=err <= 1e-4))
    return out


# --- running, reporting -----------------------------------------------------------------


def run_rows(s: Setting) -> list[dict]:
    rows = []
    for table, table_ops in ops(s).items():
        for name, make in table_ops.items():
            for C in s.Cs:
                for T in s.Ts:
                    row = dict(table=table, op=name, B=s.B, T=T, C=C, dtype=str(s.dtype)[6:], ms=None, reps=0, note="")
                    if time.monotonic() > s.deadline:
                        row["note"] = "skipped: past --budget-s"
                    else:
                        try:
                            row["ms"], row["reps"] = s.measure(make(s, s.B, T, C))
                        except LookupError as e:  # an op that is not installed
                            row["note"] = f"skipped: {e}"
                        except torch.cuda.OutOfMemoryError:
                            row["note"] = "out of memory"
                        except Exception as e:  # fail soft: one broken row does not lose the rest
                            row["note"] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
                            traceback.print_exc()
                    if s.device.type == "cuda":
                        torch.cuda.empty_cache()
                    rows.append(row)
                    shown = f"{row['ms']:.3f} ms" if row["ms"] is not None else row["note"]
                    print(f"  {table:5s} {name:40s} C={C:5d} T={T:6d}  {shown}", flush=True)
    return rows


def markdown(rows: list[dict], s: Setting, gpu: str) -> str:
    lines = []
    titles = {"scan": "Scan h_t = a_t h_{t-1} + b_t", "layer": "One layer, input = hidden = C"}
    for table in ("scan", "layer"):
        sub = [r for r in rows if r["table"] == table]
        if table == "scan":  # the same measurements as the layer table's, for scale
            sub += [dict(r, op=r["op"] + " layer (for scale)") for r in rows if r["op"].startswith("cuDNN")]
        lines += ["", f"{titles[table]}: forward + backward, ms (median), B={s.B}, {str(s.dtype)[6:]}, {gpu}", "",
                  "| op | C | " + " | ".join(f"T={T}" for T in s.Ts) + " |",
                  "|---|---:|" + "---:|" * len(s.Ts)]
        ms = {(r["op"], r["C"], r["T"]): r["ms"] for r in sub}
        for name in dict.fromkeys(r["op"] for r in sub):
            for C in s.Cs:
                cells = [f"{ms[name, C, T]:.3f}" if ms[name, C, T] is not None else "-" for T in s.Ts]
                lines.append(f"| {name} | {C} | " + " | ".join(cells) + " |")
        names = list(dict.fromkeys(r["op"] for r in sub))
        for other, mine in ratios(table, names):  # above 1: minrnn's op is faster
            for C in s.Cs:
                cells = [f"{ms[other, C, T] / ms[mine, C, T]:.2f}x"
                         if ms[other, C, T] is not None and ms[mine, C, T] is not None else "-" for T in s.Ts]
                lines.append(f"| {other} / {mine} | {C} | " + " | ".join(cells) + " |")
    notes = sorted({f"{r['op']}: {r['note']}" for r in rows if r["note"]})
    if notes:
        lines += ["", "Notes:"] + [f"- {n}" for n in notes]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=None,
                    help="JSON results (default runs/gpu_scan.json; a dry run writes only when given one)")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="dtype of every timed op")
    ap.add_argument("--budget-s", type=float, default=240.0, help="skip the rows still to come after this many seconds")
    ap.add_argument("--dry-run", action="store_true", help="tiny CPU sizes, chunked backend and stand-ins; no GPU")
    args = ap.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        ap.error("no CUDA device: run on a GPU, or use --dry-run to check the script on the CPU")
    if not args.dry_run and not minrnn.ops.BACKENDS["triton"].available():
        ap.error("the triton backend is not available (is the triton package installed?)")
    torch.manual_seed(0)
    s = Setting(args.dry_run, DTYPES[args.dtype], args.budget_s)
    gpu = "CPU (dry run)" if args.dry_run else torch.cuda.get_device_name()
    print(f"# {gpu}; torch {torch.__version__}; checks first", flush=True)
    verdicts = checks(s)
    for v in verdicts:
        print(f"  check: {v}", flush=True)
    rows = run_rows(s)
    table = markdown(rows, s, gpu)
    print(table)
    out = args.out if args.out is not None else (None if args.dry_run else DEFAULT_OUT)
    if out is not None:
        triton_version = None
        try:
            import triton

            triton_version = triton.__version__
        except ImportError:
            pass
        meta = dict(
            gpu=gpu, dry_run=args.dry_run, date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            torch=torch.__version__, triton=triton_version, cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
            cudnn_allow_tf32=torch.backends.cudnn.allow_tf32, python=platform.python_version(),
            fla=None if isinstance(s.hgrn, str) else s.hgrn.get("_version", "stand-in"),
            B=s.B, Cs=list(s.Cs), Ts=list(s.Ts), dtype=args.dtype,
        )
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(dict(meta=meta, checks=verdicts, rows=rows, markdown=table), indent=1) + "\n")
        print(f"wrote {out}")
    failed = [v for v in verdicts if v.get("ok") is False]
    if failed:
        print(f"{len(failed)} correctness check(s) FAILED: see 'checks' above", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
