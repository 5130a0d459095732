"""The formal-language tasks of the minRNN paper's Chomsky-hierarchy experiment.

Sources: Deletang et al. 2023, "Neural Networks and the Chomsky Hierarchy" (ICLR, arXiv
2207.02098) define parity_check, even_pairs, cycle_nav, bucket_sort and missing_duplicate;
Beck et al. 2024, "xLSTM" (arXiv 2405.04517) add majority and majority_count and the
protocol the minRNN paper follows (train on lengths 1 .. 40, evaluate on 40 .. 256).
Alphabets, query tokens and the missing_duplicate variant are those of the minRNN paper's
official code release (Feng et al. 2024), so that our numbers compare with its numbers.

Format: the ``length`` input symbols come first, then the query token(s), and the answers
sit at the query positions (targets are IGNORE_INDEX elsewhere):

    task               symbols   query    classes     T          answer at the query
    parity_check       0, 1      2        2           n + 1      number of 1s mod 2
    even_pairs         0, 1      2        2           n + 1      number of unequal neighbours mod 2
    cycle_nav          0, 1, 2   3        5           n + 1      sum(symbol - 1) mod 5
    bucket_sort        0 .. 9    10 (xn)  10          2 n        the n symbols sorted (n answers)
    majority           0 .. 62   63       63          n + 1      the most frequent symbol
    majority_count     0 .. 62   63       1 .. 256    n + 1      how often the most frequent occurs
    missing_duplicate  0 .. 8    9        9           n + m + 1  w[m] after w, w[:m] (m per batch)

The answer's class ids share the id space with the inputs (the model has one vocabulary of
``vocab_size`` = max(input ids, classes)); a class id equal to an input id is no clash, the
model reads inputs and writes answers.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .common import IGNORE_INDEX, SyntheticTask, TaskBatch

TRAIN_LENGTHS = (1, 40)  # xLSTM's protocol, followed by the minRNN paper
EVAL_LENGTHS = (40, 256)
CYCLE_LENGTH = 5
MAX_COUNT = EVAL_LENGTHS[1]  # majority_count answers a count, so its vocabulary bounds the length


def _one_answer(symbols: Tensor, query: int, answer: Tensor) -> TaskBatch:
    """symbols (B, n) then one query token; the answer (B,) at the query position."""
    B, n = symbols.shape
    inputs = torch.cat([symbols, torch.full((B, 1), query, dtype=torch.long)], dim=1)
    targets = torch.full((B, n + 1), IGNORE_INDEX, dtype=torch.long)
    targets[:, -1] = answer
    return TaskBatch(inputs, targets)


def parity_check(generator: torch.Generator, batch_size: int, length: int) -> TaskBatch:
    """Bits; the answer is 1 when the number of 1s is odd (Deletang et al.: regular)."""
    bits = torch.randint(0, 2, (batch_size, length), generator=generator)
    return _one_answer(bits, 2, bits.sum(1) % 2)


def even_pairs(generator: torch.Generator, batch_size: int, length: int) -> TaskBatch:
    """Bits; the answer is the parity of the number of neighbours that differ ("01" or "10"),
    which is 1 exactly when the first and last bits differ (Deletang et al.: regular)."""
    bits = torch.randint(0, 2, (batch_size, length), generator=generator)
    return _one_answer(bits, 2, (bits[:, 1:] != bits[:, :-1]).sum(1) % 2)


def cycle_nav(generator: torch.Generator, batch_size: int, length: int) -> TaskBatch:
    """Moves on a cycle of 5 states, from state 0: symbol 0 steps back, 1 stays, 2 steps
    forward; the answer is the final state (Deletang et al.: regular)."""
    moves = torch.randint(0, 3, (batch_size, length), generator=generator)
    return _one_answer(moves, 3, (moves - 1).sum(1) % CYCLE_LENGTH)


def bucket_sort(generator: torch.Generator, batch_size: int, length: int) -> TaskBatch:
    """Symbols from 10; after them ``length`` query tokens, at which the model writes the
    symbols in increasing order (Deletang et al.: context-sensitive)."""
    symbols = torch.randint(0, 10, (batch_size, length), generator=generator)
    inputs = torch.cat([symbols, torch.full_like(symbols, 10)], dim=1)
    targets = torch.full_like(inputs, IGNORE_INDEX)
    targets[:, length:] = symbols.sort(dim=1).values
    return TaskBatch(inputs, targets)


def _counts(symbols: Tensor, num_symbols: int) -> Tensor:
    """(B, num_symbols): how often each symbol occurs in each row."""
    counts = torch.zeros(symbols.shape[0], num_symbols, dtype=torch.long)
    return counts.scatter_add_(1, symbols, torch.ones_like(symbols))


def majority(generator: torch.Generator, batch_size: int, length: int) -> TaskBatch:
    """Symbols from 63; the answer is the most frequent one, a tie going to the largest
    symbol (as in the official code) (Beck et al.: xLSTM's counting tasks)."""
    symbols = torch.randint(0, 63, (batch_size, length), generator=generator)
    counts = _counts(symbols, 63)
    # among the symbols with the top count, the largest: argmax over reversed columns
    largest_top = 62 - counts.flip(1).argmax(1)
    return _one_answer(symbols, 63, largest_top)


def majority_count(generator: torch.Generator, batch_size: int, length: int) -> TaskBatch:
    """Symbols from 63; the answer is the number of times the most frequent symbol occurs,
    1 .. length, written as that id (so length <= 256, the vocabulary's bound)."""
    symbols = torch.randint(0, 63, (batch_size, length), generator=generator)
    return _one_answer(symbols, 63, _counts(symbols, 63).max(1).values)


def missing_duplicate(generator: torch.Generator, batch_size: int, length: int) -> TaskBatch:
    """A string w of ``length`` symbols from 9, then its first m symbols again, then the
    query: the answer is w[m], the symbol the repeat is missing. m is drawn uniformly from
    0 .. length - 1, once per batch (so all rows have the same length n + m + 1), as in the
    official code. Deletang et al.'s version blanks one symbol of ww instead; the paper ran
    this one."""
    w = torch.randint(0, 9, (batch_size, length), generator=generator)
    m = int(torch.randint(0, length, (1,), generator=generator))
    return _one_answer(torch.cat([w, w[:, :m]], dim=1), 9, w[:, m])


CHOMSKY_TASKS = {
    task.name: task
    for task in (
        SyntheticTask("parity_check", 3, "last", "parity of the number of 1s", parity_check),
        SyntheticTask("even_pairs", 3, "last", "parity of the number of unequal neighbours", even_pairs),
        SyntheticTask("cycle_nav", CYCLE_LENGTH, "last", "final state of moves on a 5-cycle", cycle_nav),
        SyntheticTask("bucket_sort", 11, "sequence", "write the symbols sorted", bucket_sort),
        SyntheticTask("majority", 64, "last", "most frequent symbol", majority),
        SyntheticTask("majority_count", MAX_COUNT + 1, "last", "count of the most frequent symbol",
                      majority_count, max_length=MAX_COUNT),
        SyntheticTask("missing_duplicate", 10, "last", "symbol missing from a repeat", missing_duplicate),
    )
}
