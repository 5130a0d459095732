"""Synthetic tasks: selective copying and the Chomsky-hierarchy tasks of the minRNN paper.

    from minrnn.data.tasks import TASKS, accuracy
    task = TASKS["parity_check"]
    batch = task(seed, batch_size=128, length=40)     # TaskBatch(input_ids, targets), (B, T)
    logits = model(batch.input_ids)                   # (B, T, task.vocab_size)
    loss = F.cross_entropy(logits.flatten(0, 1), batch.targets.flatten(), ignore_index=IGNORE_INDEX)
    accuracy(logits, batch.targets).accuracy

Targets are aligned with the inputs (no shift): see ``common``. A new task is one function
plus one entry in TASKS.
"""

from .chomsky import CHOMSKY_TASKS, EVAL_LENGTHS, TRAIN_LENGTHS
from .common import (
    IGNORE_INDEX,
    AccuracyCounts,
    SyntheticTask,
    TaskBatch,
    accuracy,
    as_generator,
    eval_set,
    random_length_batch,
    sample_length,
)
from .selective_copying import VOCAB_SIZE as SELECTIVE_COPYING_VOCAB
from .selective_copying import selective_copying

TASKS: dict[str, SyntheticTask] = {
    "selective_copying": SyntheticTask(
        "selective_copying", SELECTIVE_COPYING_VOCAB, "sequence",
        "recall 16 tokens scattered among blanks, in order", selective_copying),
    **CHOMSKY_TASKS,
}

__all__ = [
    "TASKS", "CHOMSKY_TASKS", "TRAIN_LENGTHS", "EVAL_LENGTHS", "IGNORE_INDEX", "TaskBatch", "SyntheticTask",
    "AccuracyCounts", "accuracy", "as_generator", "eval_set", "random_length_batch", "sample_length",
    "selective_copying",
]
