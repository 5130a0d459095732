"""The loss of compare runs read beyond their training context: windowed and stateful.

    python benchmarks/beyond_context.py runs/ctx/wikitext2-context256/runs/{mingru,minlstm,llama,lstm} \
        "minGRU n=4=runs/ctx-n4/wikitext2-context256/runs/mingru" --length 4096 \
        --plot docs/results/assets/beyond-context/loss-by-position.png

Each RUN (a run folder of `minrnn compare --keep-weights`, optionally ``LABEL=RUN``) is loaded
with minrnn.experiments.loading and read on its evaluation split (``--split``; default: the
split its preset evaluates on):

- windowed: ``--windows`` windows of ``--length`` tokens spread evenly over the split (default:
  as many as fit side by side, so nearly every token is read once), each read from its start
  (`position_losses`). The mean loss over a window's first L positions is the loss of windows
  of L tokens scored from their start (sliding windows with stride = context), here for each L
  of ``--contexts``; the per-bucket losses are the loss-by-position curve that ``--plot`` draws.
- stateful (models that carry a fixed-size state: minGRU, minLSTM, nn.LSTM/GRU): the whole
  split in one pass, ``--chunk`` tokens at a time with the state carried (`stateful_loss`).

Each run's figures go to ``--out/LABEL.json`` (kept: a rerun reads only the runs it has not
read yet), the table to ``--out/results.md`` and stdout.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
import time
from pathlib import Path


def windowed(buckets: list[dict], context: int) -> float:
    """Mean loss over positions [0, context) from `position_losses` buckets; ``context`` must be a
    bucket edge (a power of two within the windows' length, or the length itself)."""
    if not any(b["to"] == context for b in buckets):
        raise ValueError(f"context {context} is not a bucket edge of windows of {buckets[-1]['to']}: give powers "
                         "of two up to --length")
    return sum(b["loss"] * (b["to"] - b["from"]) for b in buckets if b["to"] <= context) / context


def read_run(run_dir: Path, args) -> dict:
    """The figures of one compare run (see the module docstring)."""
    import torch

    from minrnn.data.text import load_splits
    from minrnn.experiments.loading import compare_logits, load_compare_run
    from minrnn.training.evaluation import position_losses, stateful_loss, stateful_refusal

    run = load_compare_run(run_dir, args.device)
    split = args.split or run.eval_split
    text = load_splits(run.config.data, None, splits=(split,))[split]
    tokens = torch.tensor(run.tokenizer.encode(text), dtype=torch.long)
    count = args.windows or max(1, (len(tokens) - 1) // args.length)
    start = time.perf_counter()
    positions = position_losses(lambda x, **e: compare_logits(run.model, x, **e), tokens, args.length, count,
                                args.device, args.batch_size)
    result = json.loads((run_dir / "result.json").read_text())
    out = {"run": str(run_dir), "model": run.spec.model, "options": run.spec.options, "lr": result["lr"],
           "params": result["params"], "train_length": run.config.seq_len, "split": split,
           "split_tokens": len(tokens), "val_loss": result["final_val"], "positions": positions,
           "windowed": {str(c): windowed(positions["buckets"], c) for c in args.contexts}}
    if stateful_refusal(run.model) is None:
        out["stateful"] = stateful_loss(run.model, tokens, args.chunk, args.device)
    out["seconds"] = time.perf_counter() - start
    return out


def table(results: dict[str, dict], contexts: list[int]) -> str:
    """Markdown: perplexity (exp of the mean loss) windowed at each context, and stateful."""
    head = ["model", "params", "lr"] + [f"window {c}" for c in contexts] + ["stateful (whole split)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, r in results.items():
        cells = [label, f"{r['params'] / 1e6:.2f}M", f"{r['lr']:g}"]
        cells += [f"{math.exp(r['windowed'][str(c)]):.1f}" for c in contexts]
        cells.append(f"{math.exp(r['stateful']['loss']):.1f}" if "stateful" in r else "n/a")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def bucket_table(results: dict[str, dict]) -> str:
    """Markdown: the mean loss (nats) in each position bucket from half the training length on,
    on the same tokens for every run (the buckets of `position_losses`)."""
    first = next(iter(results.values()))
    buckets = [b for b in first["positions"]["buckets"] if b["to"] > first["train_length"] // 2]
    head = ["model"] + [f"{b['from']}-{b['to'] - 1}" for b in buckets]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, r in results.items():
        loss = {(b["from"], b["to"]): b["loss"] for b in r["positions"]["buckets"]}
        lines.append("| " + " | ".join([label] + [f"{loss[b['from'], b['to']]:.3f}" for b in buckets]) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", metavar="[LABEL=]RUN", help="compare run folders (kept weights)")
    ap.add_argument("--length", type=int, default=4096, help="the windows' length (default 4096)")
    ap.add_argument("--contexts", default="256,512,1024,2048,4096",
                    help="comma-separated contexts of the windowed table (powers of two up to --length)")
    ap.add_argument("--windows", type=int, default=None, help="windows read (default: as many as fit side by side)")
    ap.add_argument("--chunk", type=int, default=4096, help="tokens per call of the stateful pass")
    ap.add_argument("--batch-size", type=int, default=2, help="windows per call")
    ap.add_argument("--split", choices=["train", "valid", "test"], default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("runs/beyond_context"))
    ap.add_argument("--plot", type=Path, default=None, help="the loss by position of every run in one PNG")
    args = ap.parse_args(argv)
    args.contexts = [int(c) for c in args.contexts.split(",")]
    if max(args.contexts) > args.length:
        ap.error(f"--contexts go up to {max(args.contexts)}, beyond --length {args.length}")

    import torch

    from minrnn.training.evaluation import plot_positions

    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    results = {}
    for item in args.runs:
        # a run's name may hold "=" (a sweep value): a folder that exists is a run without a label
        label, _, path = ("", "", item) if Path(item).is_dir() else item.rpartition("=")
        run_dir = Path(path)
        label = label or json.loads((run_dir / "spec.json").read_text())["model"]
        cache = args.out / (label.replace(" ", "_").replace("/", "_") + ".json")
        if cache.exists() and json.loads(cache.read_text())["run"] == str(run_dir):
            results[label] = json.loads(cache.read_text())
            continue
        print(f"reading {label} ({run_dir})", file=sys.stderr, flush=True)
        results[label] = read_run(run_dir, args)
        cache.write_text(json.dumps(results[label], indent=1))
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {args.threads} thread(s)"
    md = (f"{table(results, args.contexts)}\n\nPerplexity on the {next(iter(results.values()))['split']} split; "
          f"windows of {args.length} tokens; {args.device}, {machine}; "
          f"{datetime.date.today().isoformat()}.\n\nLoss (nats) by position:\n\n{bucket_table(results)}\n")
    (args.out / "results.md").write_text(md)
    print(md)
    if args.plot:
        train_length = next(iter(results.values()))["train_length"]
        plot_positions({label: r["positions"] for label, r in results.items()}, args.plot, train_length)
        print(f"written: {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
