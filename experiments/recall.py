"""Where a language model's loss goes: tokens it could copy from its context against the rest.

Answers "is the gap between a recurrent language model and a Transformer on tokens it could
have copied from its window?". Run from the repository root on run folders of the training
engine (``minrnn train``: config.toml, the tokenizer and checkpoints/), the first run being
the baseline of the difference table:

    python experiments/recall.py runs/llama runs/mingru --split valid --out runs/recall.md

Every target token of the scored windows (by default the run's own evaluation windows, so
``overall_loss`` is what `minrnn eval` prints for that split) falls in one of three classes,
decided from its window alone:

    bigram    the pair (current token, target) already occurred earlier in the window: an
              induction-style copy ("... Harry Potter ... Harry -> Potter") would predict it
    token     the target occurred earlier in the window, but never right after the current token
    new       the target does not occur earlier in the window

Attention can look such repeats up exactly; a recurrent model must have kept them in its
fixed-size state. Arora et al. 2023 ("Zoology", arXiv 2312.04927) found that most of the
perplexity gap between attention and gated-convolution / linear-recurrent language models sits
on the first class; this measures the same thing for minrnn's runs.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from minrnn.experiments.report import write_table

CLASSES = ("bigram", "token", "new")


def copy_classes(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The class of every target: 0 bigram, 1 token, 2 new (see the module docstring).

    inputs, targets: (B, T) token ids with ``targets[:, t] = inputs[:, t + 1]`` inside the
    window (the last target is the token after it). Returns (B, T) int64. Position t sees
    ``inputs[:, :t + 1]``; a bigram (inputs[s], inputs[s + 1]) counts for s + 1 <= t.
    """
    if inputs.shape != targets.shape or inputs.dim() != 2:
        raise ValueError(f"inputs and targets: expected two (B, T) tensors of one shape, got "
                         f"{tuple(inputs.shape)} and {tuple(targets.shape)}")
    T = inputs.shape[1]
    s = torch.arange(T)
    seen_before = s[None, :] <= s[:, None]                # [t, s]: inputs[s] is in t's context
    token_seen = ((targets[:, :, None] == inputs[:, None, :]) & seen_before).any(-1)
    # bigram s -> s+1 for s + 1 <= t, i.e. s < t; its second token is inputs[s + 1]
    nxt = torch.cat([inputs[:, 1:], targets[:, -1:]], dim=1)   # inputs[s + 1] (the target for s = T-1)
    strictly_before = s[None, :] < s[:, None]
    bigram_seen = ((inputs[:, :, None] == inputs[:, None, :]) & (targets[:, :, None] == nxt[:, None, :])
                   & strictly_before).any(-1)
    classes = torch.full(inputs.shape, 2, dtype=torch.long)
    classes[token_seen] = 1
    classes[bigram_seen] = 0
    return classes


