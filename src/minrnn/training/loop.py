"""The training engine: one loop for `minrnn train` and every run of `minrnn compare`.

    from minrnn.training import TrainConfig, Trainer
    from minrnn.training.config import find_config
    Trainer(TrainConfig.from_file(find_config("shakespeare_char"))).train()   # a minGRU LM on text
    Trainer(config, workload=TaskWorkload(...), model=ModelSpec(...)).train()   # anything else

A run is a workload (what to train on: minrnn.training.workloads) and a model (a `ModelSpec`:
how to build it and read its logits), trained with the settings of a `TrainConfig`. Without a
workload the Trainer reads ``config.data`` with ``config.tokenizer`` (a prepared folder, made by
`minrnn prepare`: its memory-mapped shards with its own tokenizer); without a model it builds
the minGRU/minLSTM language model of ``config.model``.

What a run directory holds: ``config.toml`` (the resolved config), ``tokenizer.json`` (text
runs), ``metrics.jsonl`` (one line per step, validation figures at each evaluation),
``loss.png``, ``checkpoints/`` (see checkpoint.py), ``latest`` and ``best`` (links to the
checkpoint folders that transformers' ``from_pretrained`` loads, see hf_export.py) and
``.lock`` (held while a trainer writes there, see run_folder.py).

Why a resumed run equals an uninterrupted one: the batch of step s is a function of
(seed, s) alone (see workloads.py), the learning rate is a function of s, and the checkpoint
holds everything else that changes: weights, AdamW moments, the scheduler's step, the RNG
states that dropout draws from and, in a stateful run, the state carried into the next step.
"""

from __future__ import annotations

import contextlib
import gc
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..data.text import DataError, load_splits
from . import checkpoint as ckpt
from .config import ConfigError, TrainConfig, check_model_config, check_resume_settings, check_same_config
from .distributed import Dist
from .hf_export import check_pretrained_config, link_checkpoints, load_run_tokenizer, pretrained_files
from .metrics import MetricsLog, plot_losses
from .optim import autocast_context, build_optimizer, lr_factor, param_groups  # noqa: F401 (the engine's API)
from .run_folder import RunLock, check_fresh_start, truncate_metrics, write_run_file
from .workloads import TextWorkload, Workload, prepared_workload, text_tokenizer, text_workload


def lm_logits(model, input_ids: torch.Tensor, **extras) -> torch.Tensor:
    """Logits of a transformers causal LM (no cache: training and scoring read whole windows);
    ``extras``: the batch's keyword inputs (position_ids of packed documents)."""
    return model(input_ids=input_ids, use_cache=False, **extras).logits


def lm_stateful_logits(model, input_ids: torch.Tensor, state: dict | None, **extras):
    """(logits (B, T, V), state after the last position) of a MinRNNForCausalLM (or a wrapper
    of one: DDP) starting from ``state`` (`MinRNNCache.to_tensors`' dict; None: zeros)."""
    from ..models import MinRNNCache

    config = getattr(model, "module", model).config
    cache = MinRNNCache.from_tensors(config, state) if state else MinRNNCache(config)
    out = model(input_ids=input_ids, cache=cache, use_cache=True, **extras)
    return out.logits, out.cache.to_tensors()


@dataclass
class ModelSpec:
    """How a run gets its model: ``build()`` makes it (called after seeding, on the CPU),
    ``logits(model, ids, **extras)`` reads its logits (``extras``: a batch's keyword inputs,
    see workloads.py), ``signature`` is what a checkpoint must match. ``stateful(model, ids,
    state, **extras) -> (logits, state)``: the logits and the state after the last position,
    starting from ``state`` (a dict of batch-first tensors; None: zeros), for stateful runs of
    models whose ``carries_state`` is true; None when the model has no such call."""

    build: Callable[[], torch.nn.Module]
    signature: dict = field(default_factory=dict)
    logits: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor] = lm_logits
    describe: Callable[[torch.nn.Module], str] | None = None
    stateful: Callable | None = None


