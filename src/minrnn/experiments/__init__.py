"""Side-by-side experiments: baselines matched in parameters (``baselines``) and the presets
of the paper's experiments (``presets``). Importing this package needs torch only;
transformers is imported when a transformers model is built.

An experiment is a TOML file of ``configs/`` (its stem is the experiment's name, each table a
preset): adding a file adds an experiment to `minrnn compare`. This module lists them without
importing torch, so that `minrnn --help` stays fast."""

from __future__ import annotations

from pathlib import Path

CONFIG_DIR = Path(__file__).with_name("configs")


def experiment_names() -> tuple[str, ...]:
    """The experiments shipped with minrnn: the stems of ``configs/*.toml``, sorted."""
    return tuple(sorted(p.stem for p in CONFIG_DIR.glob("*.toml")))
