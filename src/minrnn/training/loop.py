"""The Trainer: a minGRU/minLSTM language model trained on text, resumable to the bit.

    from minrnn.training import TrainConfig, Trainer
    Trainer(TrainConfig.from_file("configs/shakespeare_char.toml")).train()

What a run directory holds: ``config.toml`` (the resolved config), ``tokenizer.json``,
``metrics.jsonl``, ``loss.png`` and ``checkpoints/`` (see checkpoint.py).

Why a resumed run equals an uninterrupted one: the batch of step s is a function of
(seed, s) alone (minrnn.data.text), the learning rate is a function of s, and the checkpoint
holds everything else that changes: weights, AdamW moments, the scheduler's step and the RNG
states that dropout draws from.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from ..data.text import (
    DataError, check_long_enough, encode_splits, eval_offsets, load_splits, train_offsets, windows,
)
from ..data.tokenizers import build_tokenizer, load_tokenizer
from . import checkpoint as ckpt
from .config import ConfigError, TrainConfig
from .distributed import Dist
from .metrics import MetricsLog, plot_losses, truncate_after


def build_model(config: TrainConfig, vocab_size: int):
    from ..models import MinRNNConfig, MinRNNForCausalLM

    try:
        mcfg = MinRNNConfig(vocab_size=vocab_size, **config.model)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"[model]: {e}") from None
    return MinRNNForCausalLM(mcfg)


def lr_factor(step: int, config: TrainConfig) -> float:
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


def autocast_context(config: TrainConfig, device: torch.device):
    if config.dtype == "bfloat16":
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ConfigError("dtype = bfloat16 asked for, but this GPU does not support bfloat16")
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def token_loss_sum(model, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy (nats) of inputs x against targets y, both (B, T)."""
    logits = model(input_ids=x, use_cache=False).logits
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum")