def build_model(config: TrainConfig, vocab_size: int):
    """The minGRU/minLSTM language model of ``config.model``."""
    from ..models import MinRNNConfig, MinRNNForCausalLM

    check_model_config({**config.model, "vocab_size": vocab_size})
    return MinRNNForCausalLM(MinRNNConfig(vocab_size=vocab_size, **config.model))


def lm_spec(config: TrainConfig, tokenizer) -> ModelSpec:
    return ModelSpec(lambda: build_model(config, tokenizer.vocab_size),
                     {"vocab_size": tokenizer.vocab_size, "tokenizer": tokenizer.kind, **config.model},
                     stateful=lm_stateful_logits)


def text_setup(config: TrainConfig, dist: Dist, resumed_tokenizer=None):
    """(data, tokenizer) of ``config.data``.

    A prepared folder: data is its `PreparedData` (every shard's checksum checked, in every
    process, before anything trains) and the tokenizer the folder's, resumed or not (the
    checkpoint's record of the shards' checksums keeps a resume on the same tokens);
    ``config.tokenizer`` is not used. Otherwise data is {split: text},
    and on a fresh start rank 0 builds the tokenizer from it (the others read it back once rank
    0 has saved it: None here); a resumed run passes the tokenizer it was trained with."""
    from ..data.shards import PreparedData, is_prepared

    if is_prepared(config.data):
        data = PreparedData.open(config.data, verify=True)
        return data, prepared_tokenizer(data)
    if config.pack_documents:
        raise ConfigError(f"pack_documents needs a prepared folder as data (minrnn prepare; documents are known "
                          f"only there), got data {config.data!r}")
    splits = load_splits(config.data, config.data_dir or None)
    if resumed_tokenizer is not None or not dist.is_main:
        return splits, resumed_tokenizer
    return splits, text_tokenizer(splits, config.tokenizer, config.bpe_vocab_size)


def prepared_tokenizer(data):
    """The tokenizer of a prepared folder (a `PreparedData`): a DataError when it does not
    have the manifest's vocabulary."""
    from ..data.tokenizers import load_prepared_tokenizer

    tokenizer = load_prepared_tokenizer(data.tokenizer_dir)
    if tokenizer.vocab_size != data.vocab_size:
        raise DataError(f"{data.tokenizer_dir}: the tokenizer has {tokenizer.vocab_size} tokens, the manifest "
                        f"says vocab_size {data.vocab_size}: a damaged prepared folder")
    return tokenizer


def prepared_split(path, split: str, tokenizer):
    """The TokenStream of ``split`` of the prepared folder ``path`` (its shards verified), to be
    scored by a model trained with ``tokenizer``: a DataError when the folder's tokenizer maps
    other ids."""
    from ..data.shards import PreparedData

    data = PreparedData.open(path, verify=True)
    if _vocabulary(prepared_tokenizer(data)) != _vocabulary(tokenizer):
        raise DataError(f"{path}: its tokenizer is not the run's (other ids for the same text); prepare the data "
                        "with the run's tokenizer folder")
    return data.split(split)


def _vocabulary(tokenizer) -> dict[str, int]:
    return tokenizer.to_hf().get_vocab(with_added_tokens=True)


def config_workload(config: TrainConfig, tokenizer, data) -> TextWorkload:
    """The text workload of ``config`` (train on train, evaluate on valid) on ``data``: the
    {split: text} or the `PreparedData` of `text_setup`."""
    settings = dict(seq_len=config.seq_len, batch_size=config.batch_size, grad_accum=config.grad_accum,
                    eval_windows=config.eval_windows, seed=config.seed, name=config.data, stateful=config.stateful)
    if isinstance(data, dict):
        return text_workload(data, tokenizer, **settings)
    return prepared_workload(data, tokenizer, pack_documents=config.pack_documents, **settings)


