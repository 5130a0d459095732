"""Shared pieces of the run-folder tests: a small model and its checkpoints, and one-line checks."""

import errno
import json
from pathlib import Path

import torch

from minrnn.training import checkpoint as ckpt

from ..corpus import shakespeare  # noqa: F401  (the shipped sample: runs with no data folder)

ROOT = Path(__file__).resolve().parents[2]
SHAKESPEARE_HEAD = 60_000  # characters of tiny shakespeare the tests use: quick to tokenize


def small_model(vocab_size: int, seed: int = 0, **config):
    from minrnn.models import MinRNNConfig, MinRNNForCausalLM

    torch.manual_seed(seed)
    return MinRNNForCausalLM(MinRNNConfig(vocab_size=vocab_size, hidden_size=16, num_hidden_layers=1,
                                          mlp_mult=2, **config)).eval()


def trainer_state(step: int) -> dict:
    return {"step": step, "optimizer": {"lr": 0.1 * step}, "rng": [{"cpu": torch.arange(4, dtype=torch.uint8)}]}


def save(run_dir, step: int, model, extra=None, val_loss=None) -> Path:
    return ckpt.save_checkpoint(run_dir, step, model.state_dict(), trainer_state(step), val_loss, extra_files=extra)


def snapshot(path: Path) -> dict:
    """{file name: bytes} of a checkpoint directory, to compare bit for bit."""
    return {p.name: p.read_bytes() for p in sorted(Path(path).iterdir())}


def enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def one_line(message: str) -> str:
    assert "\n" not in message.strip() and "Traceback" not in message, message
    return message


def flip_byte(path: Path, at: int = -10) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


def manifest(path: Path) -> dict:
    return json.loads((Path(path) / ckpt.MANIFEST).read_text())
