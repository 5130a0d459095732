"""A finished `minrnn compare` run, loaded back for evaluation (`minrnn eval --run RUN`).

    run = load_compare_run("runs/compare/wikitext2-cpu/runs/mingru")
    logits = run.model(input_ids)              # (B, T) int64 -> (B, T, vocab_size)
    run.config.seq_len, run.eval_split         # the run's context and the split it was scored on

A compare run folder (``OUT/EXPERIMENT-PRESET/runs/RUN/``, see runner.py) holds spec.json,
result.json and, when compare ran with ``--keep-weights``, weights.pt. The model is rebuilt as
the harness built it (`build_run_model`: the preset's sizes, the run's options) and the
tokenizer is the one the harness's workload makes for that preset (`make_workload`: the same
corpus, tokenizer kind and vocabulary), so the rebuilt run reads the tokens it was trained on.
A preset edited since the run trained cannot rebuild it and is refused.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..training.checkpoint import CheckpointError
from ..training.config import TrainConfig
from .plan import CompareError, RunSpec, digest_of
from .presets import Preset, load_preset

__all__ = ["CompareRun", "compare_logits", "is_compare_run", "load_compare_run"]


@dataclass
class CompareRun:
    """A compare run rebuilt for evaluation.

    ``config``: the engine's settings the run trained with (seq_len, batch_size, eval_windows,
    pack_documents), with ``data``, ``tokenizer`` and ``bpe_vocab_size`` those of its workload;
    ``model``: in eval mode, ``forward(input_ids (B, T) int64, **extras) -> logits (B, T, V)``;
    ``weights``: the weights.pt it was loaded from; ``eval_split``: the split its validation
    figures are of (``test`` for WikiText-2's cpu presets)."""

    config: TrainConfig
    tokenizer: object
    model: nn.Module
    weights: Path
    spec: RunSpec
    preset: Preset
    eval_split: str


def compare_logits(model: nn.Module, input_ids: torch.Tensor, **extras) -> torch.Tensor:
    """Logits (B, T, V) of a compare model for ``input_ids`` (B, T); ``extras``: position_ids of
    packed documents."""
    return model(input_ids, **extras)


def is_compare_run(run_dir: str | Path) -> bool:
    """Whether ``run_dir`` is a run folder of `minrnn compare` (it has spec.json)."""
    return (Path(run_dir) / "spec.json").is_file()


def _spec(run_dir: Path) -> RunSpec:
    try:
        return RunSpec(**json.loads((run_dir / "spec.json").read_text()))
    except (ValueError, TypeError) as e:
        raise CompareError(f"{run_dir / 'spec.json'} is not a compare run's spec ({e})") from None


def load_compare_run(run_dir: str | Path, device: str | torch.device = "cpu", data_dir: str | None = None) -> CompareRun:
    """The model (in eval mode, on ``device``), tokenizer and settings of the finished compare
    run in ``run_dir``; ``data_dir``: where its corpus is (default: MINRNN_DATA_DIR and the
    cache). FileNotFoundError (one line) without weights.pt, CompareError for an unfinished run,
    a task run or an edited preset, CheckpointError for weights of another shape."""
    from .runner import build_run_model, make_workload

    run_dir = Path(run_dir)
    if not is_compare_run(run_dir):
        raise FileNotFoundError(f"{run_dir / 'spec.json'} not found: {run_dir} is not a compare run folder")
    spec = dataclasses.replace(_spec(run_dir), data_dir=data_dir)
    if not (run_dir / "result.json").is_file():
        raise CompareError(f"{run_dir} has not finished training (no result.json); run the same compare command "
                           "to finish it")
    weights = run_dir / "weights.pt"
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} not found: the run kept no weights; run compare with --keep-weights "
                                "(in another --out) to keep them")
    preset = load_preset(spec.experiment, spec.preset)
    if spec.preset_digest and spec.preset_digest != digest_of(preset):
        raise CompareError(f"preset {spec.experiment}/{spec.preset} has changed since {run_dir} trained; its model "
                           "and tokenizer can no longer be rebuilt as trained")
    if preset.tasks:
        raise CompareError(f"{run_dir} is a {spec.experiment} task run; minrnn eval scores text runs only")
    work = make_workload(preset, spec)  # the harness's tokenizer for this data (BPE learnt as in training)
    model = build_run_model(spec, preset, work)
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file: say which one
        raise CheckpointError(f"{weights} cannot be read ({type(e).__name__}: {e})") from None
    from ..training.loop import load_model_state

    load_model_state(model, state, weights)
    model.to(device).eval()
    config = TrainConfig.from_file(run_dir / "config.toml")
    config = dataclasses.replace(config, data=spec.data or preset.data["corpus"], data_dir=data_dir or "",
                                 tokenizer=getattr(work.tokenizer, "kind", config.tokenizer),
                                 bpe_vocab_size=preset.data.get("bpe_vocab_size", config.bpe_vocab_size))
    eval_split = "valid" if spec.data else preset.data.get("eval_split", "valid")
    return CompareRun(config, work.tokenizer, model, weights, spec, preset, eval_split)
