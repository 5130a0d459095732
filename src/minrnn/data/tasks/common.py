"""What every synthetic task shares: the batch format, seeding, lengths and the accuracy metric.

The format (one for every task):

    input_ids (B, T) long   the sequence the model reads, left to right
    targets   (B, T) long   what the model must output at each position after reading
                            input_ids[:, :t + 1]; IGNORE_INDEX (-100) where nothing is asked

The targets are aligned with the inputs, not shifted by one as in language modelling: the
loss is ``F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)`` on
the logits (B, T, V) of a causal model, without the shift that transformers' ``labels=``
applies. Every generator is a pure function of (generator or seed, batch size, length):
the same seed gives the same batch, on any machine, and the batch is on the CPU.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import Tensor

IGNORE_INDEX = -100


class TaskBatch(NamedTuple):
    """A batch of a synthetic task: ``input_ids`` (B, T) and ``targets`` (B, T), both long."""

    input_ids: Tensor
    targets: Tensor


def as_generator(seed_or_generator: int | torch.Generator) -> torch.Generator:
    """A CPU ``torch.Generator``: the one given, or a new one seeded with the integer given."""
    if isinstance(seed_or_generator, torch.Generator):
        if seed_or_generator.device.type != "cpu":
            raise ValueError(f"the generator must be a CPU torch.Generator (batches are drawn on the CPU), "
                             f"got one on {seed_or_generator.device}")
        return seed_or_generator
    if isinstance(seed_or_generator, bool) or not isinstance(seed_or_generator, int):
        raise TypeError(f"seed must be an int or a torch.Generator, got {type(seed_or_generator).__name__}")
    return torch.Generator().manual_seed(seed_or_generator)


def check_positive(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


@dataclass(frozen=True)
class SyntheticTask:
    """A named generator with what a model needs to know about it.

    Attributes:
        name: the registry key.
        vocab_size: every id in ``input_ids`` and in the answers is below it (the model's V).
        answer: "last" (one answer, at the last position) or "sequence" (several positions).
        summary: one line for tables and ``--help``.
        sample: ``sample(generator, batch_size, length, **options) -> TaskBatch``.
        max_length: the largest ``length`` the task can draw (None: no limit).
    """

    name: str
    vocab_size: int
    answer: str
    summary: str
    sample: Callable[..., TaskBatch] = field(repr=False)
    max_length: int | None = None

    def __call__(self, seed_or_generator: int | torch.Generator, batch_size: int, length: int,
                 **options) -> TaskBatch:
        """Draw a batch: ``input_ids`` and ``targets`` (B, T); see the task's docstring for T."""
        check_positive("batch_size", batch_size)
        check_positive("length", length)
        if self.max_length is not None and length > self.max_length:
            raise ValueError(f"{self.name}: length must be <= {self.max_length}, got {length}")
        return self.sample(as_generator(seed_or_generator), batch_size, length, **options)


def sample_length(seed_or_generator: int | torch.Generator, min_length: int, max_length: int) -> int:
    """A length drawn uniformly from min_length .. max_length (both included)."""
    check_positive("min_length", min_length)
    check_positive("max_length", max_length, minimum=min_length)
    g = as_generator(seed_or_generator)
    return int(torch.randint(min_length, max_length + 1, (1,), generator=g))


def random_length_batch(task: SyntheticTask, seed_or_generator: int | torch.Generator, batch_size: int,
                        min_length: int, max_length: int, **options) -> TaskBatch:
    """A batch at one length drawn uniformly from min_length .. max_length (every row of a
    batch has the same length, so no padding is needed), e.g. the training lengths 1 .. 40."""
    g = as_generator(seed_or_generator)
    return task(g, batch_size, sample_length(g, min_length, max_length), **options)


def eval_seed(seed: int, length: int) -> int:
    """The seed of the evaluation batches at ``length``: fixed by (seed, length) alone, so a
    length's batches do not change when other lengths are added to or removed from a set."""
    return seed * 1_000_003 + length


def eval_set(task: SyntheticTask, lengths: Iterable[int], batch_size: int, num_batches: int = 1,
             seed: int = 0, **options) -> dict[int, list[TaskBatch]]:
    """Fixed evaluation batches for every length in ``lengths``: {length: [TaskBatch, ...]}.

    E.g. ``eval_set(TASKS["parity_check"], range(40, 257), 128)`` for the Chomsky tasks'
    evaluation lengths 40 .. 256; the same arguments always give the same batches.
    """
    check_positive("num_batches", num_batches)
    out = {}
    for length in lengths:
        g = torch.Generator().manual_seed(eval_seed(seed, check_positive("length", length)))
        out[length] = [task(g, batch_size, length, **options) for _ in range(num_batches)]
    return out


@dataclass(frozen=True)
class AccuracyCounts:
    """Counts behind the accuracy of one or more batches; add them up over batches.

    ``accuracy`` is the fraction of answer positions predicted right; ``exact_match`` the
    fraction of sequences with every answer position right (the same thing when each
    sequence has one answer).
    """

    correct: int = 0
    answers: int = 0
    exact: int = 0
    sequences: int = 0

    def __add__(self, other: AccuracyCounts) -> AccuracyCounts:
        return AccuracyCounts(self.correct + other.correct, self.answers + other.answers,
                              self.exact + other.exact, self.sequences + other.sequences)

    @property
    def accuracy(self) -> float:
        return self.correct / self.answers if self.answers else float("nan")

    @property
    def exact_match(self) -> float:
        return self.exact / self.sequences if self.sequences else float("nan")


def accuracy(predictions: Tensor, targets: Tensor) -> AccuracyCounts:
    """Score ``predictions`` against ``targets`` on the answer positions only.

    Args:
        predictions: logits (B, T, V) (their argmax is the prediction) or token ids (B, T).
        targets: (B, T) long, IGNORE_INDEX where nothing is asked.
    Returns:
        AccuracyCounts (``.accuracy``, ``.exact_match``; add counts over batches).
    """
    if not isinstance(targets, Tensor) or targets.dim() != 2 or targets.dtype != torch.long:
        raise ValueError("targets must be a (batch, time) long tensor, got "
                         f"{getattr(targets, 'shape', type(targets).__name__)} {getattr(targets, 'dtype', '')}")
    if not isinstance(predictions, Tensor):
        raise TypeError(f"predictions must be a tensor, got {type(predictions).__name__}")
    if predictions.is_floating_point():
        if predictions.dim() != 3:
            raise ValueError(f"logits must be (batch, time, vocab), got shape {tuple(predictions.shape)}")
        predictions = predictions.argmax(-1)
    if predictions.shape != targets.shape:
        raise ValueError(f"predictions {tuple(predictions.shape)} and targets {tuple(targets.shape)} "
                         "must have the same (batch, time) shape")
    asked = targets != IGNORE_INDEX
    right = (predictions.to(targets.device) == targets) & asked
    row_exact = (right | ~asked).all(dim=1) & asked.any(dim=1)
    return AccuracyCounts(int(right.sum()), int(asked.sum()), int(row_exact.sum()), int(targets.shape[0]))
