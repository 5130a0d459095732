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
from collections.abc import Callable
from pathlib import Path

from . import argtypes

Runner = Callable[[argparse.Namespace], int | None]
_SUBCOMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], Runner]]] = {}


def subcommand(name: str, help: str):
    """Register ``fn(parser) -> runner`` as `minrnn <name>`."""

    def register(fn: Callable[[argparse.ArgumentParser], Runner]):
        _SUBCOMMANDS[name] = (help, fn)
        return fn

    return register



_positive_int, _positive_float, _device = argtypes.positive_int, argtypes.positive_float, argtypes.device


@subcommand("bench", "time and measure minGRU/minLSTM against nn.GRU, nn.LSTM, their projections "
                     "and a KV-cache Transformer (tables on stdout, JSON and PNG files)")
def bench(p: argparse.ArgumentParser) -> Runner:
    from .bench.command import add_arguments  # imports no torch: `minrnn --help` stays fast

    return add_arguments(p)


@subcommand("prepare", "tokenize text files, JSONL/Parquet or a datasets dataset once into token shards "
                       "(any tokenizer) that minrnn train --data DIR memory-maps")
def prepare(p: argparse.ArgumentParser) -> Runner:
    from .data.prepare import add_arguments  # datasets, tokenizers and transformers wait for a run

    run = add_arguments(p)
    return lambda args: _run_reporting_user_errors(run, args)


# --- training, generation, evaluation -------------------------------------------------------
# A user error (bad config key, missing file, damaged checkpoint, bad prompt) prints one line
# to stderr and exits with status 2; a traceback is kept for bugs.

def _user_errors():
    from .data.text import DataError
    from .data.tokenizers import TokenizerError, VocabularyError
    from .experiments.plan import CompareError
    from .experiments.presets import PresetError
    from .training.checkpoint import CheckpointError
    from .training.config import ConfigError
    from .training.run_folder import RunFolderError, RunInUseError

    # FloatingPointError: a diverged run (non-finite loss), reported with the step
    return (ConfigError, DataError, VocabularyError, TokenizerError, CheckpointError, RunFolderError, RunInUseError,
            FileNotFoundError, FloatingPointError, CompareError, PresetError)


def _run_reporting_user_errors(fn, args) -> int:
    try:
        return fn(args) or 0
    except _user_errors() as e:
        print(f"minrnn {args.subcommand}: error: {e}", file=sys.stderr)
        return 2


def _start_text(tokenizer) -> str:
    """A newline, or (a character vocabulary without one) its first character."""
    return "\n" if getattr(tokenizer, "index", {"\n": 0}).get("\n") is not None else tokenizer.decode([0])


@subcommand("train", "train a minGRU/minLSTM language model from a TOML config or a shipped preset "
                     "(e.g. shakespeare_char), resumable with --resume; works under torchrun")
def train(p: argparse.ArgumentParser) -> Runner:
    import dataclasses

    from .training.config import TrainConfig, list_presets

    keys = [f"{f.name}={getattr(TrainConfig(), f.name)!r}" for f in dataclasses.fields(TrainConfig) if f.name != "model"]
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = ("presets: " + ", ".join(list_presets()) + "\nconfig keys (default):\n" + "\n".join(f"  {k}" for k in keys)
                + "\nmodel keys ([model] table, --model.KEY): the fields of minrnn.MinRNNConfig "
                  "(hidden_size, num_hidden_layers, cell, expansion_factor, use_conv, dropout, ...)")
    p.add_argument("config", metavar="CONFIG", help="a TOML (or YAML) file, the name of a shipped preset, or a "
                                                  "run folder (its config.toml: RUN --resume continues it)")
    p.add_argument("overrides", nargs=argparse.REMAINDER, metavar="--key value",
                   help="override any config key, e.g. --steps 100 --model.hidden_size 128 --data FILE; "
                        "--data DIR: a prepared folder (minrnn prepare), read memory-mapped with its own "
                        "tokenizer; --pack-documents (prepared folders): windows start at documents and the "
                        "model's state resets at each; --stateful: each batch row reads a contiguous stream and the "
                        "model's state is carried from step to step; --compile: torch.compile the model (any "
                        "true/false key stands alone for true); --resume continues the run in out_dir from its newest "
                        "good checkpoint; --overwrite replaces a run already in out_dir")

    def run(args: argparse.Namespace) -> int:
        from .training.config import field_types, find_config, parse_overrides
        from .training.loop import Trainer

        switches = tuple(k for k, t in field_types().items() if t is bool)
        overrides, flags = parse_overrides(args.overrides, flags=("resume", "overwrite"), switches=switches)
        config = TrainConfig.from_file(find_config(args.config), overrides)
        trainer = Trainer(config, resume="resume" in flags, overwrite="overwrite" in flags)
        try:
            trainer.train()
            if trainer.dist.is_main and config.sample_tokens:
                from .training.sampling import sample

                print("--- sample ---", flush=True)
                sample(trainer.model, trainer.tokenizer, _start_text(trainer.tokenizer), config.sample_tokens,
                       temperature=0.8, top_k=None, seed=config.seed)
                print(flush=True)
        finally:
            trainer.close()
        return 0

    return lambda args: _run_reporting_user_errors(run, args)


