"""Selective copying (Gu & Dao 2023, "Mamba", arXiv 2312.00752, section 4.1.1), as the
minRNN paper runs it (Feng et al. 2024, arXiv 2410.01201; the ids and sizes are those of its
official code release).

A sequence of ``length`` positions holds ``num_tokens`` data tokens at random positions, in
order, with blanks everywhere else; then come ``num_tokens`` answer markers. At the i-th
marker the model must output the i-th data token. Nothing is asked elsewhere. Unlike plain
copying, the gaps between the tokens vary, so a time-invariant filter cannot solve it: the
model has to decide from each input whether to keep it.

Token ids (vocabulary 16):

    0        MARKER   answer marker (the "predict now" token)
    1 .. 14  data tokens
    15       BLANK    noise / filler

Shapes: input_ids and targets are (B, length + num_tokens); the targets hold the data tokens
at the last ``num_tokens`` positions and IGNORE_INDEX elsewhere.
"""

from __future__ import annotations

import torch

from .common import IGNORE_INDEX, TaskBatch, check_positive

VOCAB_SIZE = 16
MARKER = 0
BLANK = 15
FIRST_DATA, LAST_DATA = 1, 14
NUM_TOKENS = 16  # tokens to memorise in the paper's setting (and the Mamba paper's)


def selective_copying(generator: torch.Generator, batch_size: int, length: int,
                      num_tokens: int = NUM_TOKENS) -> TaskBatch:
    """Draw a batch; ``length`` is the span the tokens are spread over (4096 in the paper)."""
    check_positive("num_tokens", num_tokens)
    if num_tokens > length:
        raise ValueError(f"selective_copying: num_tokens ({num_tokens}) must be <= length ({length}), "
                         "the span the tokens are placed in")
    data = torch.randint(FIRST_DATA, LAST_DATA + 1, (batch_size, num_tokens), generator=generator)
    # a uniformly random set of num_tokens distinct positions per row, in increasing order
    positions = torch.rand(batch_size, length, generator=generator).topk(num_tokens, dim=1).indices
    positions = positions.sort(dim=1).values
    span = torch.full((batch_size, length), BLANK, dtype=torch.long)
    span.scatter_(1, positions, data)
    markers = torch.full((batch_size, num_tokens), MARKER, dtype=torch.long)
    targets = torch.full((batch_size, length + num_tokens), IGNORE_INDEX, dtype=torch.long)
    targets[:, length:] = data
    return TaskBatch(torch.cat([span, markers], dim=1), targets)
