"""One table over many ``minrnn compare`` outputs: a sweep's runs side by side, seeds averaged.

Answers "which setting of a sweep (learning rate, weight decay, a --set option, the seed) is
best, and how far apart are the seeds?". Run from the repository root:

    python experiments/sweep_table.py runs/sweeps/wikitext2-*/ --out runs/sweeps/wikitext2-tuning.md

Each ``compare --out`` folder holds only the runs of its own command, so a sweep is spread over
many folders. This reads every run folder's ``result.json`` (and ``spec.json``, ``metrics.jsonl``)
under the folders given, groups runs that differ only in their seed (same model, ``--set``
options, peak learning rate, ``--optim`` settings, sweep value, task and steps) and writes one
row per group:

    language models   test loss per seed, the mean loss and its perplexity exp(mean loss)
                      (the mean is taken over losses, not perplexities)
    accuracy tasks    test accuracy per seed and their mean

and the generalisation gap at the end of training, validation loss minus the mean training
loss since the previous evaluation (averaged over seeds). Runs of different experiments or
presets cannot share a table. Needs only the standard library.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from minrnn.experiments.report import write_table


class SweepError(ValueError):
    """A folder without results, or runs that cannot share one table."""


def _fmt(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value).lower() if isinstance(value, bool) else str(value)


def _settings(d: dict) -> str:
    return ", ".join(f"{k}={_fmt(v)}" for k, v in sorted(d.items())) or "preset"


def _last_evaluation(run_dir: Path, result: dict) -> dict:
    """The run's last evaluation record: the last line of metrics.jsonl with a validation
    loss, else the last entry of result.json's history ({} if neither has one)."""
    path = run_dir / "metrics.jsonl"
    records = ([json.loads(line) for line in path.read_text().splitlines() if line.strip()]
               if path.exists() else result.get("history") or [])
    evals = [rec for rec in records if rec.get("val_loss") is not None]
    return evals[-1] if evals else {}


def load_results(folders: list[Path]) -> list[dict]:
    """Every finished run under ``folders`` (a compare --out folder, or a single run folder)."""
    results = []
    for folder in folders:
        if not folder.is_dir():
            raise SweepError(f"folders: {folder} is not a directory")
        found = sorted(folder.rglob("result.json"))
        if not found:
            raise SweepError(f"folders: {folder} holds no result.json (a run that did not finish, "
                             "or not a minrnn compare output)")
        for path in found:
            r = json.loads(path.read_text())
            spec = r.get("spec") or json.loads((path.parent / "spec.json").read_text())
            r["_spec"], r["_path"] = spec, str(path.parent)
            if "lr" not in r:
                raise SweepError(f"{path}: no peak learning rate (lr) recorded; not a minrnn compare result")
            r["_last_eval"] = _last_evaluation(path.parent, r)
            results.append(r)
    kinds = {(r["_spec"]["experiment"], r["_spec"]["preset"]) for r in results}
    if len(kinds) > 1:
        raise SweepError("runs of different experiments or presets cannot share one table: "
                         + ", ".join(f"{e}/{p}" for e, p in sorted(kinds)))
    return results


def group_by_seed(results: list[dict]) -> list[dict]:
    """Rows of runs equal in everything but the seed, each with per-seed and mean figures."""
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        key = (r["model"], _settings(r.get("options", {})), r["lr"], _settings(r.get("optim", {})),
               _settings(r.get("sweep", {})), r.get("task") or "", r["steps"])
        groups.setdefault(key, []).append(r)
    rows = []
    for (model, options, lr, optim, sweep, task, steps), runs in groups.items():
        runs.sort(key=lambda r: r["_spec"].get("seed", 0))
        seeds = [r["_spec"].get("seed", 0) for r in runs]
        if len(set(seeds)) != len(seeds):
            raise SweepError(f"{model} ({options}; lr {lr:g}; {optim}) has two runs with the same seed: "
                             + ", ".join(r["_path"] for r in runs))
        accuracy = all("accuracy" in r["final_split"] for r in runs)
        per_seed = [r["final_split"]["accuracy" if accuracy else "loss"] for r in runs]
        mean = sum(per_seed) / len(per_seed)
        gaps = [h["val_loss"] - h["train_loss"] for h in (r["_last_eval"] for r in runs)
                if h.get("train_loss") is not None and h.get("val_loss") is not None]
        rows.append({
            "model": model, "task": task, "options": options, "lr": lr, "optim": optim, "sweep": sweep,
            "steps": steps, "params": runs[0]["params"], "seeds": seeds,
            "metric": "test accuracy" if accuracy else "test loss", "per_seed": per_seed, "mean": mean,
            "mean_ppl": None if accuracy else math.exp(mean),
            "per_seed_ppl": None if accuracy else [math.exp(x) for x in per_seed],
            "gap": sum(gaps) / len(gaps) if gaps else None, "runs": [r["_path"] for r in runs],
        })
    # best first within each model: highest accuracy, lowest loss
    rows.sort(key=lambda row: (row["model"], row["task"], -row["mean"] if row["metric"] == "test accuracy" else row["mean"]))
    return rows


def to_markdown(rows: list[dict]) -> str:
    lm = any(r["mean_ppl"] is not None for r in rows)
    value = "test ppl per seed" if lm else "test accuracy per seed"
    mean = "mean loss (ppl)" if lm else "mean accuracy"
    with_task = any(r["task"] for r in rows)
    with_sweep = any(r["sweep"] != "preset" for r in rows)
    head = (["model"] + (["task"] if with_task else []) + ["--set", "peak lr", "--optim"]
            + (["sweep"] if with_sweep else []) + ["steps", "params", "seeds", value, mean,
                                                   "val - train loss at the end"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if r["mean_ppl"] is not None:
            values = " / ".join(f"{p:.1f}" for p in r["per_seed_ppl"])
            avg = f"{r['mean']:.4f} ({r['mean_ppl']:.1f})"
        else:
            values = " / ".join(f"{a:.2%}" for a in r["per_seed"])
            avg = f"{r['mean']:.2%}"
        cells = ([r["model"]] + ([r["task"]] if with_task else [])
                 + [r["options"], f"{r['lr']:g}", r["optim"]] + ([r["sweep"]] if with_sweep else [])
                 + [str(r["steps"]), f"{r['params']:,}", ", ".join(map(str, r["seeds"])), values, avg,
                    "-" if r["gap"] is None else f"{r['gap']:.2f}"])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python experiments/sweep_table.py", description=__doc__.split("\n")[0])
    ap.add_argument("folders", nargs="+", type=Path, help="minrnn compare --out folders (or run folders)")
    ap.add_argument("--model", action="append", default=None, help="keep only this model (repeatable)")
    ap.add_argument("--out", type=Path, default=None, help="also write this Markdown file and a .json beside it")
    args = ap.parse_args(argv)
    try:
        results = load_results(args.folders)
        if args.model:
            results = [r for r in results if r["model"] in args.model]
            if not results:
                raise SweepError(f"--model: no run of {', '.join(args.model)} in the folders given")
        rows = group_by_seed(results)
    except (SweepError, FileNotFoundError, json.JSONDecodeError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    write_table(to_markdown(rows), rows, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
