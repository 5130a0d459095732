"""The report of `minrnn compare`: ``results.md`` (one table per task, the steps each model needs
to reach the best Transformer's best, the Transformers being the baselines of kind
"transformer"), ``results.json`` and the plots ``loss_vs_steps.png`` / ``loss_vs_time.png``,
written beside the ``runs/`` folder. A perplexity column appears where the corpus's record asks
for one (minrnn.data.corpora).

What the numbers are. Text: the validation loss during training is the mean next-token loss
(nats) over ``eval_windows`` windows spread evenly over the evaluation split;
the final loss is over every non-overlapping window of that split. Synthetic tasks: the loss
and accuracy are over the answer positions only (targets aligned with the inputs, see
minrnn.data.tasks); validation batches use ``val_seed``, the final test ``test_seed``. Wall
time counts training steps only, evaluations excluded. Peak memory is the CUDA allocator's peak
on a GPU and the process's peak resident set on the CPU (interpreter and libraries included, so
only differences between rows mean much there).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from .._files import write_atomic
from ..data.corpora import CORPORA
from .baselines import of_kind
from .presets import Preset


def _perplexity(preset: Preset, results: list[dict]) -> bool:
    """Whether the corpus (the preset's, or the one given by --data) asks for a perplexity column."""
    corpus = preset.data.get("corpus") or results[0].get("spec", {}).get("data")
    return corpus in CORPORA and CORPORA[corpus].perplexity


def _perplexity_cell(loss: float) -> str:
    return f"{math.exp(loss):.1f}" if loss < 700 else "inf"  # exp overflows a float past ~709


def _steps_to_reach(result: dict, target: float, key: str, higher_better: bool) -> int | None:
    for r in result["history"]:
        if (r[key] >= target) if higher_better else (r[key] <= target):
            return r["step"]
    return None


def report(results: list[dict], folder: Path, title: str, preset: Preset) -> Path:
    """Write results.md and the two plots into ``folder``; returns the Markdown file."""
    folder.mkdir(parents=True, exist_ok=True)
    task_kind = "tasks" in preset.data or "task" in preset.data
    key = "val_accuracy" if task_kind else "val_loss"
    metric = "accuracy" if task_kind else "loss (nats)"
    lines = [f"# {title}", "", preset.description, "",
             f"Data: {results[0]['data']}. Device: {results[0]['device']}, {results[0]['dtype']}. "
             f"Metric: validation {metric}" + ("" if task_kind else ", lower is better") + ".", ""]
    set_options = sorted({(r["model"], k, json.dumps(v)) for r in results for k, v in r.get("options", {}).items()})
    if set_options:
        lines += ["Model options set on the command line (`--set`), on top of the preset's: "
                  + ", ".join(f"{m}.{k}={v}" for m, k, v in set_options) + ".", ""]
    set_optim = sorted({(k, json.dumps(v)) for r in results for k, v in r.get("optim", {}).items()})
    if set_optim:
        lines += ["Optimiser settings from the command line (`--optim`), on top of the preset's: "
                  + ", ".join(f"{k}={v}" for k, v in set_optim) + ".", ""]
    transformers = of_kind("transformer")
    ppl = not task_kind and _perplexity(preset, results)
    groups: dict[str | None, list[dict]] = {}
    for r in results:
        groups.setdefault(r["task"], []).append(r)
    for task, rows in groups.items():
        if task:
            lines += [f"## {task}", ""]
        # each run is held to the best Transformer's best validation figure (a final one can be
        # past overfitting) among the runs of its own sweep value (its depth, say), if any
        targets = {}
        for sweep in {json.dumps(r["sweep"], sort_keys=True) for r in rows}:
            ref_rows = [r for r in rows if r["model"] in transformers
                        and json.dumps(r["sweep"], sort_keys=True) == sweep]
            if ref_rows:
                best_tf = (max if task_kind else min)(ref_rows, key=lambda r: r["best_val"])
                targets[sweep] = (best_tf["best_val"], best_tf["run"])
        swept = any(r["sweep"] for r in rows)
        if swept:
            reach_name = "steps to the best Transformer's best (same " + ", ".join(rows[0]["sweep"]) + ")"
        elif targets:
            reach_name = f"steps to {next(iter(targets.values()))[1]}'s best"
        else:
            reach_name = "steps to Transformer's best"
        final_name = "test accuracy" if task_kind else "final loss, whole eval split"
        extra = ["ppl"] if ppl else []
        header = ["run", "params", "steps", "peak lr", f"final val {metric}", "best val (step)", final_name, *extra,
                  reach_name, "wall s", "tokens/s", "peak MiB"]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for r in rows:
            target = targets.get(json.dumps(r["sweep"], sort_keys=True), (None,))[0]
            reach = _steps_to_reach(r, target, key, task_kind) if target is not None else None
            final = r["final_split"]["accuracy" if task_kind else "loss"]
            steps_cell = str(r["steps"]) + ("" if r["steps"] == r.get("planned_steps", r["steps"])
                                            else f" of {r['planned_steps']} (time budget)")
            lr = r["lr"]
            cells = [r["run"], f"{r['params']:,}", steps_cell, f"{lr:g}", f"{r['final_val']:.4f}",
                     f"{r['best_val']:.4f} ({r['best_step']})",
                     f"{final:.4f}", *([_perplexity_cell(final)] if extra else []),
                     "-" if reach is None else str(reach), f"{r['wall_s']:.0f}", f"{r['tokens_per_s']:.0f}",
                     f"{r['peak_memory_mib']:.0f}"]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    if len(groups) > 1 or next(iter(groups)) is not None:
        lines += _task_average(groups)
    if any(r["sweep"] for r in results):
        lines += _sweep_matrix(results, task_kind)
    lines += ["Validation curves: loss_vs_steps.png, loss_vs_time.png (beside this file).", ""]
    md = folder / "results.md"
    write_atomic(md, "\n".join(lines).encode())
    plot_groups = groups
    if any(r["sweep"] for r in results):  # one panel per sweep value (and task): one model per line
        plot_groups = {}
        for r in results:
            label = " ".join(filter(None, [r["task"], *(f"{k}={v}" for k, v in sorted(r["sweep"].items()))]))
            plot_groups.setdefault(label, []).append(r)
    _plots(plot_groups, folder, key, metric)
    write_atomic(folder / "results.json",
                 json.dumps([{k: v for k, v in r.items()} for r in results], indent=1).encode())
    return md


def write_table(md: str, rows: list[dict], out: Path | None) -> None:
    """Print a Markdown table; with ``out`` also write it there and its rows as JSON beside it
    (``out`` with a .json suffix), each file replaced atomically."""
    print(md)
    if out is not None:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(out, md.encode())
        write_atomic(out.with_suffix(".json"), json.dumps(rows, indent=1).encode())


def _task_average(groups: dict) -> list[str]:
    """Test accuracy of every model on every task, and its mean over the tasks."""
    tasks = list(groups)
    acc: dict[str, dict[str, float]] = {}
    for task, rows in groups.items():
        for r in rows:
            acc.setdefault(r["run"].split(".", 1)[-1], {})[task] = r["final_split"]["accuracy"]
    lines = ["## Test accuracy per task, and the mean", "",
             "| model | " + " | ".join(tasks) + " | mean |", "|---" * (len(tasks) + 2) + "|"]
    for name, by_task in acc.items():
        cells = [f"{by_task[t]:.3f}" if t in by_task else "-" for t in tasks]
        mean = sum(by_task.values()) / len(by_task)
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {mean:.3f} |")
    return lines + [""]


def _sweep_matrix(results: list[dict], task_kind: bool) -> list[str]:
    """The final figure of every model at every sweep value (test accuracy, or the loss over
    the whole evaluation split), one row per model (and task)."""
    (key,) = {k for r in results for k in r["sweep"]} or {None}
    values = sorted({r["sweep"].get(key) for r in results if key in r["sweep"]})
    table: dict[str, dict] = {}
    for r in results:
        name = (f"{r['task']}." if r["task"] else "") + r["model"]
        table.setdefault(name, {})[r["sweep"].get(key)] = r["final_split"]["accuracy" if task_kind else "loss"]
    what = "test accuracy" if task_kind else "loss over the whole evaluation split"
    lines = [f"## {what.capitalize()} by {key}", "",
             "| model | " + " | ".join(f"{key}={v}" for v in values) + " |", "|---" * (len(values) + 1) + "|"]
    for name, by_value in table.items():
        lines.append(f"| {name} | " + " | ".join(f"{by_value[v]:.3f}" if v in by_value else "-" for v in values) + " |")
    return lines + [""]


def _plots(groups: dict, folder: Path, key: str, metric: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    for x_key, x_label, fname in (("step", "step", "loss_vs_steps.png"), ("wall_s", "training wall time (s)",
                                                                            "loss_vs_time.png")):
        n = len(groups)
        cols = min(n, 4)
        rows_n = math.ceil(n / cols)
        fig, axes = plt.subplots(rows_n, cols, figsize=(5 * cols, 3.6 * rows_n), squeeze=False)
        for ax, (task, rows) in zip(axes.flat, groups.items()):
            for r in rows:
                ax.plot([h[x_key] for h in r["history"]], [h[key] for h in r["history"]], label=r["model"],
                        marker="." if len(r["history"]) < 30 else None)
            ax.set_xlabel(x_label)
            ax.set_ylabel(f"validation {metric}")
            ax.set_title(task or "")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        for ax in list(axes.flat)[n:]:
            ax.axis("off")
        fig.tight_layout()
        fig.savefig(folder / fname, dpi=110)
        plt.close(fig)