@subcommand("generate", "stream text from a trained run (minrnn train's output folder)")
def generate(p: argparse.ArgumentParser) -> Runner:
    p.add_argument("--run", required=True, type=Path, metavar="DIR", help="the run folder (out_dir of minrnn train)")
    p.add_argument("--prompt", default="\n", help="text to continue (default: a newline)")
    p.add_argument("--tokens", type=_positive_int, default=200, help="new tokens to generate (default 200)")
    p.add_argument("--temperature", type=_positive_float, default=0.8, help="sampling temperature (default 0.8)")
    p.add_argument("--top-k", type=_positive_int, default=None, help="sample from the k most likely tokens only")
    p.add_argument("--greedy", action="store_true", help="always take the most likely token")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--checkpoint", choices=["latest", "best"], default="latest")
    p.add_argument("--device", type=_device, default="cpu")
    p.add_argument("--dtype", choices=["float32", "bf16", "int8"], default="float32",
                   help="the weights while generating on the CPU: float32 (default), bf16, or int8 (int8 weights "
                        "and matmuls, torch's dynamic quantization); the recurrent state stays float32")

    def run(args: argparse.Namespace) -> int:
        from .data.tokenizers import VocabularyError
        from .quantize import for_decoding
        from .training.loop import load_run
        from .training.sampling import sample

        _, tokenizer, model, _ = load_run(args.run, args.checkpoint, args.device)
        model = for_decoding(model, args.dtype)
        if not tokenizer.encode(args.prompt):  # a prompt the vocabulary lacks fails before anything is printed
            raise VocabularyError("the prompt encodes to no tokens; give at least one character")
        sys.stdout.write(args.prompt)
        sample(model, tokenizer, args.prompt, args.tokens, temperature=None if args.greedy else args.temperature,
               top_k=args.top_k, seed=args.seed)
        print(flush=True)
        return 0

    return lambda args: _run_reporting_user_errors(run, args)


@subcommand("eval", "loss, perplexity and bits per character/byte of a trained run on a data split: evenly spaced "
                    "windows, the whole split in sliding windows (--context, --stride), or one stateful pass")
