"""Where a language model's loss goes: tokens it could copy from its context against the rest.

    minrnn compare wikitext2 --preset cpu --models mingru,llama --keep-weights --out results/recall
    python -m minrnn.experiments.recall results/recall/wikitext2-cpu/runs/mingru \\
        results/recall/wikitext2-cpu/runs/llama --out results/recall/wikitext2-cpu/recall.md

Every target token of the evaluation split (the same non-overlapping windows as a run's final
"whole split" loss) falls in one of three classes, decided from its window alone:

    bigram    the pair (current token, target) already occurred earlier in the window: an
              induction-style copy ("... Harry Potter ... Harry -> Potter") would predict it
    token     the target occurred earlier in the window, but never right after the current token
    new       the target does not occur earlier in the window

Attention can look such repeats up exactly; a recurrent model must have kept them in its
fixed-size state. Arora et al. 2023 ("Zoology", arXiv 2312.04927) found that most of the
perplexity gap between attention and gated-convolution / linear-recurrent language models sits
on the first class; this measures the same thing for the runs of ``minrnn compare``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

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


def load_compare_run(run_dir: Path, data_dir: str | None = None):
    """(spec, workload, model) of a finished run that kept its weights."""
    from .compare import CompareError, RunSpec, build_run_model, make_workload
    from .presets import load_preset

    run_dir = Path(run_dir)
    weights = run_dir / "weights.pt"
    if not (run_dir / "spec.json").exists():
        raise CompareError(f"{run_dir}: no spec.json here; expected a run folder of `minrnn compare` "
                           "(OUT/EXPERIMENT-PRESET/runs/RUN)")
    if not weights.exists():
        raise CompareError(f"{run_dir}: no weights.pt; train the run with `minrnn compare ... --keep-weights` "
                           "(a run done before keeps no weights: use another --out)")
    spec = RunSpec(**json.loads((run_dir / "spec.json").read_text()), data_dir=data_dir)
    preset = load_preset(spec.experiment, spec.preset)
    work = make_workload(preset, spec)
    if work.kind != "text":
        raise CompareError(f"{run_dir}: a {spec.experiment} run; the copy breakdown is for language models")
    model = build_run_model(spec, preset, work)
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return spec, work, model.eval()


@torch.no_grad()
def recall_breakdown(run_dir: Path, data_dir: str | None = None) -> dict:
    """Mean loss (nats) and perplexity of a run's model on each copy class of its evaluation split.

    Scores the windows of the run's final whole-split loss, so ``overall_loss`` reproduces that
    figure (result.json ``final_split``) up to float32 summation order.
    """
    spec, work, model = load_compare_run(run_dir, data_dir)
    sums = torch.zeros(len(CLASSES), dtype=torch.float64)
    counts = torch.zeros(len(CLASSES), dtype=torch.long)
    for x, y in work.eval_batches(full=True):
        nll = F.cross_entropy(model(x).float().flatten(0, 1), y.flatten(), reduction="none").view_as(y)
        cls = copy_classes(x, y)
        sums.index_add_(0, cls.flatten(), nll.flatten().double())
        counts += torch.bincount(cls.flatten(), minlength=len(CLASSES))
    total = int(counts.sum())
    out = {"run": spec.name, "model": spec.model, "tokens": total,
           "overall_loss": float(sums.sum() / total), "classes": {}}
    for k, name in enumerate(CLASSES):
        n = int(counts[k])
        loss = float(sums[k] / n) if n else float("nan")
        out["classes"][name] = {"tokens": n, "share": n / total, "loss": loss,
                                "ppl": math.exp(loss) if n else float("nan"),
                                "share_of_total_loss": float(sums[k] / sums.sum())}
    return out


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
    ap = argparse.ArgumentParser(prog="python -m minrnn.experiments.recall", description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+", type=Path, help="run folders trained with --keep-weights (the first is the "
                                                       "baseline of the difference table)")
    ap.add_argument("--data-dir", default=None, help="where corpora are looked for (else MINRNN_DATA_DIR)")
    ap.add_argument("--out", type=Path, default=None, help="also write this Markdown file and a .json beside it")
    args = ap.parse_args(argv)
    from .compare import CompareError
    try:
        rows = [recall_breakdown(r, args.data_dir) for r in args.runs]
    except (CompareError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    md = to_markdown(rows)
    print(md)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(md)
        args.out.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
