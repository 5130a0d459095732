"""The validation loss of a trained run with its weights in float32, bf16 and int8, as
`minrnn generate --dtype` builds them (minrnn.quantize.for_decoding), and the change from float32.

    python benchmarks/quantized_loss.py --run runs/shakespeare_char --threads 1

The loss is the run's own windowed evaluation (minrnn.training.loop.evaluate, the figure training
logs as val_loss): the run's eval_windows windows of seq_len tokens spread evenly over the split,
or ``--windows N`` of them (``--windows 0``: every non-overlapping window, the whole split).
Each dtype scores the same windows; the recurrent state stays float32 in every one. Prints a
Markdown table and writes the figures, the command and the versions as JSON to --out
(default runs/quantized_loss.json).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import time
from pathlib import Path

import torch


def split_tokens(config, tokenizer, split: str) -> torch.Tensor:
    """The token ids (1-D int64, or a prepared folder's TokenStream) of ``split`` of the run's data."""
    from minrnn.data.shards import is_prepared
    from minrnn.data.text import DataError, load_splits
    from minrnn.training.loop import prepared_split

    if is_prepared(config.data):
        return prepared_split(config.data, split, tokenizer)
    splits = load_splits(config.data, config.data_dir or None)
    if split not in splits:
        raise DataError(f"data {config.data} has no {split} split; it has {', '.join(splits)}")
    return torch.tensor(tokenizer.encode(splits[split]), dtype=torch.long)


def dtype_losses(model, tokens, config, dtypes=None) -> dict[str, dict]:
    """{dtype: {"loss", "change", "seconds"}} over ``dtypes`` (default every one of
    minrnn.quantize.DTYPES, float32 first): the windowed evaluation loss of ``model`` (a CPU
    MinRNNForCausalLM) with its weights converted by for_decoding, and its relative change from
    float32's loss."""
    from minrnn.quantize import DTYPES, for_decoding
    from minrnn.training.loop import evaluate

    dtypes = list(dtypes or DTYPES)
    if "float32" not in dtypes:
        raise ValueError(f"dtypes must include 'float32' (the changes are measured from it), got {dtypes}")
    out = {}
    for dtype in ["float32"] + [d for d in dtypes if d != "float32"]:
        converted = for_decoding(model, dtype)
        start = time.perf_counter()
        loss = evaluate(converted, tokens, config, "cpu")
        out[dtype] = {"loss": loss, "seconds": time.perf_counter() - start}
    base = out["float32"]["loss"]
    for row in out.values():
        row["change"] = (row["loss"] - base) / base
    return out


def markdown(results: dict[str, dict]) -> str:
    lines = ["| weights | val loss | change from float32 |", "|---|---|---|"]
    for dtype, row in results.items():
        lines.append(f"| {dtype} | {row['loss']:.4f} | {100 * row['change']:+.3f}% |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, type=Path, help="a run folder (out_dir of minrnn train)")
    p.add_argument("--checkpoint", choices=["latest", "best"], default="latest")
    p.add_argument("--split", default="valid", choices=["train", "valid", "test"])
    p.add_argument("--windows", type=int, default=None,
                   help="windows scored (default: the run's eval_windows; 0: every non-overlapping window)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--out", type=Path, default=Path("runs/quantized_loss.json"))
    args = p.parse_args(argv)
    if args.windows is not None and args.windows < 0:
        p.error(f"--windows must be >= 0 (0: every window), got {args.windows}")
    if args.threads < 1:
        p.error(f"--threads must be >= 1, got {args.threads}")

    from minrnn.data.text import check_long_enough
    from minrnn.training.loop import load_run

    torch.set_num_threads(args.threads)
    config, tokenizer, model, path = load_run(args.run, args.checkpoint, "cpu")
    tokens = split_tokens(config, tokenizer, args.split)
    check_long_enough(tokens, config.seq_len, args.split)
    if args.windows is not None:
        config = dataclasses.replace(config, eval_windows=args.windows or len(tokens) // config.seq_len)
    results = dtype_losses(model, tokens, config)
    print(f"{path}, {args.split} split: {config.eval_windows} windows of {config.seq_len} tokens")
    print(markdown(results))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "command": " ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:])),
        "checkpoint": str(path), "split": args.split, "windows": config.eval_windows, "seq_len": config.seq_len,
        "threads": args.threads, "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