class Trainer:
    """Trains a model on a workload with ``config``'s optimiser and schedule, writing to
    ``config.out_dir``.

    ``resume=True`` continues from the newest good checkpoint there (an error when there is
    none, or when a setting outside config.RESUMABLE_KEYS changed); without it, a folder that
    already holds a run is an error unless ``overwrite=True``, so a run is never mixed into
    another. The folder is locked from construction to `close` (a second trainer there is a
    RunInUseError). ``name`` labels the log lines and progress bar; ``log`` receives the lines
    meant for the user.
    """

    def __init__(self, config: TrainConfig, workload: Workload | None = None, model: ModelSpec | None = None,
                 resume: bool = False, overwrite: bool = False, log: Callable[[str], None] | None = None,
                 name: str | None = None):
        self.config, self.name = config, name
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
        if resume and overwrite:
            raise ConfigError("--resume and --overwrite exclude each other")
        self.per_rank = config.batch_size // self.dist.world_size
        check_same_config(config, self.dist)
        if model is None:
            check_model_config(config.model)
        # one trainer per run folder, taken before anything is written there
        self._lock, self.metrics = None, None
        created = not self.run_dir.exists()
        self._lock = self._on_main(lambda: RunLock(self.run_dir))
        try:
            self._setup(workload, model, resume, overwrite)
        except BaseException:
            if created and self._lock is not None:  # a start that failed leaves no folder behind
                with contextlib.suppress(OSError):
                    if [p.name for p in self.run_dir.iterdir()] == [self._lock.path.name]:
                        self._lock.path.unlink()
                        self.run_dir.rmdir()
            self.release()
            raise

    def _setup(self, workload: Workload | None, model: ModelSpec | None, resume: bool, overwrite: bool) -> None:
        config = self.config
        loaded = None
        if resume:
            self._check_resume()
            loaded = ckpt.load_latest(self.run_dir)
        else:  # refused before the data is read; cleared (with overwrite) once it has been
            self._on_main(lambda: check_fresh_start(self.run_dir) if not overwrite else None)

        # the data, and the model's validity, are settled before the run folder is written to
        self.tokenizer = None
        if workload is None:
            resumed = load_run_tokenizer(self.run_dir, loaded[0]) if loaded else None
            splits, self.tokenizer = text_setup(config, self.dist, resumed)
            if self.tokenizer is not None:
                workload = config_workload(config, self.tokenizer, splits)
        if config.stateful and model is None:  # the project's LM: refused before the folder is written
            from ..models import MinRNNConfig

            if MinRNNConfig(**config.model).attention_layer_indices:
                self._refuse_stateful("MinRNNForCausalLM", "its attention blocks keep keys that grow with the context")
        self._on_main(lambda: self._prepare_run_dir(resume, overwrite))
        if workload is None:  # the other processes read rank 0's tokenizer back
            from ..data.tokenizers import load_tokenizer

            self.tokenizer = load_tokenizer(self.run_dir)
            workload = config_workload(config, self.tokenizer, splits)
        self.workload = workload
        self.spec = model or lm_spec(config, self.tokenizer)

        # model, optimiser, schedule: the same initial weights in every process
        torch.manual_seed(config.seed)
        self.model = self.spec.build().to(self.device)
        self.model.train()
        self.carry = None  # stateful runs: this process's rows' state after the last window
        if config.stateful:
            self._check_stateful()
        # a checkpoint of the project's language model is also a transformers model folder
        self._hf_files = (pretrained_files(self.model, self.tokenizer)
                          if model is None and self.tokenizer is not None and self.dist.is_main else None)
        self.optimizer = build_optimizer(self.model, config, self.device)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(s, config))
        # dropout streams differ per process
        torch.manual_seed(config.seed + 1 + self.dist.rank)
        self.step, self.wall_s, self.best = 0, 0.0, None
        if loaded:
            self._restore(*loaded)
        # after _restore: a config the checkpoint rejects never replaces the run's
        self._on_main(lambda: write_run_file(self.run_dir / "config.toml", config.to_toml().encode()))
        if config.compile:  # in place: the state dict keeps its keys
            self.model.compile()
        self.ddp = self.model
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel

            self.ddp = DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.metrics = MetricsLog(self.run_dir) if self.dist.is_main else None

    def _on_main(self, fn: Callable[[], object]):
        """``fn()`` in rank 0 only (its result there, None elsewhere). Its error is raised in
        every process: the others would otherwise wait for rank 0 at the next collective."""
        error, result = None, None
        if self.dist.is_main:
            try:
                result = fn()
            except Exception as e:
                error = e
        if self.dist.enabled:
            shared = self.dist.broadcast(None if error is None else (type(error), str(error)))
            if shared is not None and error is None:
                kind, message = shared
                try:
                    error = kind(message)
                except Exception:  # an exception type that takes other arguments
                    error = RuntimeError(message)
        if error is not None:
            raise error
        return result

    def _prepare_run_dir(self, resume: bool, overwrite: bool) -> None:
        if not resume:
            check_fresh_start(self.run_dir, overwrite=overwrite)
            if self.tokenizer is not None:
                self.tokenizer.save(self.run_dir)

    # --- checks -----------------------------------------------------------------------------

    def _check_resume(self) -> None:
        if not ckpt.list_checkpoints(self.run_dir):
            raise ckpt.CheckpointError(f"--resume: no checkpoint in {ckpt.checkpoint_root(self.run_dir)}")
        saved = self.run_dir / "config.toml"
        if saved.is_file():
            check_resume_settings(TrainConfig.from_file(saved), self.config)

    def _check_stateful(self) -> None:
        if not getattr(self.workload, "stateful", False):
            raise ConfigError("stateful needs a text workload read as contiguous streams (built with stateful=True)")
        if self.spec.stateful is None or not getattr(self.model, "carries_state", False):
            self._refuse_stateful(type(self.model).__name__,
                                  "its attention blocks keep keys that grow with the context"
                                  if hasattr(self.model, "carries_state") else "it has no recurrent state")

    @staticmethod
    def _refuse_stateful(what: str, why: str):
        raise ConfigError(f"stateful: {what} cannot carry its state from one window to the next ({why}); stateful "
                          "runs take minGRU/minLSTM models of recurrent blocks, or LSTM/GRU")

    # --- checkpoints ------------------------------------------------------------------------

    def _restore(self, path: Path, model_state: dict, state: dict, manifest: dict) -> None:
        data = self.workload.signature()
        if state.get("data_signature", data) != data:
            raise ckpt.CheckpointError(f"{path} was trained on other data ({state['data_signature']}); "
                                       f"this config reads {data}")
        saved, mine = state.get("model_signature", {}), self.spec.signature
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
        carry = state.get("carry")
        if carry is not None:  # every row's state: this process continues its own rows
            rows = slice(self.dist.rank * self.per_rank, (self.dist.rank + 1) * self.per_rank)
            self.carry = {k: v[rows].to(self.device) for k, v in carry.items()}
        self.step, self.wall_s = state["step"], state.get("wall_s", 0.0)
        self.best = state.get("best")
        # the rows after the checkpoint are about to be written again
        self._on_main(lambda: truncate_metrics(self.run_dir, self.step))
        if self.dist.is_main:
            self._log(f"{self._prefix()}resumed from {path} (step {self.step})")

    def _rng_state(self) -> dict:
        return {"cpu": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None}

    def save(self, val_loss: float | None) -> None:
        rngs = self.dist.gather(self._rng_state())
        carry = None
        if self.carry is not None:  # the rows of every process, in rank order
            parts = self.dist.gather({k: v.cpu() for k, v in self.carry.items()})
            carry = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
        self._on_main(lambda: self._save_on_main(rngs, val_loss, carry))

    def _save_on_main(self, rngs: list, val_loss: float | None, carry: dict | None = None) -> None:
        state = {"step": self.step, "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict(), "rng": rngs, "wall_s": self.wall_s, "best": self.best,
                 "model_signature": self.spec.signature, "data_signature": self.workload.signature()}
        if carry is not None:
            state["carry"] = carry
        ckpt.save_checkpoint(self.run_dir, self.step, self.model.state_dict(), state, val_loss,
                             extra_files=self._hf_files)
        ckpt.prune(self.run_dir, self.config.keep_last)
        if self._hf_files is not None:
            link_checkpoints(self.run_dir)

    # --- evaluation ---------------------------------------------------------------------------

    def evaluate(self, full: bool = False) -> dict:
        """The workload's figures for the model now ({"loss"}, and {"accuracy"} for a task);
        ``full``: over the whole evaluation split (text) or the test set (task)."""
        was_training = self.model.training
        self.model.eval()
        try:
            return self.workload.evaluate(lambda x, **extras: self.spec.logits(self.ddp, x, **extras), self.device,
                                          lambda: autocast_context(self.config, self.device), self.dist, full)
        finally:
            self.model.train(was_training)

    # --- the loop -----------------------------------------------------------------------------

    def _prefix(self) -> str:
        return f"{self.name}: " if self.name else ""

    def _progress(self):
        show = self.dist.is_main and (self.config.progress == "always"
                                      or (self.config.progress == "auto" and sys.stderr.isatty()))
        if not show:
            return None
        from tqdm.auto import tqdm

        return tqdm(total=self.config.steps, initial=self.step, unit="step", dynamic_ncols=True, desc=self.name,
                    leave=self.name is None)

    def _describe(self) -> str:
        n = sum(p.numel() for p in self.model.parameters())
        what = self.spec.describe(self.model) if self.spec.describe else f"{n / 1e6:.2f}M parameters"
        return (f"{self._prefix()}training {what} on {self.workload.description} (vocabulary "
                f"{self.workload.vocab_size}) for {self.config.steps} steps on {self.device}; writing to {self.run_dir}")

    def _train_step(self) -> tuple[float, float, float]:
        """One optimiser step: (mean training loss over every process, gradient norm, lr used)."""
        c = self.config
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        for micro in range(c.grad_accum):
            x, y, *more = self.workload.batch(self.step, micro)  # more: [extras], the model's keyword inputs
            rows = slice(self.dist.rank * self.per_rank, (self.dist.rank + 1) * self.per_rank)
            x, y = x[rows].to(self.device, non_blocking=True), y[rows].to(self.device, non_blocking=True)
            extras = {k: v[rows].to(self.device, non_blocking=True) for k, v in (more[0] if more else {}).items()}
            sync = contextlib.nullcontext() if micro == c.grad_accum - 1 or not self.dist.enabled \
                else self.ddp.no_sync()
            with sync:
                with autocast_context(c, self.device):
                    if c.stateful:
                        if self.workload.stream_restart(self.step, micro):
                            self.carry = None
                        logits, carry = self.spec.stateful(self.ddp, x, self.carry, **extras)
                        # truncated backpropagation: the next window starts from the values only
                        self.carry = {k: v.detach() for k, v in carry.items()}
                    else:
                        logits = self.spec.logits(self.ddp, x, **extras)
                loss = self.workload.loss(logits, y)
                (loss / c.grad_accum).backward()
            loss_sum += loss.detach().double()
        # the norm before clipping, logged: it shows a run heading for divergence
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(),
                                                   c.grad_clip if c.grad_clip > 0 else math.inf).item()
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()  # the package's one optimiser step
        self.scheduler.step()
        train_loss = (self.dist.sum(loss_sum) / (c.grad_accum * self.dist.world_size)).item()
        return train_loss, grad_norm, lr

    def train(self) -> dict:
        """Run to ``config.steps`` (or the time budget); returns {"step", "train_loss", "val",
        "wall_s", "stopped_by_budget"} of the end, ``val`` the last evaluation's figures."""
        c = self.config
        bar = self._progress()
        say = (bar.write if bar is not None else self._log) if self.dist.is_main else (lambda s: None)
        if self.step == 0:
            say(self._describe())
        train_loss, val, out_of_time = None, {}, False
        while self.step < c.steps and not out_of_time:
            t0 = time.perf_counter()
            train_loss, grad_norm, lr = self._train_step()
            dt = time.perf_counter() - t0
            self.step += 1
            self.wall_s += dt
            if not math.isfinite(train_loss):
                raise FloatingPointError(f"{self._prefix()}the training loss became {train_loss} at step {self.step}; "
                                         "try a lower lr or grad_clip")
            out_of_time = c.budget_s > 0 and self.wall_s >= c.budget_s
            tok_s = self.workload.tokens_per_step / max(dt, 1e-9)
            record = {"step": self.step, "train_loss": train_loss, "lr": lr, "grad_norm": grad_norm,
                      "tokens_per_s": round(tok_s, 1), "wall_s": round(self.wall_s, 3)}
            evaluated = self.step % c.eval_every == 0 or self.step == c.steps or out_of_time
            if evaluated:
                val = self.evaluate()
                record.update({f"val_{k}": v for k, v in val.items()})
                score = val[self.workload.metric]
                better = (self.best is None or (score > self.best if self.workload.higher_is_better
                                                else score < self.best))
                self.best = score if better else self.best
            if self.metrics is not None:
                self.metrics.write(record)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{train_loss:.4f}", tok_s=f"{tok_s:,.0f}")
            if evaluated:
                figures = ", ".join(f"val {k} {v:.4f}" for k, v in val.items())
                say(f"{self._prefix()}step {self.step}/{c.steps}: train loss {train_loss:.4f}, {figures}, "
                    f"lr {lr:.2e}, {tok_s:,.0f} tokens/s")
                if c.plot and self.dist.is_main:
                    plot_losses(self.run_dir)
            elif bar is None and self.step % c.log_every == 0:
                say(f"{self._prefix()}step {self.step}/{c.steps}: train loss {train_loss:.4f}, lr {lr:.2e}, "
                    f"{tok_s:,.0f} tokens/s")
            if self.step % c.checkpoint_every == 0 or self.step == c.steps or out_of_time:
                self.save(record.get("val_loss"))
        if bar is not None:
            bar.close()
        if out_of_time and self.step < c.steps:
            say(f"{self._prefix()}stopped by the time budget ({c.budget_s:g} s) at step {self.step} of {c.steps}")
        if self.metrics is not None:
            self.metrics.close()
        return {"step": self.step, "train_loss": train_loss, "val": val, "val_loss": val.get("loss"),
                "wall_s": self.wall_s, "stopped_by_budget": out_of_time and self.step < c.steps}

    def release(self) -> None:
        """Give the run folder's lock up (idempotent)."""
        if self.metrics is not None:
            self.metrics.close()
        if self._lock is not None:
            self._lock.release()

    def close(self) -> None:
        self.release()
        if getattr(self, "ddp", None) is not getattr(self, "model", None):
            # DDP's reducer must not be the process group's last owner: its destructor keeps the
            # GIL while it joins gloo's threads, which may need the GIL to free a tensor (deadlock)
            self.ddp = self.model
            gc.collect()
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


