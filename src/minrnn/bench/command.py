"""The options of `minrnn bench` (also `python -m minrnn.bench`), and the run they make.

``add_arguments(parser)`` fills any argparse parser and returns the function that runs the
parsed arguments, so the `minrnn` command and this package's own ``main`` share one set of
options. Nothing heavy is imported until a run starts.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Callable
from pathlib import Path

from .. import argtypes
from .settings import DEFAULT_OUT, QUICK_OUT

HELP = ("time and measure minGRU/minLSTM against nn.GRU, nn.LSTM, their projections "
        "and a KV-cache Transformer (tables on stdout, JSON and PNG files)")


_positive_int, _positive_float, _device = argtypes.positive_int, argtypes.positive_float, argtypes.device


def add_arguments(p: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    """Add bench's options to ``p``; returns run(args) -> exit status."""
    p.add_argument("--suite", nargs="+", default=["all"], choices=["layers", "scan", "decode", "all"],
                   help="which suites to run (default: all)")
    p.add_argument("--quick", action="store_true",
                   help="tiny sizes, a few seconds: checks that everything runs, numbers mean nothing")
    p.add_argument("--lengths", nargs="+", type=_positive_int, metavar="T",
                   help="sequence lengths for the layers and scan suites (default 16 64 256 1024 4096 16384)")
    p.add_argument("--widths", nargs="+", type=_positive_int, metavar="D",
                   help="layer widths; the first is the main configuration (default 128 256)")
    p.add_argument("--batches", nargs="+", type=_positive_int, metavar="B",
                   help="batch sizes; the first is the main configuration (default 16 64)")
    p.add_argument("--contexts", nargs="+", type=_positive_int, metavar="N",
                   help="decoding context lengths (default 128 512 2048 8192)")
    p.add_argument("--decode-batches", nargs="+", type=_positive_int, metavar="B",
                   help="decoding batch sizes (default 1 32)")
    p.add_argument("--decode-window", type=_positive_int, metavar="N",
                   help="tokens decoded (and timed) at each context (default 64)")
    p.add_argument("--repeats", type=_positive_int, metavar="N",
                   help="timed repeats per candidate and size (median; default 7)")
    p.add_argument("--max-step-s", type=_positive_float, metavar="S",
                   help="skip a candidate whose single step takes longer (default 20)")
    p.add_argument("--budget-s", type=_positive_float, metavar="S",
                   help="seconds of timed repeats per candidate and size; fewer repeats beyond (default 10)")
    p.add_argument("--threads", type=_positive_int, metavar="N", help="torch.set_num_threads (default: every core)")
    p.add_argument("--device", type=_device, default="cpu", help="cpu (default) or cuda")
    p.add_argument("--out", type=Path, metavar="DIR",
                   help=f"output folder (default {DEFAULT_OUT}, or {QUICK_OUT} with --quick)")
    p.add_argument("--no-plot", action="store_true", help="write no PNG (no matplotlib needed)")
    p.add_argument("--malloc", choices=["retain", "system"], default="retain",
                   help="retain (default): keep freed memory mapped (glibc mallopt), so that one candidate's "
                        "frees are not the next one's page faults; system: the C library's defaults")
    return run


def run(args: argparse.Namespace) -> int:
    """Run the suites the parsed ``args`` ask for (``args.command_line`` is recorded if set)."""
    import dataclasses

    from .settings import Settings
    from .suites import run as run_suites

    s = Settings.make(
        quick=args.quick, lengths=args.lengths, widths=args.widths, batches=args.batches,
        decode_contexts=args.contexts, decode_batches=args.decode_batches, decode_window=args.decode_window,
        threads=args.threads, device=args.device,
        out=args.out or (QUICK_OUT if args.quick else DEFAULT_OUT),
        plots=not args.no_plot, malloc=args.malloc,
    )
    s.budget = dataclasses.replace(s.budget, **{k: v for k, v in (
        ("repeats", args.repeats), ("max_step_s", args.max_step_s), ("budget_s", args.budget_s)) if v is not None})
    run_suites(args.suite, s, command=getattr(args, "command_line", None) or "minrnn bench")
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m minrnn.bench [options]`."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="python -m minrnn.bench", description=HELP)
    runner = add_arguments(parser)
    args = parser.parse_args(argv)
    args.command_line = shlex.join(["python", "-m", "minrnn.bench", *argv])
    return runner(args)
