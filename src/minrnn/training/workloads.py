"""What a run trains on: a workload draws the batch of a step, scores a batch and evaluates a model.

    work = TextWorkload.from_splits({"train": text, "valid": more}, build_tokenizer("char", text + more),
                                    seq_len=64, batch_size=12)
    x, y = work.batch(step=0, micro=0)           # (batch_size, T) inputs and targets, on the CPU
    loss = work.loss(logits, y)                  # mean loss over the scored positions
    work.evaluate(logits_of, device)             # {"loss": ...} (and "accuracy" for a task)

Two kinds share that protocol: `TextWorkload` (next-token prediction on a corpus, any of the
char/byte/BPE tokenizers) and `TaskWorkload` (a synthetic task of minrnn.data.tasks: selective
copying or a Chomsky task, scored on its answer positions). The Trainer needs nothing else of
the data. A batch is a pure function of (seed, step, micro-step), so a resumed run reads
exactly what an uninterrupted one would; under torchrun each process takes its own rows.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Protocol

import torch
import torch.nn.functional as F

from ..data.text import _generator, check_long_enough, eval_offsets, train_offsets, windows
from .distributed import Dist

Logits = Callable[[torch.Tensor], torch.Tensor]  # input ids (B, T) on the device -> logits (B, T, V)


class Workload(Protocol):
    kind: str                 # "text" or "task"
    metric: str               # the evaluation figure that decides the best checkpoint
    higher_is_better: bool
    vocab_size: int
    batch_size: int           # rows of one micro-step, over every process
    tokens_per_step: int      # tokens of one optimiser step (every micro-step, every process)
    description: str          # a line for the log and the report

    def batch(self, step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]: ...

    def loss(self, logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor: ...

    def evaluate(self, logits_of: Logits, device: torch.device, autocast=None, dist: Dist = Dist(),
                 full: bool = False) -> dict: ...

    def signature(self) -> dict: ...


class TextWorkload:
    """Next-token prediction on the token ids of a train and an evaluation split.

    The training batch of a step is ``batch_size`` windows of ``seq_len + 1`` tokens at random
    offsets of the train split; evaluation scores ``eval_windows`` windows spread evenly over
    the evaluation split (``full``: every non-overlapping window), the mean loss in nats.
    """

    kind = "text"
    metric = "loss"
    higher_is_better = False

    def __init__(self, tokens: dict[str, torch.Tensor], vocab_size: int, seq_len: int, batch_size: int,
                 grad_accum: int = 1, eval_windows: int = 64, seed: int = 0, eval_split: str = "valid",
                 name: str = "text"):
        self.tokens = {"train": tokens["train"], "eval": tokens[eval_split]}
        self.vocab_size, self.seq_len, self.batch_size = vocab_size, seq_len, batch_size
        self.eval_windows, self.seed, self.name = eval_windows, seed, name
        for split, toks in (("train", self.tokens["train"]), (eval_split, self.tokens["eval"])):
            check_long_enough(toks, seq_len, split)
        self.tokens_per_step = seq_len * batch_size * grad_accum
        self.description = f"{name}: {self.tokens['train'].numel():,} train tokens, evaluated on {eval_split}"

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
        tokens = self.tokens["train"]
        offsets = train_offsets(tokens.numel(), self.seq_len, self.batch_size, self.seed, step, micro)
        return windows(tokens, offsets, self.seq_len)

    def loss(self, logits, targets, reduction: str = "mean"):
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction=reduction)

    def eval_batches(self, full: bool = False, dist: Dist = Dist()) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(inputs, targets) of the evaluation windows this process scores."""
        toks = self.tokens["eval"]
        count = toks.numel() // self.seq_len if full else self.eval_windows
        offsets = eval_offsets(toks.numel(), self.seq_len, count)[dist.rank::dist.world_size]
        per = max(1, self.batch_size // dist.world_size)
        for i in range(0, offsets.numel(), per):
            yield windows(toks, offsets[i:i + per], self.seq_len)

    @torch.no_grad()
    def evaluate(self, logits_of: Logits, device, autocast=None, dist: Dist = Dist(), full: bool = False) -> dict:
        total = torch.zeros(2, dtype=torch.float64, device=device)
        for x, y in self.eval_batches(full, dist):
            with autocast() if autocast else contextlib.nullcontext():
                logits = logits_of(x.to(device))
            total[0] += self.loss(logits, y.to(device), "sum").double()
            total[1] += y.numel()
        total = dist.sum(total)
        return {"loss": (total[0] / total[1]).item()}

    def signature(self) -> dict:
        return {"data": self.name, "train_tokens": self.tokens["train"].numel()}


def text_tokenizer(splits: dict[str, str], kind: str, bpe_vocab_size: int = 8192, train_split: str = "train"):
    """The tokenizer a text run builds from its data: a character vocabulary covers every split
    given (as nanoGPT builds it), a BPE vocabulary is learnt from the train split only."""
    from ..data.tokenizers import build_tokenizer

    text = "".join(splits.values()) if kind == "char" else splits[train_split]
    return build_tokenizer(kind, text, bpe_vocab_size)


def text_workload(splits: dict[str, str], tokenizer, *, seq_len: int, batch_size: int, grad_accum: int = 1,
                  eval_windows: int = 64, seed: int = 0, train_split: str = "train", eval_split: str = "valid",
                  name: str = "text") -> TextWorkload:
    """The workload of a text run (`minrnn train` and `minrnn compare` alike): ``splits[train_split]``
    trains, ``eval_windows`` windows of ``splits[eval_split]`` evaluate, ``tokenizer`` encodes both."""
    work = TextWorkload.from_splits({"train": splits[train_split], eval_split: splits[eval_split]}, tokenizer,
                                    seq_len=seq_len, batch_size=batch_size, grad_accum=grad_accum,
                                    eval_windows=eval_windows, seed=seed, eval_split=eval_split, name=name)
    work.tokenizer = tokenizer
    work.description = (f"{name} ({tokenizer.kind} tokens): {work.tokens['train'].numel():,} train tokens from "
                        f"{train_split}, evaluated on {eval_split}")
    return work


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
