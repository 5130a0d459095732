"""`minrnn compare`: train every model of a preset with one harness, then tabulate and plot.

    minrnn compare shakespeare_char --preset cpu --models mingru,llama,lstm
    minrnn compare selective_copying --preset cpu --steps 200       # shrink any preset

Same data, tokenizer, step budget, optimiser and parameter count (presets.py, baselines.py)
for every model. Each run (one model, one Chomsky task, one sweep value) trains in its own
process, so that its peak memory is its own and a crash loses one run, and writes to
``OUT/EXPERIMENT-PRESET/runs/RUN/``:

    spec.json        what was asked (a changed spec is an error, never silently mixed)
    metrics.jsonl    one line per evaluation: step, training wall time, lr, train/val loss
                     (and accuracy for the synthetic tasks)
    checkpoint.pt    weights, optimiser and RNG state at the last evaluation (for --resume of
                     an interrupted run; removed once the run is done)
    weights.pt       the trained model's state dict, only with --keep-weights (not committed:
                     .gitignore)
    result.json      the finished run: parameters, final/best metrics, wall time, tokens/s,
                     peak memory

A run whose result.json exists is not redone; one with a checkpoint continues from it.
Then ``results.md`` (the table) and ``loss_vs_steps.png`` / ``loss_vs_time.png`` are written
beside ``runs/``.

What the numbers are. Text: the validation loss during training is the mean next-token
loss (nats) over ``eval_batches`` x ``batch_size`` windows spread evenly over the evaluation
split; the final loss is over every non-overlapping window of that split. Synthetic tasks:
the loss and accuracy are over the answer positions only (targets aligned with the inputs,
see minrnn.data.tasks); validation batches use ``val_seed``, the final test ``test_seed``.
Wall time counts training steps only, evaluations excluded. Peak memory is the CUDA
allocator's peak on a GPU and the process's peak resident set on the CPU (interpreter and
libraries included, so only differences between rows mean much there).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import os
import resource
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from .._files import write_atomic
from .presets import EXPERIMENTS, Preset, load_preset

TRANSFORMERS = ("llama", "gpt2")
DTYPES = ("float32", "bfloat16")


class CompareError(ValueError):
    """A compare request that cannot run as asked; the message says what to change."""


@dataclass(frozen=True)
class RunSpec:
    """One training run: a model of a preset (for one Chomsky task, at one sweep value)."""

    experiment: str
    preset: str
    model: str
    steps: int
    task: str | None = None                     # Chomsky: the task of this run
    sweep: dict = field(default_factory=dict)   # e.g. {"num_layers": 2}
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"
    data_dir: str | None = None
    eval_every: int | None = None
    budget_s: float | None = None               # stop a run after this much training wall time
    preset_digest: str = ""                     # the preset's content: an edited preset is a new run
    lr: float | None = None                     # the peak learning rate instead of the preset's (min_lr alike)
    options: dict = field(default_factory=dict)  # model options on top of the preset's (--set)
    optim: dict = field(default_factory=dict)    # optimiser settings on top of the preset's (--optim)

    @property
    def name(self) -> str:
        parts = [self.model] + [f"{k}={v}" for k, v in sorted(self.sweep.items())]
        return (f"{self.task}." if self.task else "") + "-".join(parts)

    def to_json(self) -> dict:
        d = asdict(self)
        d.pop("data_dir")  # where the data lives does not change the run
        if d["lr"] is None:
            d.pop("lr")  # so the specs of runs made before --lr existed still match
        for key in ("options", "optim"):  # likewise for --set and --optim
            if not d[key]:
                d.pop(key)
        return d


# --- the data of a run ------------------------------------------------------------------------


class TextWorkload:
    """Next-token prediction on a corpus split: ``batch(step)`` and ``evaluate(model, full)``."""

    kind = "text"

    def __init__(self, preset: Preset, seed: int, data_dir: str | None):
        from ..data.text import check_long_enough
        from ..data.tokenizers import build_tokenizer

        data, train = preset.data, preset.train
        splits = _corpus_splits(data["corpus"], data.get("train_split", "train"),
                                data.get("eval_split", "valid"), data_dir)
        kind = data["tokenizer"]
        # a character vocabulary covers every split (as nanoGPT builds it); BPE learns from train only
        vocab_text = splits["train"] + splits["eval"] if kind == "char" else splits["train"]
        self.tokenizer = build_tokenizer(kind, vocab_text, data.get("bpe_vocab_size", 8192))
        self.vocab_size = self.tokenizer.vocab_size
        self.tokens = {k: torch.tensor(self.tokenizer.encode(v), dtype=torch.long) for k, v in splits.items()}
        self.seq_len, self.batch_size = train["seq_len"], train["batch_size"]
        for split, toks in self.tokens.items():
            check_long_enough(toks, self.seq_len, split)
        self.eval_windows = train.get("eval_batches", 16) * self.batch_size
        self.seed = seed
        self.tokens_per_step = self.seq_len * self.batch_size * train.get("grad_accum", 1)
        self.splits_note = f"train on {data.get('train_split', 'train')}, evaluate on {data.get('eval_split', 'valid')}"

    def batch(self, step: int, micro: int):
        from ..data.text import train_offsets, windows
        tokens = self.tokens["train"]
        offsets = train_offsets(tokens.numel(), self.seq_len, self.batch_size, self.seed, step, micro)
        return windows(tokens, offsets, self.seq_len)

    def loss(self, logits, targets, reduction: str = "mean"):
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction=reduction)

    def eval_batches(self, full: bool = False):
        """(inputs, targets) batches of the evaluation split: ``eval_windows`` windows spread
        over it, or with ``full`` every non-overlapping window."""
        from ..data.text import eval_offsets, windows
        toks = self.tokens["eval"]
        count = toks.numel() // self.seq_len if full else self.eval_windows
        offsets = eval_offsets(toks.numel(), self.seq_len, count)
        for i in range(0, offsets.numel(), self.batch_size):
            yield windows(toks, offsets[i:i + self.batch_size], self.seq_len)

    @torch.no_grad()
    def evaluate(self, model, device, autocast, full: bool = False) -> dict:
        total, n = 0.0, 0
        for x, y in self.eval_batches(full):
            with autocast():
                logits = model(x.to(device))
            total += self.loss(logits, y.to(device), "sum").item()
            n += y.numel()
        return {"loss": total / n}


def _corpus_splits(corpus: str, train_split: str, eval_split: str, data_dir: str | None) -> dict[str, str]:
    from ..data.corpora import CORPORA, locate_corpus
    from ..data.text import load_splits

    known = CORPORA.get(corpus, {})
    if train_split in known and eval_split in known:  # files checked by SHA-256, nothing to download
        return {"train": locate_corpus(corpus, train_split, data_dir).read_text(encoding="utf-8"),
                "eval": locate_corpus(corpus, eval_split, data_dir).read_text(encoding="utf-8")}
    splits = load_splits(corpus, data_dir)
    for split in (train_split, eval_split):
        if split not in splits:
            raise CompareError(f"{corpus} has no {split} split here (found {sorted(splits)})")
    return {"train": splits[train_split], "eval": splits[eval_split]}


class TaskWorkload:
    """A synthetic task: batches drawn from (seed, step); loss and accuracy on the answers."""

    kind = "task"

    def __init__(self, preset: Preset, task_name: str, seed: int):
        from ..data.tasks import TASKS

        self.task = TASKS[task_name]
        data, train = preset.data, preset.train
        self.vocab_size = self.task.vocab_size
        self.batch_size = train["batch_size"]
        self.options = {"num_tokens": data["num_tokens"]} if "num_tokens" in data else {}
        if "length" in data:  # selective copying: one length
            self.train_lengths = (data["length"], data["length"])
            self.eval_lengths = [data["length"]]
        else:
            self.train_lengths = tuple(data["train_lengths"])
            self.eval_lengths = preset.eval_lengths()
        self.eval_batches = train.get("eval_batches", 1)
        self.eval_batch_size = train.get("eval_batch_size", self.batch_size)
        self.val_seed, self.test_seed = train.get("val_seed", 0), train.get("test_seed", 1)
        self.seed = seed
        mean_len = sum(self.train_lengths) / 2
        self.tokens_per_step = int(self.batch_size * mean_len * train.get("grad_accum", 1))
        self._eval_sets: dict[int, dict] = {}
        self.splits_note = (f"train lengths {self.train_lengths[0]}..{self.train_lengths[1]}, "
                            f"evaluate at {self.eval_lengths[0]}..{self.eval_lengths[-1]}")

    def batch(self, step: int, micro: int):
        from ..data.tasks import random_length_batch
        from ..data.text import _generator
        b = random_length_batch(self.task, _generator(self.seed, step, micro), self.batch_size, *self.train_lengths,
                                **self.options)
        return b.input_ids, b.targets

    def loss(self, logits, targets, reduction: str = "mean"):
        from ..data.tasks import IGNORE_INDEX
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX,
                               reduction=reduction)

    @torch.no_grad()
    def evaluate(self, model, device, autocast, full: bool = False) -> dict:
        """Accuracy over the answer positions, the mean over the evaluation lengths."""
        from ..data.tasks import AccuracyCounts, IGNORE_INDEX, accuracy, eval_set

        seed = self.test_seed if full else self.val_seed
        if seed not in self._eval_sets:
            self._eval_sets[seed] = eval_set(self.task, self.eval_lengths, self.eval_batch_size, self.eval_batches,
                                             seed=seed, **self.options)
        accs, total, n = [], 0.0, 0
        for batches in self._eval_sets[seed].values():
            counts = AccuracyCounts()
            for b in batches:
                with autocast():
                    logits = model(b.input_ids.to(device))
                y = b.targets.to(device)
                total += self.loss(logits, y, "sum").item()
                n += int((y != IGNORE_INDEX).sum())
                counts = counts + accuracy(logits, y)
            accs.append(counts.accuracy)
        return {"loss": total / max(n, 1), "accuracy": sum(accs) / len(accs)}


def make_workload(preset: Preset, spec: RunSpec):
    if "corpus" in preset.data:
        return TextWorkload(preset, spec.seed, spec.data_dir)
    return TaskWorkload(preset, spec.task or preset.tasks[0], spec.seed)


# --- one run ----------------------------------------------------------------------------------


def _lr_at(step: int, steps: int, train: dict) -> float:
    """Linear warmup, then cosine from lr to min_lr at the last step (minrnn train's schedule)."""
    from types import SimpleNamespace

    from ..training.loop import lr_factor
    schedule = SimpleNamespace(lr=train["lr"], min_lr=train.get("min_lr", train["lr"]),
                               warmup_steps=train.get("warmup_steps", 0), steps=steps)
    return train["lr"] * lr_factor(step, schedule)


def _param_groups(model, train: dict) -> list[dict]:
    """minrnn train's groups (decay on matrices only); with ``decay_recurrence = false`` also
    none on a minRNN's gate and candidate projection (the paper's selective-copying recipe)."""
    from ..training.loop import param_groups
    recurrent = None if train.get("decay_recurrence", True) else (lambda name: "mixer.in_proj" in name)
    return param_groups(model, train.get("weight_decay", 0.0), recurrent)


def _peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# What --optim may change: settings read only by the optimiser and its schedule. Batch size and
# context stay the preset's, since they also decide the data a run sees and its token count.
OPTIM_KEYS = {"weight_decay": float, "beta1": float, "beta2": float, "grad_clip": float,
              "warmup_steps": int, "min_lr": float, "decay_recurrence": bool}


def run_train_settings(preset: Preset, spec: RunSpec) -> dict:
    """The model's optimiser settings from the preset, with ``spec.lr`` as the peak learning rate
    if given (the floor of the schedule, min_lr, keeps its ratio to the peak), then ``spec.optim``
    on top (an explicit min_lr there wins)."""
    train = dict(preset.train_settings(spec.model))
    if spec.lr is not None:
        if "min_lr" in train:
            train["min_lr"] = train["min_lr"] * spec.lr / train["lr"]
        train["lr"] = spec.lr
    train.update(spec.optim)
    return train


def build_run_model(spec: RunSpec, preset: Preset, work) -> torch.nn.Module:
    """The model of a run, freshly initialised from the current RNG state (on the CPU)."""
    from .baselines import build_model

    target, overrides = preset.model_settings(spec.model, work.vocab_size, **spec.sweep)
    return build_model(spec.model, work.vocab_size, target, **{**overrides, **spec.options})


def train_run(spec: RunSpec, run_dir: Path, log: Callable[[str], None] = print, progress: bool = True,
              keep_weights: bool = False) -> dict:
    """Train one run to ``spec.steps`` (continuing from ``run_dir/checkpoint.pt`` if there is
    one) and write result.json; returns the result. ``keep_weights`` also writes the trained
    model's state dict to ``run_dir/weights.pt`` (for analyses such as
    ``python -m minrnn.experiments.recall``)."""
    preset = load_preset(spec.experiment, spec.preset)
    train = run_train_settings(preset, spec)
    device = torch.device(spec.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CompareError(f"device {spec.device!r}: CUDA is not available on this machine")
    if spec.dtype == "bfloat16":
        def autocast():
            return torch.autocast(device.type, dtype=torch.bfloat16)
    else:
        autocast = contextlib.nullcontext
    work = make_workload(preset, spec)
    torch.manual_seed(spec.seed)
    model = build_run_model(spec, preset, work).to(device)
    info = model.baseline
    opt = torch.optim.AdamW(_param_groups(model, train), lr=train["lr"],
                            betas=(train.get("beta1", 0.9), train.get("beta2", 0.999)),
                            **({"fused": True} if device.type == "cuda" else {}))
    accum, clip = train.get("grad_accum", 1), train.get("grad_clip", 0.0)
    eval_every = spec.eval_every or train.get("eval_every", 250)
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path, metrics_path = run_dir / "checkpoint.pt", run_dir / "metrics.jsonl"
    step, wall, history = 0, 0.0, []
    if ckpt_path.exists():
        state = torch.load(ckpt_path, map_location=device, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        if device.type == "cuda" and state.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(state["cuda_rng"], device)
        step, wall, history = state["step"], state["wall_s"], state["history"]
        log(f"  {spec.name}: resuming at step {step}")
    # the metrics file holds exactly the checkpoint's evaluations (a crash may have left more)
    write_atomic(metrics_path, "".join(json.dumps(r) + "\n" for r in history).encode())
    log(f"  {spec.name}: {info.params:,} parameters (width {info.width}, {info.num_layers} layers"
        + (f", MLP {info.mlp_width}" if info.mlp_width else "") + f"), {spec.steps} steps on {device}")

    bar = None
    if progress:
        with contextlib.suppress(ImportError):
            from tqdm import tqdm
            bar = tqdm(total=spec.steps, initial=step, desc=spec.name, leave=False, dynamic_ncols=True)
    model.train()
    train_loss = torch.zeros((), device=device)
    losses_since = 0
    while step < spec.steps:
        t0 = time.perf_counter()
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, spec.steps, train)
        for micro in range(accum):
            x, y = work.batch(step, micro)
            with autocast():
                logits = model(x.to(device, non_blocking=True))
            loss = work.loss(logits, y.to(device, non_blocking=True))
            (loss / accum).backward()
            train_loss += loss.detach() / accum
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        losses_since += 1
        out_of_time = spec.budget_s is not None and wall + time.perf_counter() - t0 >= spec.budget_s
        if step % eval_every == 0 or step == spec.steps or out_of_time:
            mean_train = (train_loss / losses_since).item()  # synchronises the device
            wall += time.perf_counter() - t0
            if not math.isfinite(mean_train):
                raise FloatingPointError(f"{spec.name}: training loss is {mean_train} at step {step}")
            model.eval()
            val = work.evaluate(model, device, autocast)
            model.train()
            record = {"step": step, "wall_s": round(wall, 3), "lr": _lr_at(step - 1, spec.steps, train),
                      "train_loss": mean_train, **{f"val_{k}": v for k, v in val.items()}}
            history.append(record)
            with open(metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")
            if bar is not None:
                bar.set_postfix(val=f"{val.get('accuracy', val['loss']):.4f}")
            else:
                log(f"  {spec.name}: step {step} val {val}")
            train_loss.zero_()
            losses_since = 0
            if step < spec.steps:
                buf = _to_bytes({"model": model.state_dict(), "optimizer": opt.state_dict(),
                                 "rng": torch.get_rng_state(), "step": step, "wall_s": wall, "history": history,
                                 "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None})
                write_atomic(ckpt_path, buf)
        else:
            wall += time.perf_counter() - t0
        if bar is not None:
            bar.update(1)
        if out_of_time:
            log(f"  {spec.name}: stopped by the time budget ({spec.budget_s:g} s) at step {step} of {spec.steps}")
            break
    if bar is not None:
        bar.close()

    model.eval()
    final = work.evaluate(model, device, autocast, full=True)
    key = "val_accuracy" if work.kind == "task" else "val_loss"
    best = (max if work.kind == "task" else min)(history, key=lambda r: r[key])
    result = {
        "run": spec.name, "model": spec.model, "task": spec.task, "sweep": spec.sweep,
        "params": info.params, "width": info.width, "num_layers": info.num_layers, "mlp_width": info.mlp_width,
        "steps": step, "planned_steps": spec.steps, "lr": train["lr"], "final_val": history[-1][key], "best_val": best[key],
        "best_step": best["step"],
        "final_split": final, "wall_s": wall, "tokens_per_s": step * work.tokens_per_step / wall,
        "peak_memory_mib": _peak_memory_mib(device), "device": _device_name(device), "dtype": spec.dtype,
        "data": work.splits_note, "options": spec.options, "optim": spec.optim, "history": history, "spec": spec.to_json(),
    }
    if keep_weights:  # before result.json: a finished run asked to keep its weights has them
        write_atomic(run_dir / "weights.pt", _to_bytes(model.state_dict()))
    write_atomic(run_dir / "result.json", json.dumps(result, indent=1).encode())
    ckpt_path.unlink(missing_ok=True)
    return result


def _to_bytes(obj) -> bytes:
    import io
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


# --- many runs --------------------------------------------------------------------------------


def plan_runs(experiment: str, preset_name: str, models: list[str] | None = None, steps: int | None = None,
              tasks: list[str] | None = None, seed: int = 0, device: str = "cpu", dtype: str = "float32",
              data_dir: str | None = None, eval_every: int | None = None, sweep: bool = True,
              budget_s: float | None = None, lr: float | None = None,
              options: dict[str, dict] | None = None, optim: dict | None = None) -> list[RunSpec]:
    """The runs ``minrnn compare`` makes, in order: models x Chomsky tasks x sweep values.
    ``options`` maps a model name to build options on top of the preset's (``--set``);
    ``optim`` holds optimiser settings for every run on top of the preset's (``--optim``,
    keys in ``OPTIM_KEYS``)."""
    experiment = experiment.replace("-", "_")
    if experiment not in EXPERIMENTS:
        raise CompareError(f"unknown experiment {experiment!r}; known: {', '.join(EXPERIMENTS)}")
    try:
        preset = load_preset(experiment, preset_name)
    except KeyError as e:
        raise CompareError(f"--preset: {e.args[0]}") from None
    models = list(models or preset.models)
    unknown = [m for m in models if m not in preset.models]
    if unknown:
        raise CompareError(f"--models: {unknown} not in the {experiment}/{preset_name} preset's "
                           f"{list(preset.models)}")
    steps = preset.train["steps"] if steps is None else steps
    if steps < 1:
        raise CompareError(f"--steps must be >= 1, got {steps}")
    if dtype not in DTYPES:
        raise CompareError(f"--dtype must be one of {DTYPES}, got {dtype!r}")
    run_tasks = [None]
    if "tasks" in preset.data:
        run_tasks = list(tasks or preset.tasks)
        bad = [t for t in run_tasks if t not in preset.tasks]
        if bad:
            raise CompareError(f"--tasks: {bad} not in the preset's tasks {list(preset.tasks)}")
    elif tasks:
        raise CompareError(f"--tasks is for the Chomsky experiment; {experiment} has one task")
    sweeps = [{}]
    if sweep and preset.sweep:
        (key, values), = preset.sweep.items()
        sweeps = [{key: v} for v in values]
    if budget_s is not None and not budget_s > 0:
        raise CompareError(f"--budget-s must be > 0, got {budget_s}")
    if lr is not None and not (math.isfinite(lr) and lr > 0):
        raise CompareError(f"--lr must be a positive number, got {lr}")
    options = dict(options or {})
    stray = [m for m in options if m not in models]
    if stray:
        raise CompareError(f"--set names {stray}, which this comparison does not run (its models: {models})")
    for m, opts in options.items():
        unknown = sorted(set(opts) - _option_keys(m))
        if unknown:
            raise CompareError(f"--set {m}.{unknown[0]}: {m} has no option {unknown[0]!r} (transformers configs "
                               "would keep a misspelt key silently, so only known ones are taken)")
    optim = check_optim(optim or {})
    digest = digest_of(preset)
    return [RunSpec(experiment, preset_name, m, steps, t, s, seed, device, dtype, data_dir, eval_every, budget_s,
                    digest, lr, dict(options.get(m, {})), dict(optim))
            for t in run_tasks for s in sweeps for m in models]


def _option_keys(model: str) -> set[str]:
    """The build options ``model`` knows: build_model's own, and its config's fields."""
    from .baselines import GENERIC_KEYS

    keys = set(GENERIC_KEYS)
    if model in ("mingru", "minlstm"):
        from ..training.config import MODEL_KEYS
        return keys | set(MODEL_KEYS)
    if model in ("lstm", "gru"):
        return keys
    import transformers

    config = {"llama": "LlamaConfig", "gpt2": "GPT2Config", "mamba": "MambaConfig"}[model]
    keys |= set(getattr(transformers, config)().to_dict())
    return keys | ({"mamba_scan"} if model == "mamba" else set())


def parse_options(items: list[str]) -> dict[str, dict]:
    """``["mingru.mingru_forget_bias=3.0", ...]`` -> ``{"mingru": {"mingru_forget_bias": 3.0}}``;
    values are read as TOML values (numbers, true/false, quoted strings), else kept as text."""
    from .presets import tomllib

    out: dict[str, dict] = {}
    for item in items:
        target, eq, value = item.partition("=")
        model, dot, key = target.partition(".")
        if not (eq and dot and model and key):
            raise CompareError(f"--set {item!r}: expected MODEL.KEY=VALUE, e.g. mingru.mingru_forget_bias=3.0")
        try:
            parsed = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            parsed = value
        out.setdefault(model, {})[key] = parsed
    return out


def check_optim(optim: dict) -> dict:
    """``--optim`` settings checked against ``OPTIM_KEYS``: a known key, a value of its type
    (an int is taken for a float), nothing negative; returns them with floats as floats."""
    out = {}
    for key, value in optim.items():
        kind = OPTIM_KEYS.get(key)
        if kind is None:
            raise CompareError(f"--optim {key}: not an optimiser setting; known: {', '.join(sorted(OPTIM_KEYS))} "
                               "(the learning rate has --lr, the step count --steps)")
        ok = (isinstance(value, bool) if kind is bool else
              isinstance(value, int) and not isinstance(value, bool) if kind is int else
              isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value))
        if not ok or (kind is not bool and value < 0):
            expected = {bool: "true or false", int: "a whole number >= 0", float: "a finite number >= 0"}[kind]
            raise CompareError(f"--optim {key}={value!r}: expected {expected}")
        out[key] = float(value) if kind is float else value
    return out


def parse_optim(items: list[str]) -> dict:
    """``["weight_decay=0.3", ...]`` -> ``{"weight_decay": 0.3}`` (values read as TOML values);
    checked by ``check_optim`` when the runs are planned."""
    from .presets import tomllib

    out = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not (eq and key):
            raise CompareError(f"--optim {item!r}: expected KEY=VALUE, e.g. weight_decay=0.3")
        try:
            out[key] = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            out[key] = value
    return out


def digest_of(preset: Preset) -> str:
    """A short hash of everything a preset says (models, sizes, data, optimiser)."""
    import hashlib
    text = json.dumps(asdict(preset), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def experiment_dir(out: Path, spec: RunSpec) -> Path:
    return Path(out) / f"{spec.experiment}-{spec.preset}"


def run_all(runs: list[RunSpec], out: Path, isolate: bool = True, log: Callable[[str], None] = print,
            progress: bool = True, threads: int | None = None, keep_weights: bool = False) -> list[dict]:
    """Train every run not already finished under ``out``; returns every result (old and new)."""
    results = []
    for i, spec in enumerate(runs, 1):
        run_dir = experiment_dir(out, spec) / "runs" / spec.name
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
                + (" (trained without --keep-weights: no weights.pt)"
                   if keep_weights and not (run_dir / "weights.pt").exists() else ""))
            results.append(json.loads(result_path.read_text()))
            continue
        log(f"[{i}/{len(runs)}] {spec.name}")
        if isolate:
            cmd = [sys.executable, "-m", "minrnn.experiments.compare", "--run-dir", str(run_dir),
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


# --- the report -------------------------------------------------------------------------------


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
            ref_rows = [r for r in rows if r["model"] in TRANSFORMERS
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
        extra = ["ppl"] if "wikitext" in preset.experiment else []
        header = ["run", "params", "steps", "peak lr", f"final val {metric}", f"best val (step)", final_name, *extra,
                  reach_name, "wall s", "tokens/s", "peak MiB"]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for r in rows:
            target = targets.get(json.dumps(r["sweep"], sort_keys=True), (None,))[0]
            reach = _steps_to_reach(r, target, key, task_kind) if target is not None else None
            final = r["final_split"]["accuracy" if task_kind else "loss"]
            steps_cell = str(r["steps"]) + ("" if r["steps"] == r.get("planned_steps", r["steps"])
                                            else f" of {r['planned_steps']} (time budget)")
            lr = r.get("lr", preset.train_settings(r["model"])["lr"])  # results from before "lr" was recorded
            cells = [r["run"], f"{r['params']:,}", steps_cell, f"{lr:g}", f"{r['final_val']:.4f}",
                     f"{r['best_val']:.4f} ({r['best_step']})",
                     f"{final:.4f}", *([f"{math.exp(final):.1f}"] if extra else []),
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


def compare(experiment: str, preset: str = "cpu", models: list[str] | None = None, out: str | Path = "results",
            steps: int | None = None, tasks: list[str] | None = None, seed: int = 0, device: str = "cpu",
            dtype: str = "float32", data_dir: str | None = None, eval_every: int | None = None,
            sweep: bool = True, budget_s: float | None = None, lr: float | None = None, isolate: bool = True,
            log: Callable[[str], None] = print, progress: bool = True, threads: int | None = None,
            options: dict[str, dict] | None = None, keep_weights: bool = False,
            optim: dict | None = None) -> Path:
    """Plan, train (skipping finished runs) and report; returns the path of results.md.
    ``keep_weights``: each run trained now also writes its final weights (``weights.pt``).
    ``optim``: optimiser settings for every run on top of the preset's (see ``OPTIM_KEYS``)."""
    runs = plan_runs(experiment, preset, models, steps, tasks, seed, device, dtype, data_dir, eval_every, sweep,
                     budget_s, lr, options, optim)
    if threads is not None and not isolate:
        raise CompareError("threads needs isolate=True (a thread count is fixed per process)")
    results = run_all(runs, Path(out), isolate, log, progress, threads, keep_weights)
    folder = experiment_dir(Path(out), runs[0])
    return report(results, folder, f"{runs[0].experiment}, preset {preset}", load_preset(runs[0].experiment, preset))


def _child(argv=None) -> int:
    """Entry point of the per-run process: ``python -m minrnn.experiments.compare --run-dir D``."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--run-dir", type=Path, required=True)
    ap.add_argument("--data-dir", default="")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--keep-weights", action="store_true")
    args = ap.parse_args(argv)
    spec_dict = json.loads((args.run_dir / "spec.json").read_text())
    spec = RunSpec(**spec_dict, data_dir=args.data_dir or None)
    if os.environ.get("MINRNN_COMPARE_THREADS"):
        torch.set_num_threads(int(os.environ["MINRNN_COMPARE_THREADS"]))
    train_run(spec, args.run_dir, log=functools.partial(print, flush=True), progress=not args.no_progress,
              keep_weights=args.keep_weights)
    return 0


if __name__ == "__main__":
    sys.exit(_child())
