"""Metrics of a run: one JSON object per line in ``metrics.jsonl``, a PNG of the losses, and
TensorBoard event files in ``tb/`` when tensorboard is installed.

Records carry a ``step``; a resumed run first drops the records after its checkpoint's step
(`run_folder.truncate_metrics`) so the file reads as one uninterrupted run.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from .run_folder import RunFolderError

FILE = "metrics.jsonl"


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / FILE
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:  # the last line of a run killed mid-write
            continue
    return out


class MetricsLog:
    """Appends records to metrics.jsonl (fsynced: a killed run loses at most the line being
    written) and mirrors their numbers to TensorBoard when it is installed."""

    def __init__(self, run_dir: Path, tensorboard: bool = True):
        self.path = Path(run_dir) / FILE
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is optional
                pass
            else:
                self.tb = SummaryWriter(str(Path(run_dir) / "tb"))

    def write(self, record: dict) -> None:
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:  # a full disk: the checkpoints so far are intact, a resume continues
            raise RunFolderError(f"cannot write {self.path}: {e.strerror or e}") from None
        if self.tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tb.add_scalar(key, value, record["step"])
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None


def plot_losses(run_dir: Path, out: Path | None = None) -> Path | None:
    """Draw train and validation loss against step into ``loss.png``; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    records = read_metrics(run_dir)
    train = [(r["step"], r["train_loss"]) for r in records if "train_loss" in r]
    valid = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    out = Path(out or Path(run_dir) / "loss.png")
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train", lw=0.8, alpha=0.8)
    if valid:
        ax.plot(*zip(*valid), "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / token)")
    ax.grid(alpha=0.3)
    ax.legend()
    losses = [v for _, v in train + valid if math.isfinite(v)]
    if losses:
        ax.set_ylim(min(losses) * 0.95, min(max(losses), min(losses) * 3) * 1.05)
    fig.tight_layout()
    tmp = out.with_name("." + out.name + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, out)
    return out
