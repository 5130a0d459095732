"""Training minGRU/minLSTM language models: `minrnn train`, `minrnn generate`, `minrnn eval`.

Needs the ``hf`` extra (transformers, safetensors) and ``tokenizers`` for BPE; tqdm for the
progress bar and matplotlib for the loss plot are optional.
"""

from .config import ConfigError, TrainConfig
from .loop import Trainer, evaluate, load_run

__all__ = ["ConfigError", "TrainConfig", "Trainer", "evaluate", "load_run"]
