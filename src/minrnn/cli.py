"""The `minrnn` command (also `python -m minrnn`).

Each subcommand is one function decorated with ``@subcommand``: it receives its own
argparse parser, adds its options, and returns the function that runs it on the
parsed arguments (returning an exit status). Adding `minrnn train` is adding one such
function; the heavy imports go inside the runner, so `minrnn --help` stays fast.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Callable, Optional

Runner = Callable[[argparse.Namespace], Optional[int]]
_SUBCOMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], Runner]]] = {}


def subcommand(name: str, help: str):
    """Register ``fn(parser) -> runner`` as `minrnn <name>`."""

    def register(fn: Callable[[argparse.ArgumentParser], Runner]):
        _SUBCOMMANDS[name] = (help, fn)
        return fn

    return register


def _positive_int(text: str) -> int:
    v = int(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return v


def _positive_float(text: str) -> float:
    v = float(text)
    if not v > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
    return v


def _device(text: str):
    import torch

    try:
        device = torch.device(text)
    except RuntimeError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"expected cpu or cuda, got {text}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError("CUDA is not available on this machine")
    return device


@subcommand("bench", "time and measure minGRU/minLSTM against nn.GRU, nn.LSTM, their projections "
                     "and a KV-cache Transformer (tables on stdout, JSON and PNG files)")
def bench(p: argparse.ArgumentParser) -> Runner:
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
                   help="decoding context lengths (default 128 256 ... 8192)")
    p.add_argument("--repeats", type=_positive_int, metavar="N", help="timed repeats per candidate and size (median; default 7)")
    p.add_argument("--max-step-s", type=_positive_float, metavar="S",
                   help="skip a candidate whose single step takes longer (default 20)")
    p.add_argument("--budget-s", type=_positive_float, metavar="S",
                   help="seconds of timed repeats per candidate and size; fewer repeats beyond (default 10)")
    p.add_argument("--threads", type=_positive_int, metavar="N", help="torch.set_num_threads (default: every core)")
    p.add_argument("--device", type=_device, default="cpu", help="cpu (default) or cuda")
    p.add_argument("--out", type=Path, metavar="DIR",
                   help="output folder (default benchmarks/results, or benchmarks/results/quick with --quick)")
    p.add_argument("--no-plot", action="store_true", help="write no PNG (no matplotlib needed)")

    def run(args: argparse.Namespace) -> int:
        import dataclasses

        from . import bench as B

        s = B.Settings.make(
            quick=args.quick, lengths=args.lengths, widths=args.widths, batches=args.batches,
            decode_contexts=args.contexts, threads=args.threads, device=args.device,
            out=args.out or Path("benchmarks/results/quick" if args.quick else "benchmarks/results"),
            plots=not args.no_plot,
        )
        s.budget = dataclasses.replace(s.budget, **{k: v for k, v in (
            ("repeats", args.repeats), ("max_step_s", args.max_step_s), ("budget_s", args.budget_s)) if v is not None})
        B.run(args.suite, s, command=args.command_line)
        return 0

    return run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="minrnn", description="minGRU and minLSTM (Feng et al. 2024) for PyTorch")
    sub = parser.add_subparsers(dest="subcommand", metavar="COMMAND", required=True)
    for name, (help, fn) in _SUBCOMMANDS.items():
        sp = sub.add_parser(name, help=help, description=help)
        sp.set_defaults(runner=fn(sp))
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.command_line = shlex.join(["minrnn", *argv])
    return args.runner(args) or 0


if __name__ == "__main__":
    sys.exit(main())