def evaluate(p: argparse.ArgumentParser) -> Runner:
    p.add_argument("--run", required=True, type=Path, metavar="DIR",
                   help="the run folder: out_dir of minrnn train, or a run of minrnn compare --keep-weights "
                        "(OUT/EXPERIMENT-PRESET/runs/MODEL)")
    p.add_argument("--split", default=None, choices=["train", "valid", "test"],
                   help="default: valid (a compare run: the split its preset evaluates on)")
    p.add_argument("--checkpoint", choices=["latest", "best"], default="latest",
                   help="minrnn train runs (a compare run keeps only its final weights)")
    p.add_argument("--data", default=None, help="score this data instead of the run's (same forms as train's --data)")
    p.add_argument("--device", type=_device, default="cpu")
    p.add_argument("--context", type=_positive_int, default=None, metavar="N",
                   help="score every token of the split, each with up to N tokens before it (default with --stride: "
                        "the run's seq_len); with --stateful, the chunk the split is read in")
    p.add_argument("--stride", type=_positive_int, default=None, metavar="S",
                   help="sliding windows advance S tokens (at most --context; default --context: disjoint windows)")
    p.add_argument("--stateful", action="store_true",
                   help="minGRU/minLSTM runs: one pass over the whole split, the state carried from chunk to chunk")
    p.add_argument("--batch-size", type=_positive_int, default=None, metavar="B",
                   help="sliding windows scored at once (default: the run's batch_size)")
    p.add_argument("--positions", type=_positive_int, default=None, metavar="L",
                   help="the mean loss by position (buckets 0, 1, 2-3, 4-7, ...) over windows of L tokens, e.g. "
                        "16 times the run's seq_len: how the loss goes beyond the training context")
    p.add_argument("--windows", type=_positive_int, default=None, metavar="W",
                   help="--positions: windows spread evenly over the split (default: the run's eval_windows)")
    p.add_argument("--plot", type=Path, default=None, metavar="PNG",
                   help="--positions: draw the loss by position into this PNG file")

    def run(args: argparse.Namespace) -> int:
        import json
        import math

        import torch

        from .data.shards import is_prepared
        from .data.text import DataError, check_long_enough, load_splits
        from .training.config import ConfigError
        from .training.evaluation import spread_windows_loss
        from .training.loop import prepared_split
        from .training.optim import autocast_context

        whole = args.context is not None or args.stride is not None or args.stateful
        if args.plot is not None and args.positions is None:
            raise ConfigError("--plot draws the loss by position: give --positions L")
        if args.positions is not None and (args.stateful or args.stride is not None or args.context is not None):
            raise ConfigError("--positions reads whole windows from their start; it takes no --context, --stride "
                              "or --stateful")
        if args.stateful and args.stride is not None:
            raise ConfigError("--stride does not apply to --stateful (every token is scored once, with all before it)")
        config, tokenizer, model, path, logits_of, args.split = _load_for_eval(args)
        context = args.context or config.seq_len
        stride = args.stride or context
        if not args.stateful and stride > context:
            raise ConfigError(f"--stride ({stride}) must not exceed --context ({context}): tokens would go unscored")
        text = None
        if is_prepared(args.data or config.data):  # token shards
            tokens = prepared_split(args.data or config.data, args.split, tokenizer)
        else:
            splits = load_splits(args.data or config.data, config.data_dir or None, splits=(args.split,))
            if args.split not in splits:
                raise DataError(f"data {args.data or config.data} has no {args.split} split; it has "
                                f"{', '.join(splits)}")
            text = splits[args.split]
            try:
                tokens = torch_tensor(tokenizer.encode(text))
            except ValueError as e:
                raise DataError(f"the {args.split} split: {e}") from None
        result = {"checkpoint": str(path), "split": args.split}
        if args.positions is not None:
            result.update(_by_position(model, logits_of, tokens, config, args))
        elif whole:
            result.update(_whole_split(model, logits_of, tokens, config, args, context, stride))
        else:
            check_long_enough(tokens, config.seq_len, args.split)
            device = torch.device(args.device)
            result["loss"] = spread_windows_loss(lambda x, **extras: logits_of(model, x, **extras), tokens,
                                                 config.seq_len, config.eval_windows, device, config.batch_size,
                                                 config.pack_documents, lambda: autocast_context(config, device))
        result["perplexity"] = math.exp(result["loss"])
        if text is not None:  # bits per character/byte: nats per token times tokens per unit, over the whole split
            n_units = len(text) if tokenizer.unit == "char" else len(text.encode("utf-8"))
            unit = "character" if tokenizer.unit == "char" else "byte"
            result[f"bits_per_{unit}"] = result["loss"] / math.log(2) * len(tokens) / n_units
        print(json.dumps(result))
        return 0

    return lambda args: _run_reporting_user_errors(run, args)


def _load_for_eval(args):
    """(config, tokenizer, model in eval mode, weights path, logits_of(model, x, **extras), split)
    of ``args.run``: a minrnn train run folder, or a compare run (spec.json, weights.pt)."""
    from .experiments.loading import compare_logits, is_compare_run, load_compare_run
    from .training.config import ConfigError
    from .training.loop import lm_logits, load_run

    if not is_compare_run(args.run):
        return (*load_run(args.run, args.checkpoint, args.device), lm_logits, args.split or "valid")
    if args.checkpoint != "latest":
        raise ConfigError("--checkpoint: a compare run keeps only its final weights (weights.pt)")
    run = load_compare_run(args.run, args.device)
    return run.config, run.tokenizer, run.model, run.weights, compare_logits, args.split or run.eval_split


