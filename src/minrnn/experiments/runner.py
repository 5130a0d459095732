"""The runs of `minrnn compare`, each trained by the one training engine (minrnn.training.Trainer).

A run folder ``OUT/EXPERIMENT-PRESET/runs/RUN/`` holds:

    spec.json        what was asked (a changed spec is an error, never silently mixed)
    config.toml      the engine's resolved settings
    metrics.jsonl    one line per step: step, training wall time, lr, train loss, gradient norm,
                     tokens/s; validation figures (val_loss, and val_accuracy for the synthetic
                     tasks) at each evaluation
    checkpoints/     the engine's checkpoints while the run trains (for resuming an interrupted
                     run; removed once the run is done)
    weights.pt       the trained model's state dict, only with keep_weights
    result.json      the finished run: parameters, final/best metrics, wall time, tokens/s,
                     peak memory, and ``history``: the evaluations (train_loss there is the mean
                     over the steps since the previous evaluation)

A run whose result.json exists is not redone; one with a checkpoint continues from it. Runs
can each train in their own process (``python -m minrnn.experiments.runner --run-dir D``), so
that a run's peak memory is its own and a crash loses one run.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from .._files import write_atomic
from ..data.shards import PreparedData, is_prepared
from ..data.text import load_splits
from ..training.config import TrainConfig
from ..training.loop import ModelSpec, Trainer, prepared_tokenizer
from ..training.metrics import read_metrics
from ..training.workloads import TaskWorkload, prepared_workload, text_tokenizer, text_workload
from .plan import CompareError, RunSpec
from .presets import LOOP_KEYS, Preset, load_preset


def run_dir_of(out: Path, spec: RunSpec) -> Path:
    return Path(out) / f"{spec.experiment}-{spec.preset}" / "runs" / spec.name


# --- what a run is made of ------------------------------------------------------------------


def make_workload(preset: Preset, spec: RunSpec):
    """The workload of a run: the preset's corpus (or ``spec.data``: a corpus, file or folder of
    text, or a prepared folder, whose train and valid splits are read memory-mapped with its own
    tokenizer) or synthetic task."""
    data, train = preset.data, preset.train
    if "corpus" in data or preset.user_data:
        if spec.data:  # its own train and valid splits
            source, name, train_split, eval_split = spec.data, Path(spec.data).name, "train", "valid"
        else:
            source, name = data["corpus"], data["corpus"]
            train_split, eval_split = data.get("train_split", "train"), data.get("eval_split", "valid")
        settings = dict(seq_len=train["seq_len"], batch_size=train["batch_size"], grad_accum=train.get("grad_accum", 1),
                        eval_windows=train.get("eval_windows", TrainConfig.eval_windows), seed=spec.seed,
                        train_split=train_split, eval_split=eval_split, name=name)
        if is_prepared(source):
            prepared = PreparedData.open(source, verify=True)
            return prepared_workload(prepared, prepared_tokenizer(prepared), pack_documents=spec.pack_documents,
                                     stateful=spec.stateful, **settings)
        splits = load_splits(source, spec.data_dir, splits=tuple(dict.fromkeys((train_split, eval_split))))
        tokenizer = text_tokenizer(splits, spec.tokenizer or data["tokenizer"], data.get("bpe_vocab_size", 8192),
                                   train_split)
        return text_workload(splits, tokenizer, stateful=spec.stateful, **settings)
    options = {"num_tokens": data["num_tokens"]} if "num_tokens" in data else {}
    if "length" in data:  # selective copying: one length
        lengths, eval_lengths = (data["length"], data["length"]), [data["length"]]
    else:
        lengths, eval_lengths = tuple(data["train_lengths"]), preset.eval_lengths()
    return TaskWorkload(spec.task or preset.tasks[0], train["batch_size"], lengths, eval_lengths,
                        grad_accum=train.get("grad_accum", 1), eval_batches=train.get("eval_batches", 1),
                        eval_batch_size=train.get("eval_batch_size"), val_seed=train.get("val_seed", 0),
                        test_seed=train.get("test_seed", 1), seed=spec.seed, **options)


def build_run_model(spec: RunSpec, preset: Preset, work) -> torch.nn.Module:
    """The model of a run, freshly initialised from the current RNG state (on the CPU);
    ``forward(input_ids) -> logits``."""
    from .baselines import build_model

    target, overrides = preset.model_settings(spec.model, work.vocab_size, spec.options, **spec.sweep)
    return build_model(spec.model, work.vocab_size, target, **overrides)


def run_train_settings(preset: Preset, spec: RunSpec) -> dict:
    """The model's train settings from the preset, with ``spec.lr`` as the peak learning rate
    if given (the floor of the schedule, min_lr, keeps its ratio to the peak), then ``spec.optim``
    on top (an explicit min_lr there wins)."""
    train = dict(preset.train_settings(spec.model))
    if spec.lr is not None:
        if "min_lr" in train:
            train["min_lr"] = train["min_lr"] * spec.lr / train["lr"]
        train["lr"] = spec.lr
    train.update(spec.optim)
    return train


def run_config(spec: RunSpec, preset: Preset, run_dir: Path, progress: bool, data: str) -> TrainConfig:
    """The engine's settings of a run: the preset's train table (TrainConfig's names), the
    run's steps, seed, device and dtype; a checkpoint at each evaluation."""
    train = run_train_settings(preset, spec)
    values = {k: train[k] for k in LOOP_KEYS if k in train}
    values.update(steps=spec.steps, seed=spec.seed, device=spec.device, dtype=spec.dtype, out_dir=str(run_dir),
                  data=data, budget_s=spec.budget_s or 0.0, keep_last=1, plot=False, sample_tokens=0,
                  progress="always" if progress else "never", pack_documents=spec.pack_documents,
                  stateful=spec.stateful, compile=spec.compile)
    if spec.eval_every is not None:
        values["eval_every"] = spec.eval_every
    values["checkpoint_every"] = values.get("eval_every", TrainConfig.eval_every)
    return TrainConfig.from_dict(values, source=f"run {spec.name}")


# --- one run ----------------------------------------------------------------------------------


def _peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def _history(run_dir: Path) -> list[dict]:
    """The evaluations of metrics.jsonl, each with the mean training loss since the one before."""
    out, losses = [], []
    for r in read_metrics(run_dir):
        losses.append(r["train_loss"])
        if any(k.startswith("val_") for k in r):
            row = {k: v for k, v in r.items() if k in ("step", "wall_s", "lr") or k.startswith("val_")}
            out.append({**row, "train_loss": sum(losses) / len(losses)})
            losses = []
    return out


def train_run(spec: RunSpec, run_dir: Path, log: Callable[[str], None] = print, progress: bool = True,
              keep_weights: bool = False) -> dict:
    """Train one run to ``spec.steps`` (continuing from its checkpoint if there is one) and
    write result.json; returns the result. ``keep_weights`` also writes the trained model's
    state dict to ``run_dir/weights.pt`` (compare deletes a finished run's checkpoints)."""
    from ..training.checkpoint import list_checkpoints

    preset = load_preset(spec.experiment, spec.preset)
    work = make_workload(preset, spec)
    config = run_config(spec, preset, run_dir, progress, work.name)
    holder = {}

    def build():
        holder["model"] = build_run_model(spec, preset, work)
        return holder["model"]

    def describe(model) -> str:
        info = model.baseline
        return (f"{info.params:,} parameters (width {info.width}, {info.num_layers} layers"
                + (f", MLP {info.mlp_width}" if info.mlp_width else "") + ")")

    model_spec = ModelSpec(build, {"model": spec.model, "sweep": spec.sweep, "options": spec.options},
                           logits=lambda model, x, **extras: model(x, **extras), describe=describe,
                           stateful=lambda model, x, state, **extras: model(x, state=state, return_state=True,
                                                                            **extras))
    resume = bool(list_checkpoints(run_dir))
    trainer = Trainer(config, work, model_spec, resume=resume, overwrite=not resume, log=log, name=spec.name)
    try:
        end = trainer.train()
        final = trainer.evaluate(full=True)
    finally:
        trainer.close()
    history = _history(run_dir)
    key = f"val_{work.metric}"
    best = (max if work.higher_is_better else min)(history, key=lambda r: r[key])
    info = trainer.model.baseline
    result = {
        "run": spec.name, "model": spec.model, "task": spec.task, "sweep": spec.sweep,
        "params": info.params, "width": info.width, "num_layers": info.num_layers, "mlp_width": info.mlp_width,
        "steps": end["step"], "planned_steps": spec.steps, "lr": config.lr, "final_val": history[-1][key],
        "best_val": best[key], "best_step": best["step"], "final_split": final, "wall_s": end["wall_s"],
        "tokens_per_s": end["step"] * work.tokens_per_step / end["wall_s"],
        "peak_memory_mib": _peak_memory_mib(trainer.device), "device": _device_name(trainer.device),
        "dtype": spec.dtype, "data": work.description, "options": spec.options, "optim": spec.optim,
        "history": history, "spec": spec.to_json(),
    }
    if keep_weights:  # before result.json: a finished run asked to keep its weights has them
        import io
        buf = io.BytesIO()
        torch.save(trainer.model.state_dict(), buf)
        write_atomic(run_dir / "weights.pt", buf.getvalue())
    write_atomic(run_dir / "result.json", json.dumps(result, indent=1).encode())
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    return result


# --- many runs --------------------------------------------------------------------------------


def run_all(runs: list[RunSpec], out: Path, isolate: bool = True, log: Callable[[str], None] = print,
            progress: bool = True, threads: int | None = None, keep_weights: bool = False) -> list[dict]:
    """Train every run not already finished under ``out``; returns every result (old and new)."""
    results = []
    for i, spec in enumerate(runs, 1):
        run_dir = run_dir_of(out, spec)
        run_dir.mkdir(parents=True, exist_ok=True)
        spec_path, result_path = run_dir / "spec.json", run_dir / "result.json"
        if spec_path.exists():
            old = json.loads(spec_path.read_text())
            if old != spec.to_json():
                raise CompareError(f"{run_dir} holds a run with another spec ({old}); remove that folder or "
                                   "choose another --out")
        else:
            write_atomic(spec_path, json.dumps(spec.to_json(), indent=1).encode())
        if result_path.exists():
            log(f"[{i}/{len(runs)}] {spec.name}: done before, kept"
                + (" (trained without keeping its weights: no weights.pt)"
                   if keep_weights and not (run_dir / "weights.pt").exists() else ""))
            results.append(json.loads(result_path.read_text()))
            continue
        log(f"[{i}/{len(runs)}] {spec.name}")
        if isolate:
            cmd = [sys.executable, "-m", "minrnn.experiments.runner", "--run-dir", str(run_dir),
                   "--data-dir", spec.data_dir or ""] + ([] if progress else ["--no-progress"]) \
                + (["--keep-weights"] if keep_weights else [])
            env = dict(os.environ)
            if threads:  # torch, OpenMP and numba each keep a pool: all of them get the same size
                env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
                           NUMBA_NUM_THREADS=str(threads), MINRNN_COMPARE_THREADS=str(threads))
            proc = subprocess.run(cmd, env=env)
            if proc.returncode != 0:
                raise CompareError(f"run {spec.name} failed (exit code {proc.returncode}, its error is above); "
                                   f"{run_dir} keeps the last checkpoint: run the same command again to continue")
            results.append(json.loads(result_path.read_text()))
        else:
            results.append(train_run(spec, run_dir, log, progress, keep_weights))
    return results


def main(argv=None) -> int:
    """Entry point of the per-run process: ``python -m minrnn.experiments.runner --run-dir D``."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--run-dir", type=Path, required=True)
    ap.add_argument("--data-dir", default="")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--keep-weights", action="store_true")
    args = ap.parse_args(argv)
    spec = RunSpec(**json.loads((args.run_dir / "spec.json").read_text()), data_dir=args.data_dir or None)
    if os.environ.get("MINRNN_COMPARE_THREADS"):
        torch.set_num_threads(int(os.environ["MINRNN_COMPARE_THREADS"]))
    train_run(spec, args.run_dir, log=functools.partial(print, flush=True), progress=not args.no_progress,
              keep_weights=args.keep_weights)
    return 0


if __name__ == "__main__":
    sys.exit(main())
