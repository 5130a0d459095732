"""What a run trains on: a workload draws the batch of a step, scores a batch and evaluates a model.

    work = TextWorkload.from_splits({"train": text, "valid": more}, build_tokenizer("char", text + more),
                                    seq_len=64, batch_size=12)
    x, y = work.batch(step=0, micro=0)           # (batch_size, T) inputs and targets, on the CPU
    x, y, extras = packed.batch(step=0, micro=0) # ... and the model's keyword inputs (position_ids)
    loss = work.loss(logits, y)                  # mean loss over the scored positions
    work.evaluate(logits_of, device)             # {"loss": ...} (and "accuracy" for a task)

Two kinds share that protocol: `TextWorkload` (next-token prediction on a corpus, any of the
char/byte/BPE tokenizers, held in memory or read from a prepared folder's memory-mapped shards)
and `TaskWorkload` (a synthetic task of minrnn.data.tasks: selective copying or a Chomsky task,
scored on its answer positions). The Trainer needs nothing else of the data. A batch is a pure
function of (seed, step, micro-step), so a resumed run reads exactly what an uninterrupted one
would; under torchrun each process takes its own rows.

A batch is ``(inputs, targets)`` or ``(inputs, targets, extras)``: ``extras`` holds keyword
inputs of the model, (B, T) tensors whose rows go with the inputs' rows; a text workload of
packed documents gives ``{"position_ids": ...}`` there (0 where a document begins).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Protocol

import torch
import torch.nn.functional as F

from ..data.text import (
    DataError,
    _generator,
    check_long_enough,
    document_positions,
    eval_offsets,
    packed_windows,
    stream_offsets,
    token_source,
    train_offsets,
    windows,
)
from .distributed import Dist

# input ids (B, T) on the device, and the batch's extras as keywords -> logits (B, T, V)
Logits = Callable[..., torch.Tensor]


class Workload(Protocol):
    kind: str                 # "text" or "task"
    metric: str               # the evaluation figure that decides the best checkpoint
    higher_is_better: bool
    vocab_size: int
    batch_size: int           # rows of one micro-step, over every process
    tokens_per_step: int      # tokens of one optimiser step (every micro-step, every process)
    description: str          # a line for the log and the report

    def batch(self, step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor] | tuple[torch.Tensor, torch.Tensor, dict]:
        ...

    def loss(self, logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor: ...

    def evaluate(self, logits_of: Logits, device: torch.device, autocast=None, dist: Dist = Dist(),
                 full: bool = False) -> dict: ...

    def signature(self) -> dict: ...


class TextWorkload:
    """Next-token prediction on the token ids of a train and an evaluation split.

    ``tokens``: {"train": ..., eval_split: ...}, each a 1-D int64 tensor or a token source
    (minrnn.data.text: a prepared split's memory-mapped TokenStream), read window by window.
    The training batch of a step is ``batch_size`` windows of ``seq_len + 1`` tokens at random
    offsets of the train split; evaluation scores ``eval_windows`` windows spread evenly over
    the evaluation split (``full``: every non-overlapping window), the mean loss in nats.

    ``pack_documents`` (sources that know their documents only): each training window is
    moved to a document start (minrnn.data.text.packed_starts) and every batch, evaluation
    included, carries ``position_ids`` that restart at 0 at each document start, so that a
    model that resets there never carries one document into the next.

    ``stateful``: row r of every batch reads the r-th of ``batch_size`` equal parts of the train
    split, window after window (micro-step m of step s is window s * grad_accum + m), for a
    trainer that carries the model's state from each window to the next; `stream_restart`
    says where the parts start over (the state is then dropped).
    """

    kind = "text"
    metric = "loss"
    higher_is_better = False

    def __init__(self, tokens: dict[str, torch.Tensor], vocab_size: int, seq_len: int, batch_size: int,
                 grad_accum: int = 1, eval_windows: int = 64, seed: int = 0, eval_split: str = "valid",
                 name: str = "text", pack_documents: bool = False, stateful: bool = False):
        self.tokens = {"train": token_source(tokens["train"]), "eval": token_source(tokens[eval_split])}
        self.vocab_size, self.seq_len, self.batch_size = vocab_size, seq_len, batch_size
        self.eval_windows, self.seed, self.name = eval_windows, seed, name
        for split, toks in (("train", self.tokens["train"]), (eval_split, self.tokens["eval"])):
            check_long_enough(toks, seq_len, split)
            if pack_documents and not hasattr(toks, "document_starts"):
                raise DataError(f"pack_documents: the {split} split of {name} has no document index; packing "
                                "needs a prepared folder (minrnn prepare) as data")
        if stateful and pack_documents:
            raise DataError("stateful and pack_documents exclude each other: a stateful row reads its stream "
                            "without moving to document starts")
        self.pack_documents, self.digest = pack_documents, None
        self.stateful, self.grad_accum = stateful, grad_accum
        if stateful:  # every part must hold a window: say so before training starts
            stream_offsets(len(self.tokens["train"]), seq_len, batch_size, 0)
        self.tokens_per_step = seq_len * batch_size * grad_accum
        self.description = (f"{name}: {len(self.tokens['train']):,} train tokens, evaluated on {eval_split}"
                            + (", documents packed" if pack_documents else "")
                            + (", stateful streams" if stateful else ""))

    @classmethod
    def from_splits(cls, splits: dict[str, str], tokenizer, **kwargs) -> TextWorkload:
        """Encode ``splits`` (train and the evaluation split, as text) with ``tokenizer``."""
        from ..data.text import DataError

        try:
            tokens = {k: torch.tensor(tokenizer.encode(v), dtype=torch.long) for k, v in splits.items()}
        except ValueError as e:
            raise DataError(f"data {kwargs.get('name', 'text')}: {e}") from None
        return cls(tokens, tokenizer.vocab_size, **kwargs)

    def batch(self, step: int, micro: int):
        """(inputs, targets), each (batch_size, seq_len) int64 on the CPU; packed documents add
        {"position_ids": (batch_size, seq_len) int64}."""
        tokens = self.tokens["train"]
        if self.stateful:
            offsets, _ = stream_offsets(len(tokens), self.seq_len, self.batch_size, step * self.grad_accum + micro)
            return windows(tokens, offsets, self.seq_len)
        offsets = train_offsets(len(tokens), self.seq_len, self.batch_size, self.seed, step, micro)
        if self.pack_documents:
            x, y, positions = packed_windows(tokens, offsets, self.seq_len)
            return x, y, {"position_ids": positions}
        return windows(tokens, offsets, self.seq_len)

    def stream_restart(self, step: int, micro: int) -> bool:
        """Stateful workloads: whether the batch of (step, micro) starts every stream over, so that
        the state carried into it is dropped."""
        return stream_offsets(len(self.tokens["train"]), self.seq_len, self.batch_size,
                              step * self.grad_accum + micro)[1]

    def loss(self, logits, targets, reduction: str = "mean"):
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction=reduction)

    def eval_batches(self, full: bool = False, dist: Dist = Dist()) -> Iterator[tuple[torch.Tensor, torch.Tensor, dict]]:
        """(inputs, targets, extras) of the evaluation windows this process scores: the same
        windows with packed documents or without (so that the figures compare), with packed
        documents their position_ids in extras."""
        toks = self.tokens["eval"]
        count = len(toks) // self.seq_len if full else self.eval_windows
        offsets = eval_offsets(len(toks), self.seq_len, count)[dist.rank::dist.world_size]
        per = max(1, self.batch_size // dist.world_size)
        for i in range(0, offsets.numel(), per):
            x, y = windows(toks, offsets[i:i + per], self.seq_len)
            extras = ({"position_ids": document_positions(toks, offsets[i:i + per], self.seq_len)}
                      if self.pack_documents else {})
            yield x, y, extras

    @torch.no_grad()
    def evaluate(self, logits_of: Logits, device, autocast=None, dist: Dist = Dist(), full: bool = False) -> dict:
        total = torch.zeros(2, dtype=torch.float64, device=device)
        for x, y, extras in self.eval_batches(full, dist):
            with autocast() if autocast else contextlib.nullcontext():
                logits = logits_of(x.to(device), **{k: v.to(device) for k, v in extras.items()})
            total[0] += self.loss(logits, y.to(device), "sum").double()
            total[1] += y.numel()
        total = dist.sum(total)
        return {"loss": (total[0] / total[1]).item()}

    def signature(self) -> dict:
        out = {"data": self.name, "train_tokens": len(self.tokens["train"])}
        if self.digest:  # a prepared folder: its shards' checksums
            out["shards"] = self.digest
        if self.stateful:  # another order of the same tokens
            out["stateful"] = True
        return {**out, "pack_documents": True} if self.pack_documents else out


def text_tokenizer(splits: dict[str, str], kind: str, bpe_vocab_size: int = 8192, train_split: str = "train"):
    """The tokenizer a text run builds from its data: a character vocabulary covers every split
    given (as nanoGPT builds it), a BPE vocabulary is learnt from the train split only."""
    from ..data.tokenizers import build_tokenizer

    text = "".join(splits.values()) if kind == "char" else splits[train_split]
    return build_tokenizer(kind, text, bpe_vocab_size)


def text_workload(splits: dict[str, str], tokenizer, *, seq_len: int, batch_size: int, grad_accum: int = 1,
                  eval_windows: int = 64, seed: int = 0, train_split: str = "train", eval_split: str = "valid",
                  name: str = "text", stateful: bool = False) -> TextWorkload:
    """The workload of a text run (`minrnn train` and `minrnn compare` alike): ``splits[train_split]``
    trains, ``eval_windows`` windows of ``splits[eval_split]`` evaluate, ``tokenizer`` encodes both;
    ``stateful``: see `TextWorkload`."""
    work = TextWorkload.from_splits({"train": splits[train_split], eval_split: splits[eval_split]}, tokenizer,
                                    seq_len=seq_len, batch_size=batch_size, grad_accum=grad_accum,
                                    eval_windows=eval_windows, seed=seed, eval_split=eval_split, name=name,
                                    stateful=stateful)
    work.tokenizer = tokenizer
    work.description = (f"{name} ({tokenizer.kind} tokens): {len(work.tokens['train']):,} train tokens from "
                        f"{train_split}, evaluated on {eval_split}" + (", stateful streams" if stateful else ""))
    return work


def prepared_workload(data, tokenizer, *, seq_len: int, batch_size: int, grad_accum: int = 1,
                      eval_windows: int = 64, seed: int = 0, train_split: str = "train", eval_split: str = "valid",
                      name: str = "text", pack_documents: bool = False, stateful: bool = False) -> TextWorkload:
    """The workload of a prepared folder (``data``: a minrnn.data.shards.PreparedData, made by
    `minrnn prepare`): ``train_split`` trains and ``eval_split`` evaluates, both read through
    their memory maps (resident memory does not grow with the corpus), at the offsets an
    in-memory run of the same tokens reads. ``tokenizer``: the folder's; the vocabulary is the
    manifest's. ``pack_documents``, ``stateful``: see `TextWorkload`."""
    tokens = {"train": data.split(train_split), eval_split: data.split(eval_split)}
    work = TextWorkload(tokens, data.vocab_size, seq_len=seq_len, batch_size=batch_size, grad_accum=grad_accum,
                        eval_windows=eval_windows, seed=seed, eval_split=eval_split, name=name,
                        pack_documents=pack_documents, stateful=stateful)
    work.tokenizer = tokenizer
    work.digest = shards_digest(data, train_split)
    train = tokens["train"]
    work.description = (f"{name} (prepared, {tokenizer.kind} tokens): {len(train):,} train tokens in "
                        f"{train.documents:,} documents from {train_split}, evaluated on {eval_split}"
                        + (", documents packed" if pack_documents else "")
                        + (", stateful streams" if stateful else ""))
    return work


def shards_digest(data, split: str) -> str:
    """A short hash of the checksums of ``split``'s shards in a prepared folder's manifest:
    what a checkpoint records, so that a run is never resumed on other tokens."""
    import hashlib

    shards = data.manifest["splits"][split]["shards"]
    return hashlib.sha256("".join(s["sha256"] for s in shards).encode()).hexdigest()[:16]


class TaskWorkload:
    """A synthetic task: batches drawn from (seed, step, micro-step) at lengths in
    ``train_lengths``; loss and accuracy over the answer positions only, the accuracy the mean
    over ``eval_lengths``. Validation batches use ``val_seed``, the final test ``test_seed``."""

    kind = "task"
    metric = "accuracy"
    higher_is_better = True

    def __init__(self, task: str, batch_size: int, train_lengths: tuple[int, int], eval_lengths: list[int],
                 grad_accum: int = 1, eval_batches: int = 1, eval_batch_size: int | None = None,
                 val_seed: int = 0, test_seed: int = 1, seed: int = 0, **options):
        from ..data.tasks import TASKS

        self.task, self.name = TASKS[task], task
        self.vocab_size, self.batch_size = self.task.vocab_size, batch_size
        self.train_lengths, self.eval_lengths = tuple(train_lengths), list(eval_lengths)
        self.eval_batches, self.eval_batch_size = eval_batches, eval_batch_size or batch_size
        self.val_seed, self.test_seed, self.seed, self.options = val_seed, test_seed, seed, options
        self.tokens_per_step = int(batch_size * sum(self.train_lengths) / 2 * grad_accum)
        self._eval_sets: dict[int, dict] = {}
        self.description = (f"{task}: train lengths {self.train_lengths[0]}..{self.train_lengths[1]}, "
                            f"evaluate at {self.eval_lengths[0]}..{self.eval_lengths[-1]}")

    def batch(self, step: int, micro: int):
        from ..data.tasks import random_length_batch

        b = random_length_batch(self.task, _generator(self.seed, step, micro), self.batch_size, *self.train_lengths,
                                **self.options)
        return b.input_ids, b.targets

    def loss(self, logits, targets, reduction: str = "mean"):
        from ..data.tasks import IGNORE_INDEX

        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX,
                               reduction=reduction)

    @torch.no_grad()
    def evaluate(self, logits_of: Logits, device, autocast=None, dist: Dist = Dist(), full: bool = False) -> dict:
        """Every process scores the whole (small) evaluation set: the same figure everywhere."""
        from ..data.tasks import IGNORE_INDEX, AccuracyCounts, accuracy, eval_set

        seed = self.test_seed if full else self.val_seed
        if seed not in self._eval_sets:
            self._eval_sets[seed] = eval_set(self.task, self.eval_lengths, self.eval_batch_size, self.eval_batches,
                                             seed=seed, **self.options)
        accs, total, n = [], 0.0, 0
        for batches in self._eval_sets[seed].values():
            counts = AccuracyCounts()
            for b in batches:
                with autocast() if autocast else contextlib.nullcontext():
                    logits = logits_of(b.input_ids.to(device))
                y = b.targets.to(device)
                total += self.loss(logits, y, "sum").item()
                n += int((y != IGNORE_INDEX).sum())
                counts = counts + accuracy(logits, y)
            accs.append(counts.accuracy)
        return {"loss": total / max(n, 1), "accuracy": sum(accs) / len(accs)}

    def signature(self) -> dict:
        return {"data": self.task.name, "train_lengths": list(self.train_lengths), **self.options}