@torch.no_grad()
def evaluate(model, tokens, config: TrainConfig, device, dist: Dist = Dist()) -> float:
    """Mean next-token loss of a language model over the evaluation windows of ``tokens`` (a 1-D
    int64 tensor, or a prepared split's TokenStream; ``config.eval_windows`` windows spread
    evenly, with ``config.pack_documents`` their position_ids), the figure training logs as val_loss."""
    device = torch.device(device)
    work = TextWorkload({"train": tokens, "valid": tokens}, 0, config.seq_len, config.batch_size,
                        eval_windows=config.eval_windows, pack_documents=config.pack_documents)
    was_training = model.training
    model.eval()
    try:
        return work.evaluate(lambda x, **extras: lm_logits(model, x, **extras), device,
                             lambda: autocast_context(config, device), dist)["loss"]
    finally:
        model.train(was_training)


def load_run(run_dir: str | Path, checkpoint: str = "latest", device: str = "cpu"):
    """(config, tokenizer, model in eval mode, checkpoint path) of a finished or running run.

    The checkpoint must check out (a damaged one is an error naming the file, not a silent
    fall back to an older model), and the run's config.toml must describe the weights' model
    (checked against the checkpoint's config.json when it has one)."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.toml").is_file():
        raise FileNotFoundError(f"{run_dir / 'config.toml'} not found: {run_dir} is not a training run directory")
    config = TrainConfig.from_file(run_dir / "config.toml")
    path, state, _, _ = ckpt.load_latest(run_dir, checkpoint, fallback=False)
    tokenizer = load_run_tokenizer(run_dir, path)
    model = build_model(config, tokenizer.vocab_size)
    check_pretrained_config(path, model.config)
    load_model_state(model, state, path)
    model.to(device).eval()
    return config, tokenizer, model, path
