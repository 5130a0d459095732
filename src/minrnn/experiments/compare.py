"""`minrnn compare`: train every model of a preset with the one training engine, then tabulate and plot.

    minrnn compare shakespeare_char --preset cpu --models mingru,llama,lstm
    minrnn compare selective_copying --preset cpu --steps 200       # shrink any preset
    minrnn compare text --data my_corpus.txt --tokenizer byte       # your own corpus

    from minrnn.experiments.compare import CompareConfig, compare
    compare(CompareConfig("shakespeare_char", models=["mingru", "llama"], steps=200))

Same data, tokenizer, step budget, optimiser and parameter count (presets.py, baselines.py)
for every model. The parts: plan.py turns the request into runs, runner.py trains each run
(through minrnn.training.Trainer) into ``OUT/EXPERIMENT-PRESET/runs/RUN/``, report.py writes
``results.md``, ``results.json`` and the plots beside ``runs/``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from .plan import CompareConfig, CompareError, RunSpec, check_optim, parse_optim, parse_options, plan_runs
from .presets import load_preset
from .report import report
from .runner import build_run_model, make_workload, run_all, run_train_settings, train_run

__all__ = ["CompareConfig", "CompareError", "RunSpec", "compare", "plan_runs", "train_run", "run_all",
           "build_run_model", "make_workload", "run_train_settings", "parse_options", "parse_optim",
           "check_optim"]


def compare(config: CompareConfig, log: Callable[[str], None] = print) -> Path:
    """Plan, train (skipping finished runs) and report; returns the path of results.md."""
    runs = plan_runs(config)
    out = Path(config.out)
    results = run_all(runs, out, config.isolate, log, config.progress, config.threads, config.keep_weights)
    first = runs[0]
    title = f"{first.experiment}, preset {first.preset}" + (f", data {first.data}" if first.data else "")
    return report(results, out / f"{first.experiment}-{first.preset}", title,
                  load_preset(first.experiment, first.preset))
