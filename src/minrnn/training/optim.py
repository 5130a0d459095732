"""The optimiser, its schedule and the autocast of a run: what the engine (loop.py) and the
training-step benchmark build alike."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable

import torch

from .config import ConfigError, TrainConfig


def lr_factor(step: int, config) -> float:
    """Multiplier of ``config.lr`` at optimiser step ``step`` (0-based): linear warmup over
    ``warmup_steps``, then a cosine from lr down to min_lr at the last step."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    span = max(1, config.steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / span)
    floor = config.min_lr / config.lr
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def param_groups(model: torch.nn.Module, weight_decay: float,
                 exempt: Callable[[str], bool] | None = None) -> list[dict]:
    """Weight decay on matrices (projections, embeddings, conv kernels), none on vectors
    (biases, norm scales): decaying a norm's scale towards 0 only fights the norm. Nor on
    the parameters whose name ``exempt`` accepts."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():  # named_parameters lists tied weights once
        if p.requires_grad:
            (decay if p.dim() >= 2 and not (exempt and exempt(name)) else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _recurrent_projection(name: str) -> bool:
    return "mixer.in_proj" in name  # a minRNN's gate and candidate projection


def build_optimizer(model: torch.nn.Module, config: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """The engine's AdamW for ``model`` on ``device``: ``param_groups`` (decay on matrices only, and
    on the recurrence's projection unless ``decay_recurrence`` is false), the config's lr and
    betas, the fused kernel unless ``fused_optimizer`` is false."""
    exempt = None if config.decay_recurrence else _recurrent_projection
    fused = config.fused_optimizer
    return torch.optim.AdamW(param_groups(model, config.weight_decay, exempt), lr=config.lr,
                             betas=(config.beta1, config.beta2), fused=fused or None,
                             foreach=device.type == "cuda" and not fused)


def autocast_context(config: TrainConfig, device: torch.device):
    if config.dtype == "bfloat16":
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ConfigError("dtype = bfloat16 asked for, but this GPU does not support bfloat16")
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