def _by_position(model, logits_of, tokens, config, args) -> dict:
    """`minrnn eval --positions L`: the mean loss by position bucket over windows of L tokens."""
    import torch

    from .data.text import DataError
    from .training.evaluation import plot_positions, position_losses
    from .training.optim import autocast_context

    device = torch.device(args.device)
    try:
        result = position_losses(lambda x, **extras: logits_of(model, x, **extras), tokens, args.positions,
                                 args.windows or config.eval_windows, device, args.batch_size or config.batch_size,
                                 config.pack_documents, lambda: autocast_context(config, device))
    except ValueError as e:
        raise DataError(f"--positions {args.positions} on the {args.split} split: {e}") from None
    if args.plot:
        plot_positions({str(args.run): result}, args.plot, config.seq_len)
    return result


def _whole_split(model, logits_of, tokens, config, args, context: int, stride: int) -> dict:
    """`minrnn eval --context/--stride/--stateful`: loss over every token of the split, tokens/s."""
    import torch

    from .data.text import DataError
    from .training.config import ConfigError
    from .training.evaluation import sliding_window_loss, stateful_loss, stateful_refusal
    from .training.optim import autocast_context

    device = torch.device(args.device)
    if len(tokens) < 2:
        raise DataError(f"the {args.split} split has {len(tokens)} token(s); scoring needs at least 2")
    autocast = lambda: autocast_context(config, device)  # noqa: E731
    if args.stateful:
        reason = stateful_refusal(model)
        if reason:
            raise ConfigError(reason)
        out = stateful_loss(model, tokens, context, device, config.pack_documents, autocast)
        return {**out, "stateful": True, "chunk": context}
    out = sliding_window_loss(lambda x, **extras: logits_of(model, x, **extras), tokens, context, stride, device,
                              args.batch_size or config.batch_size, config.pack_documents, autocast)
    return {**out, "context": context, "stride": stride}


@subcommand("compare", "train every model of an experiment's preset with the same engine (resumable), "
                       "then write a Markdown table and plots to OUT/EXPERIMENT-PRESET/")
def compare(p: argparse.ArgumentParser) -> Runner:
    from .experiments import experiment_names  # the presets folder's files; imports no torch

    p.add_argument("experiment", metavar="EXPERIMENT",
                   help=f"one of {', '.join(experiment_names())} (a TOML file of minrnn/experiments/configs "
                        "each; hyphens allowed); text trains on your own corpus (--data FILE)")
    p.add_argument("--preset", default="cpu", help="a table of the experiment's file: cpu (default), paper, "
                                                   "or another the file has (wikitext2: full, cpu_tuned)")
    p.add_argument("--data", default=None, metavar="FILE",
                   help="text only: a text file (split 90/10 into train and validation), a folder of "
                        "train/valid files or a named corpus; or, for any text preset, a prepared folder "
                        "(minrnn prepare: its train and valid splits, its tokenizer)")
    p.add_argument("--tokenizer", default=None, choices=["char", "byte", "bpe"],
                   help="text only: the tokenizer (default: the preset's, char)")
    p.add_argument("--pack-documents", action="store_true",
                   help="with a prepared folder: windows start at documents and each model resets at every "
                        "document start (models that cannot, lstm, gru and mamba, are refused)")
    p.add_argument("--stateful", action="store_true",
                   help="text experiments: each batch row reads a contiguous stream and the model's state is carried "
                        "from step to step (models of a fixed-size state only: minRNNs without attention, lstm, gru)")
    p.add_argument("--compile", action="store_true", help="run each model under torch.compile")
    p.add_argument("--models", default=None, metavar="A,B,...",
                   help="comma-separated subset of the preset's models (default: all of them)")
    p.add_argument("--tasks", default=None, metavar="A,B,...", help="chomsky only: a subset of the tasks")
    p.add_argument("--steps", type=_positive_int, default=None, help="override the preset's training steps")
    p.add_argument("--eval-every", type=_positive_int, default=None, help="override the preset's eval interval")
    p.add_argument("--budget-s", type=_positive_float, default=None, metavar="S",
                   help="stop each run after S seconds of training (the table says where it stopped)")
    p.add_argument("--lr", type=_positive_float, default=None,
                   help="peak learning rate for every run instead of the preset's (min_lr scaled alike); "
                        "use another --out for a sweep")
    p.add_argument("--no-sweep", action="store_true", help="skip the preset's sweep (e.g. depth 1, 2, 3): "
                                                            "the preset's own depth only")
    p.add_argument("--set", action="append", default=[], metavar="MODEL.KEY=VALUE", dest="options",
                   help="a build option for one model's runs on top of the preset's, e.g. "
                        "mingru.decay_bias=3.0 (repeatable); use another --out")
    p.add_argument("--optim", action="append", default=[], metavar="KEY=VALUE",
                   help="an optimiser setting for every run on top of the preset's: weight_decay, beta1, beta2, "
                        "grad_clip, warmup_steps, min_lr, decay_recurrence or fused_optimizer (repeatable); use another --out")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("runs/compare"), help="default: runs/compare/")
    p.add_argument("--device", type=_device, default="cpu", help="cpu (default) or cuda")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="bfloat16 trains under autocast (default float32)")
    p.add_argument("--data-dir", default=None, help="where corpora are looked for (else MINRNN_DATA_DIR)")
    p.add_argument("--no-progress", action="store_true", help="log lines instead of progress bars")
    p.add_argument("--threads", type=_positive_int, default=None,
                   help="CPU threads per run (torch, OpenMP, numba); default: every core")
    p.add_argument("--in-process", action="store_true",
                   help="train every run in this process instead of one process each (what a program that "
                        "calls minrnn.cli.main has registered, models, corpora or cells, is then known to the runs)")
    p.add_argument("--keep-weights", action="store_true",
                   help="each run trained now also writes its final weights to RUN/weights.pt "
                        "(a torch state dict, for analyses of your own)")

    def run(args: argparse.Namespace) -> int:
        from .experiments.compare import CompareConfig
        from .experiments.compare import compare as run_compare
        from .experiments.plan import parse_optim, parse_options

        split = (lambda text: [t.strip() for t in text.split(",") if t.strip()] if text else None)
        config = CompareConfig(
            args.experiment, args.preset, models=split(args.models), tasks=split(args.tasks), data=args.data,
            tokenizer=args.tokenizer, steps=args.steps, eval_every=args.eval_every, seed=args.seed,
            device=str(args.device), dtype=args.dtype, data_dir=args.data_dir, sweep=not args.no_sweep,
            budget_s=args.budget_s, lr=args.lr, options=parse_options(args.options), optim=parse_optim(args.optim),
            out=str(args.out), isolate=not args.in_process, threads=args.threads, progress=not args.no_progress,
            keep_weights=args.keep_weights, pack_documents=args.pack_documents, stateful=args.stateful,
            compile=args.compile)
        md = run_compare(config)
        print(md.read_text())
        print(f"written: {md} and the plots beside it")
        return 0

    return lambda args: _run_reporting_user_errors(run, args)