@torch.no_grad()
def evaluate(model, tokens: torch.Tensor, config: TrainConfig, device: torch.device, dist: Dist = Dist()) -> float:
    """Mean next-token loss over the split's evaluation windows (`eval_offsets`), shared out
    over the processes; the same number `minrnn eval` prints for that split."""
    was_training = model.training
    model.eval()
    offsets = eval_offsets(tokens.numel(), config.seq_len, config.eval_windows)[dist.rank::dist.world_size]
    per = max(1, config.batch_size // dist.world_size)
    total = torch.zeros(2, dtype=torch.float64, device=device)
    with autocast_context(config, device):
        for i in range(0, offsets.numel(), per):
            x, y = windows(tokens, offsets[i:i + per], config.seq_len)
            total[0] += token_loss_sum(model, x.to(device), y.to(device)).double()
            total[1] += y.numel()
    total = dist.sum(total)
    model.train(was_training)
    return (total[0] / total[1]).item()


class Trainer:
    """Trains ``config``'s model on ``config``'s data, writing to ``config.out_dir``.

    ``resume=True`` continues from the newest good checkpoint there (an error when there is
    none); without it, a directory that already holds checkpoints is an error, so that a run
    is never overwritten by accident. ``log`` receives the lines meant for the user.
    """

    def __init__(self, config: TrainConfig, resume: bool = False, log: Callable[[str], None] | None = None):
        self.config = config
        try:
            self.device = torch.device(config.device)
        except RuntimeError as e:
            raise ConfigError(f"device {config.device!r}: {e}") from None
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"device {config.device!r}: CUDA is not available on this machine")
        if self.device.type not in ("cpu", "cuda"):
            raise ConfigError(f"device must be cpu or cuda, got {config.device!r}")
        self.dist = Dist.from_env(self.device)
        self.device = self.dist.device(self.device)
        self._log = log or (lambda s: print(s, flush=True))
        if config.threads:
            torch.set_num_threads(config.threads)
        self.run_dir = Path(config.out_dir)
        if config.batch_size % self.dist.world_size:
            raise ConfigError(f"batch_size {config.batch_size} must be a multiple of the number of processes "
                              f"({self.dist.world_size})")
        self.per_rank = config.batch_size // self.dist.world_size

        existing = ckpt.list_checkpoints(self.run_dir)
        if resume and not existing:
            raise ckpt.CheckpointError(f"--resume: no checkpoint in {ckpt.checkpoint_root(self.run_dir)}")
        if existing and not resume:
            raise ConfigError(f"{self.run_dir} already holds checkpoints; pass --resume to continue that run, "
                              "or choose another out_dir")

        # data and tokenizer (rank 0 builds and saves the tokenizer; the others read it back)
        splits = load_splits(config.data, config.data_dir or None)
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            if resume:
                self.tokenizer = load_tokenizer(self.run_dir)
            else:
                text = "".join(splits.values()) if config.tokenizer == "char" else splits["train"]
                self.tokenizer = build_tokenizer(config.tokenizer, text, config.bpe_vocab_size)
                self.tokenizer.save(self.run_dir)
        self.dist.barrier()
        if not self.dist.is_main:
            self.tokenizer = load_tokenizer(self.run_dir)
        try:
            self.tokens = encode_splits(self.tokenizer, splits)
        except ValueError as e:
            raise DataError(f"data {config.data}: {e}") from None
        for split in ("train", "valid"):
            check_long_enough(self.tokens[split], config.seq_len, split)

        # model, optimiser, schedule: the same initial weights in every process
        torch.manual_seed(config.seed)
        self.model = build_model(config, self.tokenizer.vocab_size).to(self.device)
        self.model.train()
        self.optimizer = torch.optim.AdamW(param_groups(self.model, config.weight_decay), lr=config.lr,
                                           betas=(config.beta1, config.beta2),
                                           foreach=self.device.type == "cuda")
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(s, config))
        # dropout streams differ per process
        torch.manual_seed(config.seed + 1 + self.dist.rank)
        self.step = 0
        if resume:
            self._restore()
        if self.dist.is_main:  # after _restore: a config the checkpoint rejects never replaces the run's
            ckpt.write_atomic(self.run_dir / "config.toml", config.to_toml().encode())
        self.ddp = self.model
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel

            self.ddp = DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.metrics = MetricsLog(self.run_dir) if self.dist.is_main else None

    # --- checkpoints ------------------------------------------------------------------------

    def _model_signature(self) -> dict:
        return {"vocab_size": self.tokenizer.vocab_size, "tokenizer": self.tokenizer.kind, **self.config.model}

    def _restore(self) -> None:
        path, model_state, state, manifest = ckpt.load_latest(self.run_dir)
        data = {"data": self.config.data, "train_tokens": self.tokens["train"].numel()}
        if state.get("data_signature", data) != data:
            raise ckpt.CheckpointError(f"{path} was trained on other data ({state['data_signature']}); "
                                       f"this config reads {data}")
        saved = state.get("model_signature", {})
        mine = self._model_signature()
        if saved != mine:
            diff = ", ".join(f"{k}: checkpoint {saved.get(k)!r} vs config {mine.get(k)!r}"
                             for k in sorted(set(saved) | set(mine)) if saved.get(k) != mine.get(k))
            raise ckpt.CheckpointError(f"{path} was saved by another architecture ({diff})")
        load_model_state(self.model, model_state, path)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        rngs = state["rng"]
        if len(rngs) == self.dist.world_size:
            torch.set_rng_state(rngs[self.dist.rank]["cpu"])
            if self.device.type == "cuda" and rngs[self.dist.rank].get("cuda") is not None:
                torch.cuda.set_rng_state(rngs[self.dist.rank]["cuda"], self.device)
        else:
            self._log(f"resuming with {self.dist.world_size} processes from a run of {len(rngs)}: "
                      "dropout draws differ from an uninterrupted run")
        self.step = state["step"]
        self.best = manifest.get("val_loss")
        if self.dist.is_main:
            truncate_after(self.run_dir, self.step)
            self._log(f"resumed from {path} (step {self.step})")

    def _rng_state(self) -> dict:
        return {"cpu": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None}

    def save(self, val_loss: float | None) -> None:
        rngs = self.dist.gather(self._rng_state())
        if self.dist.is_main:
            state = {"step": self.step, "optimizer": self.optimizer.state_dict(),
                     "scheduler": self.scheduler.state_dict(), "rng": rngs,
                     "model_signature": self._model_signature(),
                     "data_signature": {"data": self.config.data, "train_tokens": self.tokens["train"].numel()}}
            ckpt.save_checkpoint(self.run_dir, self.step, self.model.state_dict(), state, val_loss)
            ckpt.prune(self.run_dir, self.config.keep_last)
        self.dist.barrier()

    # --- the loop -------------------------------------------------------------------------

    def _progress(self):
        show = self.dist.is_main and (self.config.progress == "always"
                                      or (self.config.progress == "auto" and sys.stderr.isatty()))
        if not show:
            return None
        from tqdm.auto import tqdm

        return tqdm(total=self.config.steps, initial=self.step, unit="step", dynamic_ncols=True)

    def train(self) -> dict:
        """Run to ``config.steps``; returns {"step", "train_loss", "val_loss"} of the end."""
        c = self.config
        train_tokens = self.tokens["train"]
        bar = self._progress()
        say = (bar.write if bar is not None else self._log) if self.dist.is_main else (lambda s: None)
        if self.step == 0 and self.dist.is_main:
            n = sum(p.numel() for p in self.model.parameters())
            say(f"training {n / 1e6:.2f}M parameters on {c.data} ({train_tokens.numel()} train tokens, "
                f"vocabulary {self.tokenizer.vocab_size}) for {c.steps} steps; writing to {self.run_dir}")
        train_loss = val_loss = None
        tokens_per_step = c.batch_size * c.grad_accum * c.seq_len
        t_last = time.perf_counter()
        while self.step < c.steps:
            self.optimizer.zero_grad(set_to_none=True)
            loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
            for micro in range(c.grad_accum):
                offsets = train_offsets(train_tokens.numel(), c.seq_len, c.batch_size, c.seed, self.step, micro)
                mine = offsets[self.dist.rank * self.per_rank:(self.dist.rank + 1) * self.per_rank]
                x, y = (t.to(self.device) for t in windows(train_tokens, mine, c.seq_len))
                sync = contextlib.nullcontext() if micro == c.grad_accum - 1 or not self.dist.enabled \
                    else self.ddp.no_sync()
                with sync:
                    with autocast_context(c, self.device):
                        loss = token_loss_sum(self.ddp, x, y) / y.numel()
                    (loss / c.grad_accum).backward()
                loss_sum += loss.detach().double()
            # the norm before clipping, logged: it shows a run heading for divergence
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(),
                                                       c.grad_clip if c.grad_clip > 0 else math.inf).item()
            lr = self.optimizer.param_groups[0]["lr"]
            self.optimizer.step()
            self.scheduler.step()
            self.step += 1
            train_loss = (self.dist.sum(loss_sum) / (c.grad_accum * self.dist.world_size)).item()
            if not math.isfinite(train_loss):
                raise FloatingPointError(f"the training loss became {train_loss} at step {self.step}; "
                                         "try a lower lr or grad_clip")
            now = time.perf_counter()
            tok_s = tokens_per_step / max(now - t_last, 1e-9)
            t_last = now
            record = {"step": self.step, "train_loss": train_loss, "lr": lr, "grad_norm": grad_norm,
                      "tokens_per_s": round(tok_s, 1)}
            if self.step % c.eval_every == 0 or self.step == c.steps:
                val_loss = evaluate(self.ddp, self.tokens["valid"], c, self.device, self.dist)
                record["val_loss"] = val_loss
            if self.metrics is not None:
                self.metrics.write(record)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{train_loss:.4f}", tok_s=f"{tok_s:,.0f}")
            if "val_loss" in record:
                say(f"step {self.step}/{c.steps}: train loss {train_loss:.4f}, val loss {val_loss:.4f}, "
                    f"lr {lr:.2e}, {tok_s:,.0f} tokens/s")
                if c.plot and self.dist.is_main:
                    plot_losses(self.run_dir)
            elif bar is None and self.step % c.log_every == 0:
                say(f"step {self.step}/{c.steps}: train loss {train_loss:.4f}, lr {lr:.2e}, {tok_s:,.0f} tokens/s")
            if self.step % c.checkpoint_every == 0 or self.step == c.steps:
                self.save(record.get("val_loss"))
        if bar is not None:
            bar.close()
        if self.metrics is not None:
            self.metrics.close()
        return {"step": self.step, "train_loss": train_loss, "val_loss": val_loss}

    def close(self) -> None:
        self.dist.close()


def load_model_state(model, state: dict, path) -> None:
    """Load ``state`` into ``model``, or a CheckpointError saying how the shapes disagree."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    extra = sorted(set(state) - set(own))
    wrong = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
             for k in own if k in state and state[k].shape != own[k].shape]
    if missing or extra or wrong:
        parts = ([f"missing {missing[:3]}"] if missing else []) + ([f"unexpected {extra[:3]}"] if extra else []) + wrong[:3]
        raise ckpt.CheckpointError(f"{path} holds weights of another architecture: {'; '.join(parts)}")
    model.load_state_dict(state)


def load_run(run_dir: str | Path, checkpoint: str = "latest", device: str = "cpu"):
    """(config, tokenizer, model in eval mode, checkpoint path) of a finished or running run."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.toml").is_file():
        raise FileNotFoundError(f"{run_dir / 'config.toml'} not found: {run_dir} is not a training run directory")
    config = TrainConfig.from_file(run_dir / "config.toml")
    tokenizer = load_tokenizer(run_dir)
    model = build_model(config, tokenizer.vocab_size)
    path, state, _, _ = ckpt.load_latest(run_dir, checkpoint)
    load_model_state(model, state, path)
    model.to(device).eval()
    return config, tokenizer, model, path
