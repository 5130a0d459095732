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

For a selective-copying run the same command breaks the test accuracy down instead: by answer
index (the i-th marker asks for the i-th data token), by how far back the asked token lies,
and by what a wrong answer is (``copying_answers``):

    neighbour  the data token just before or after the asked one: the order slipped by one
    elsewhere  another data token of the same sequence
    absent     a token the sequence never held (a blank, a marker or an unseen symbol)
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
WRONG = ("neighbour", "elsewhere", "absent")


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
    """(spec, workload, model) of a finished run that kept its weights (a language model or a
    synthetic task: ``workload.kind`` is "text" or "task")."""
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
    if work.kind != "text" and spec.experiment != "selective_copying":
        raise CompareError(f"{run_dir}: a {spec.experiment} run; the breakdown is for language models and "
                           "selective copying")
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
    if work.kind != "text":
        from .compare import CompareError
        raise CompareError(f"{run_dir}: a {spec.experiment} run; use copying_breakdown")
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


def copying_answers(input_ids: torch.Tensor, predictions: torch.Tensor, num_tokens: int):
    """What each answer of a selective-copying batch is.

    input_ids: (B, L + n) as the task draws them (n = ``num_tokens`` data tokens among blanks in
    the first L positions, then n answer markers); predictions: (B, n) token ids output at the
    markers. Returns (correct, wrong_kind, distance), each (B, n): correct bool; wrong_kind -1
    for a right answer, else the index in ``WRONG`` (see the module docstring; a token that is
    both a neighbour and elsewhere counts as a neighbour); distance, the positions from the
    asked data token to the marker that asks for it (1 .. L + n - 1).
    """
    from ..data.tasks.selective_copying import BLANK

    n = num_tokens
    if input_ids.dim() != 2 or input_ids.shape[1] <= n or predictions.shape != (input_ids.shape[0], n):
        raise ValueError(f"input_ids (B, L + {n}) and predictions (B, {n}) expected, got "
                         f"{tuple(input_ids.shape)} and {tuple(predictions.shape)}")
    B, length = input_ids.shape[0], input_ids.shape[1] - n
    span = input_ids[:, :length]
    held = span != BLANK
    if not torch.all(held.sum(1) == n):
        raise ValueError(f"input_ids: every row must hold {n} data tokens before its markers")
    positions = held.nonzero()[:, 1].view(B, n)           # nonzero() is row-major: in order per row
    data = span.gather(1, positions)
    correct = predictions == data
    before = torch.cat([torch.full_like(data[:, :1], -1), data[:, :-1]], 1)
    after = torch.cat([data[:, 1:], torch.full_like(data[:, :1], -1)], 1)
    neighbour = (predictions == before) | (predictions == after)
    elsewhere = (predictions[:, :, None] == data[:, None, :]).any(-1)
    kind = torch.where(neighbour, 0, torch.where(elsewhere, 1, 2))
    kind = torch.where(correct, -1, kind)
    distance = length + torch.arange(n) - positions
    return correct, kind, distance


@torch.no_grad()
def copying_breakdown(run_dir: Path, data_dir: str | None = None, distance_bins: int = 5) -> dict:
    """A selective-copying run's test accuracy (the run's own test set) by answer index, by
    distance to the asked token (``distance_bins`` equal bins over 1 .. L + n - 1), and its
    wrong answers by kind; ``accuracy`` reproduces the run's test accuracy (result.json
    ``final_split``)."""
    from ..data.tasks import eval_set
    from .compare import CompareError

    spec, work, model = load_compare_run(run_dir, data_dir)
    if spec.experiment != "selective_copying":
        raise CompareError(f"{run_dir}: a {spec.experiment} run; copying_breakdown is for selective copying")
    (length,) = work.eval_lengths
    n = work.options["num_tokens"]
    right, kinds, dists = [], [], []
    sets = eval_set(work.task, [length], work.eval_batch_size, work.eval_batches, seed=work.test_seed, **work.options)
    for b in sets[length]:
        pred = model(b.input_ids)[:, length:].argmax(-1)
        correct, kind, distance = copying_answers(b.input_ids, pred, n)
        right.append(correct), kinds.append(kind), dists.append(distance)
    right, kinds, dists = torch.cat(right).float(), torch.cat(kinds), torch.cat(dists)
    wrong = int((kinds >= 0).sum())
    edges = torch.linspace(0, length + n - 1, distance_bins + 1).round().long()
    by_distance = []
    for lo, hi in zip(edges[:-1].tolist(), edges[1:].tolist()):
        inside = (dists > lo) & (dists <= hi)
        by_distance.append({"from": lo + 1, "to": hi, "answers": int(inside.sum()),
                            "accuracy": float(right[inside].mean()) if inside.any() else float("nan")})
    return {"run": spec.name, "model": spec.model, "answers": right.numel(), "accuracy": float(right.mean()),
            "wrong": {k: {"count": int((kinds == i).sum()), "share": int((kinds == i).sum()) / wrong if wrong else 0.0}
                      for i, k in enumerate(WRONG)},
            "by_index": right.mean(0).tolist(), "by_distance": by_distance}


def copying_to_markdown(rows: list[dict]) -> str:
    n = len(rows[0]["by_index"])
    lines = ["| run | answers | test accuracy | wrong | " + " | ".join(WRONG) + " |", "|" + "---|" * (4 + len(WRONG))]
    for r in rows:
        wrong = sum(v["count"] for v in r["wrong"].values())
        lines.append(f"| {r['run']} | {r['answers']:,} | {r['accuracy']:.4f} | {wrong} | "
                     + " | ".join(f"{r['wrong'][k]['count']} ({r['wrong'][k]['share']:.0%})" for k in WRONG) + " |")
    lines += ["", "Accuracy by answer index (the i-th marker asks for the i-th data token):", "",
              "| run | " + " | ".join(str(i + 1) for i in range(n)) + " |", "|" + "---|" * (n + 1)]
    for r in rows:
        lines.append(f"| {r['run']} | " + " | ".join(f"{a:.3f}" for a in r["by_index"]) + " |")
    bins = rows[0]["by_distance"]
    lines += ["", "Accuracy by distance from the asked token to its marker (positions):", "",
              "| run | " + " | ".join(f"{b['from']}-{b['to']}" for b in bins) + " |", "|" + "---|" * (len(bins) + 1)]
    for r in rows:
        lines.append(f"| {r['run']} | " + " | ".join(f"{b['accuracy']:.3f} ({b['answers']})" for b in r["by_distance"])
                     + " |")
    return "\n".join(lines) + "\n"


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
    from .sweeps import emit_table
    try:
        kinds = {json.loads((r / "spec.json").read_text())["experiment"] == "selective_copying"
                 for r in args.runs if (r / "spec.json").exists()}
        if len(kinds) > 1:
            raise CompareError("selective-copying runs and language-model runs cannot share one table")
        copying = kinds == {True}
        rows = [(copying_breakdown if copying else recall_breakdown)(r, args.data_dir) for r in args.runs]
    except (CompareError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    emit_table((copying_to_markdown if copying else to_markdown)(rows), rows, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
