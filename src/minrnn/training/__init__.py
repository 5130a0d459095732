"""Training minGRU/minLSTM language models and the baselines they are compared with: one engine
(`Trainer`) for `minrnn train` and `minrnn compare`, workloads (text corpora, synthetic tasks),
`minrnn generate` and `minrnn eval`.

Needs the ``hf`` extra (transformers, safetensors) and ``tokenizers`` for BPE; tqdm for the
progress bar and matplotlib for the loss plot are optional.
"""

from .config import ConfigError, TrainConfig
from .loop import ModelSpec, Trainer, evaluate, load_run
from .workloads import TaskWorkload, TextWorkload, Workload

__all__ = ["ConfigError", "TrainConfig", "Trainer", "ModelSpec", "Workload", "TextWorkload", "TaskWorkload",
           "evaluate", "load_run"]