def copy_classes_reference(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``copy_classes`` as plain loops over one window at a time (slow; for the tests)."""
    B, T = inputs.shape
    out = torch.empty(B, T, dtype=torch.long)
    for b in range(B):
        seq = inputs[b].tolist() + [int(targets[b, -1])]   # the window and the token after it
        for t in range(T):
            cur, tgt = seq[t], seq[t + 1]
            if any(seq[s] == cur and seq[s + 1] == tgt for s in range(t)):
                out[b, t] = 0
            elif tgt in seq[:t + 1]:
                out[b, t] = 1
            else:
                out[b, t] = 2
    return out


@torch.no_grad()
def recall_breakdown(model, inputs: torch.Tensor, targets: torch.Tensor, name: str = "model",
                     batch_size: int = 16) -> dict:
    """Mean loss (nats) and perplexity of ``model`` on each copy class of the windows
    ``inputs``/``targets`` (N, T); ``model(input_ids=x, use_cache=False).logits`` gives (B, T, vocab)."""
    sums = torch.zeros(len(CLASSES), dtype=torch.float64)
    counts = torch.zeros(len(CLASSES), dtype=torch.long)
    model.eval()
    for i in range(0, inputs.shape[0], batch_size):
        x, y = inputs[i:i + batch_size], targets[i:i + batch_size]
        logits = model(input_ids=x, use_cache=False).logits
        nll = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="none").view_as(y)
        cls = copy_classes(x, y)
        sums.index_add_(0, cls.flatten(), nll.flatten().double())
        counts += torch.bincount(cls.flatten(), minlength=len(CLASSES))
    total = int(counts.sum())
    out = {"run": name, "tokens": total, "overall_loss": float(sums.sum() / total), "classes": {}}
    for k, cls_name in enumerate(CLASSES):
        n = int(counts[k])
        loss = float(sums[k] / n) if n else float("nan")
        out["classes"][cls_name] = {"tokens": n, "share": n / total, "loss": loss,
                                    "ppl": math.exp(loss) if n else float("nan"),
                                    "share_of_total_loss": float(sums[k] / sums.sum())}
    return out


def run_windows(run_dir: Path, split: str = "valid", checkpoint: str = "latest", windows: int | None = None,
                data: str | None = None):
    """(model, inputs, targets) of a training run: its model at ``checkpoint`` and ``windows``
    windows of ``split`` (default: the run's own evaluation windows, eval_windows of seq_len)."""
    from minrnn.data.text import DataError, eval_offsets, load_splits
    from minrnn.data.text import windows as cut_windows
    from minrnn.training import load_run

    config, tokenizer, model, _ = load_run(run_dir, checkpoint)
    splits = load_splits(data or config.data, config.data_dir or None)
    if split not in splits:
        raise DataError(f"--split: {data or config.data} has no {split} split; it has {', '.join(splits)}")
    tokens = torch.tensor(tokenizer.encode(splits[split]), dtype=torch.long)
    offsets = eval_offsets(tokens.numel(), config.seq_len, windows or config.eval_windows)
    inputs, targets = cut_windows(tokens, offsets, config.seq_len)
    return model, inputs, targets


def to_markdown(rows: list[dict]) -> str:
    head = "| run | tokens | loss, all | " + " | ".join(f"{c}: share, loss, ppl" for c in CLASSES) + " |"
    lines = [head, "|" + "---|" * (3 + len(CLASSES))]
    for r in rows:
        cells = [r["run"], f"{r['tokens']:,}", f"{r['overall_loss']:.4f}"]
        for c in CLASSES:
            k = r["classes"][c]
            cells.append(f"{k['share']:.1%}, {k['loss']:.3f}, {k['ppl']:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    if len(rows) >= 2:  # the gap of every run to the first, per class
        base = rows[0]
        lines += ["", f"Loss difference to {base['run']} (nats per token; share of the overall difference):", "",
                  "| run | all | " + " | ".join(CLASSES) + " |", "|" + "---|" * (2 + len(CLASSES))]
        for r in rows[1:]:
            d_all = r["overall_loss"] - base["overall_loss"]
            cells = [r["run"], f"{d_all:+.4f}"]
            for c in CLASSES:
                # the class's contribution to the overall difference: share x per-token difference
                d = r["classes"][c]["loss"] - base["classes"][c]["loss"]
                contrib = base["classes"][c]["share"] * d
                cells.append(f"{d:+.3f} ({contrib / d_all:.0%})" if d_all else f"{d:+.3f}")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python experiments/recall.py", description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+", type=Path, help="training run folders (the first is the baseline "
                                                       "of the difference table)")
    ap.add_argument("--split", default="valid", help="the split to score (default valid)")
    ap.add_argument("--checkpoint", choices=["latest", "best"], default="latest")
    ap.add_argument("--windows", type=int, default=None, help="windows to score (default: the run's eval_windows)")
    ap.add_argument("--data", default=None, help="score this data instead of the run's")
    ap.add_argument("--out", type=Path, default=None, help="also write this Markdown file and a .json beside it")
    args = ap.parse_args(argv)
    if args.windows is not None and args.windows < 1:
        ap.error(f"--windows: expected a positive integer, got {args.windows}")
    from minrnn.data.text import DataError

    rows = []
    try:
        for run in args.runs:
            model, inputs, targets = run_windows(run, args.split, args.checkpoint, args.windows, args.data)
            rows.append(recall_breakdown(model, inputs, targets, name=run.name))
    except (DataError, FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    write_table(to_markdown(rows), rows, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
