"""What a `minrnn bench` run measures: sizes, repeats, budgets.

``Settings.make()`` is the full run (minutes); ``Settings.make(quick=True)`` is a few
seconds of tiny sizes, for tests and for checking that everything runs."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from .measure import default_threads
from .runner import Budget

#: untracked by default; a quick run goes beside, so that it never replaces a full one
DEFAULT_OUT = Path("runs/bench")
QUICK_OUT = DEFAULT_OUT / "quick"


def _half_of_ram() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
    except (ValueError, OSError, AttributeError):
        return None


@dataclass
class Settings:
    quick: bool = False
    device: torch.device = torch.device("cpu")
    dtype: torch.dtype = torch.float32
    threads: int = field(default_factory=default_threads)
    out: Path = DEFAULT_OUT
    plots: bool = True
    seed: int = 0
    #: the C allocator's policy for the run (see bench.measure.set_malloc_policy)
    malloc: str = "retain"
    budget: Budget = field(default_factory=lambda: Budget(repeats=7, max_step_s=20.0, budget_s=10.0,
                                                          max_bytes=_half_of_ram()))
    # layers: the first batch and width are the main configuration, run at every length;
    # each other width (at the first batch) and batch (at the first width) at extra_lengths
    lengths: list[int] = field(default_factory=lambda: [16, 64, 256, 1024, 4096, 16384])
    batches: list[int] = field(default_factory=lambda: [16, 64])
    widths: list[int] = field(default_factory=lambda: [128, 256])
    extra_lengths: list[int] = field(default_factory=lambda: [256, 1024])
    # scan alone: (scan_batch, T, scan_channels) for T in lengths
    scan_batch: int = 16
    scan_channels: int = 128
    copy_bytes: int = 256 * 2**20
    copy_repeats: int = 11
    # decoding
    # decoding: language models of decode_width x decode_layers (see bench/decode.py)
    decode_contexts: list[int] = field(default_factory=lambda: [128, 512, 2048, 8192])
    decode_batches: list[int] = field(default_factory=lambda: [1, 32])
    decode_window: int = 64
    decode_layers: int = 6
    decode_width: int = 384
    decode_heads: int = 6
    decode_vocab: int = 256

    @classmethod
    def make(cls, quick: bool = False, **overrides) -> Settings:
        """The run of record, or with ``quick`` the tiny one; ``overrides`` replace fields
        (None values are ignored, so a CLI can pass its unset options straight through)."""
        overrides = {k: v for k, v in overrides.items() if v is not None}
        if not quick:
            return replace(cls(), **overrides)
        s = cls(
            quick=True,
            budget=Budget(repeats=2, max_step_s=5.0, budget_s=2.0, max_bytes=_half_of_ram(), min_repeat_s=0.0),
            lengths=[16, 64], batches=[2, 3], widths=[16, 24], extra_lengths=[16],
            scan_batch=2, scan_channels=8, copy_bytes=4 * 2**20, copy_repeats=3,
            decode_contexts=[8, 16], decode_batches=[1, 3], decode_window=4, decode_layers=2, decode_width=32,
            decode_heads=2, decode_vocab=64,
        )
        return replace(s, **overrides)

    def layer_configs(self) -> list[tuple[int, int, list[int]]]:
        """[(batch, width, lengths)]: the main configuration first."""
        b0, w0 = self.batches[0], self.widths[0]
        extra = [T for T in self.extra_lengths if T in self.lengths] or self.lengths[-1:]
        configs = [(b0, w0, list(self.lengths))]
        configs += [(b0, w, extra) for w in self.widths[1:]]
        configs += [(b, w0, extra) for b in self.batches[1:]]
        return configs