@subcommand("export", "write a trained run as ONNX graphs (the prefill and the one-token step, the state in "
            "and out) for onnxruntime")
def export(p: argparse.ArgumentParser) -> Runner:
    p.add_argument("--run", required=True, type=Path, metavar="DIR", help="the run folder (out_dir of minrnn train)")
    p.add_argument("--format", choices=["onnx"], default="onnx", help="the graph format (default onnx)")
    p.add_argument("--out", required=True, type=Path, metavar="DIR",
                   help="folder that receives prefill.onnx, step.onnx and the run's tokenizer.json")
    p.add_argument("--prompt-length", type=_positive_int, default=16,
                   help="tokens the prefill graph reads (default 16; other lengths go through the step graph)")
    p.add_argument("--batch", type=_positive_int, default=1, help="rows of both graphs (default 1)")
    p.add_argument("--checkpoint", choices=["latest", "best"], default="latest")

    def run(args: argparse.Namespace) -> int:
        from .export import export_onnx
        from .training.loop import load_run

        _, tokenizer, model, _ = load_run(args.run, args.checkpoint, "cpu")
        paths = export_onnx(model, args.out, batch=args.batch, prompt_length=args.prompt_length)
        # in the tokenizers library's format, whatever the run saved: readable without minrnn or torch
        tokenizer.to_hf().save(str(args.out / "tokenizer.json"))
        for name, file in paths.items():
            print(f"written: {file} ({name})")
        return 0

    return lambda args: _run_reporting_user_errors(run, args)

def torch_tensor(ids):
    import torch

    return torch.tensor(ids, dtype=torch.long)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="minrnn", description="minGRU and minLSTM (Feng et al. 2024) for PyTorch")
    parser.add_argument("--version", action="version", version=f"minrnn {__version__}")
    sub = parser.add_subparsers(dest="subcommand", metavar="COMMAND", required=True)
    for name, (help, fn) in _SUBCOMMANDS.items():
        sp = sub.add_parser(name, help=help, description=help)
        sp.set_defaults(runner=fn(sp))
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.command_line = shlex.join(["minrnn", *argv])
    return args.runner(args) or 0


if __name__ == "__main__":
    sys.exit(main())
