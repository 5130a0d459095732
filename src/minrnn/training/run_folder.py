"""One trainer per run folder, and a folder that reads as one run.

`RunLock` holds an exclusive ``flock`` on ``<run>/.lock`` for as long as a trainer writes
there; a second trainer gets a RunInUseError naming the holder's pid. The kernel drops the
lock when its process dies, however it dies, so a lock left by a killed run is simply taken
over (the file's stale pid is overwritten). Readers (eval, generate) take no lock: they read
the newest complete checkpoint, which a trainer never modifies in place.

`check_fresh_start` refuses to start a new run over an old one's files unless told to
overwrite (then it removes them); `truncate_metrics` drops the metric rows a resumed run is
about to write again.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from .._files import LOCK_FILE, FolderInUseError, FolderLock, fsync_dir, lock_holder, write_atomic
from .checkpoint import CheckpointError, checkpoint_root, list_checkpoints

__all__ = ["LOCK_FILE", "RUN_FILES", "RunFolderError", "RunInUseError", "RunLock", "check_fresh_start", "lock_holder",
           "truncate_metrics", "write_run_file"]

METRICS_FILE = "metrics.jsonl"
# what a training run writes into its folder; anything else there is left alone
RUN_FILES = ("checkpoints", METRICS_FILE, "config.toml", "tokenizer.json", "tokenizer_config.json", "bpe.json",
             "loss.png", "tb", "latest", "best")


class RunFolderError(CheckpointError):
    """A run folder that cannot be used as asked (the message says why and what to do)."""


class RunInUseError(RunFolderError):
    """Another process is training in this run folder."""


class RunLock(FolderLock):
    """An exclusive lock on a run folder (`minrnn._files.FolderLock`), held until `release` (or
    the process ends); a second trainer there gets a RunInUseError naming the holder's pid.

        with RunLock(run_dir):
            ...  # train

    Only one process of a distributed job should take it (rank 0).
    """

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        try:
            super().__init__(run_dir)
        except FolderInUseError as e:
            who = f"pid {e.holder}" if e.holder else "another process"
            raise RunInUseError(f"{self.run_dir} is in use by another trainer ({who}); wait for it to end "
                                "or choose another out_dir") from None
        except OSError as e:
            raise RunFolderError(f"cannot lock {self.run_dir}: {e.strerror or e}") from None


def existing_run_files(run_dir: str | Path) -> list[str]:
    """The names of the run files (RUN_FILES) present in ``run_dir``, sorted."""
    run_dir = Path(run_dir)
    return sorted(name for name in RUN_FILES if (run_dir / name).exists() or (run_dir / name).is_symlink())


def check_fresh_start(run_dir: str | Path, overwrite: bool = False) -> list[str]:
    """Make ``run_dir`` ready for a new run (not a resume). When it holds an earlier run's
    files: RunFolderError naming them, or with ``overwrite`` remove them (files of other
    names stay). Returns the names removed. Call it holding the RunLock."""
    run_dir = Path(run_dir)
    found = existing_run_files(run_dir)
    if not found:
        return []
    if not overwrite:
        ckpts = len(list_checkpoints(run_dir))
        what = f"{ckpts} checkpoint(s) and " if ckpts else ""
        raise RunFolderError(f"{run_dir} already holds a run ({what}{', '.join(found)}); pass --resume to continue "
                             "it, --overwrite to start over, or choose another out_dir")
    try:
        # checkpoints first, renamed away in one step, so a crash part-way leaves no half run
        root = checkpoint_root(run_dir)
        if root.exists():
            trash = run_dir / f".trash-checkpoints-{os.getpid()}"
            os.rename(root, trash)
            fsync_dir(run_dir)
            shutil.rmtree(trash)
        for name in found:
            path = run_dir / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            elif path.exists() or path.is_symlink():
                path.unlink()
        fsync_dir(run_dir)
    except OSError as e:
        raise RunFolderError(f"cannot clear {run_dir} for a new run: {e.strerror or e}") from None
    return found


def truncate_metrics(run_dir: str | Path, step: int) -> int:
    """Keep the rows of ``metrics.jsonl`` with ``step <= step`` (those the checkpoint of
    ``step`` has seen; rows without a step stay), dropping a half-written last line; the file
    is replaced atomically. Returns the number of rows dropped."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except ValueError:  # the last line of a run killed mid-write
            dropped += 1
            continue
        s = row.get("step") if isinstance(row, dict) else None
        if isinstance(s, (int, float)) and s > step:
            dropped += 1
        else:
            kept.append(line)
    try:
        write_atomic(path, "".join(line + "\n" for line in kept).encode())
    except OSError as e:
        raise RunFolderError(f"cannot rewrite {path}: {e.strerror or e}") from None
    return dropped


def write_run_file(path: str | Path, data: bytes) -> None:
    """Replace a run's file (``config.toml``, ...) atomically; a failed write (a full disk)
    leaves the previous file and is a one-line RunFolderError."""
    try:
        write_atomic(Path(path), data)
    except OSError as e:
        raise RunFolderError(f"cannot write {path}: {e.strerror or e}") from None
