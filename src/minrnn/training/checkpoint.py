"""Checkpoints that survive a crash at any instant, and are checked before they are trusted.

A checkpoint is a directory ``<run>/checkpoints/step_XXXXXXXX/`` holding
  - ``model.safetensors``: the model's weights;
  - ``trainer_state.pt``: optimizer, scheduler and RNG states and the step (the data position
    is a function of the step, see minrnn.data.text);
  - ``manifest.json``: size and SHA-256 of both files, the step and the validation loss.
It is written into a hidden temporary directory, every file fsynced, and then renamed into
place (a rename is atomic), so a ``step_*`` directory is either complete or absent; pointer
files ``latest`` and ``best`` are replaced the same way. Loading checks the manifest before
reading anything, and falls back to the newest older checkpoint that checks out, with a
warning, when the newest one is damaged.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path

import torch

from .._files import fsync_dir as _fsync_dir
from .._files import write_atomic
from ..data.corpora import sha256_of as _sha256

__all__ = ["CheckpointError", "save_checkpoint", "load_checkpoint", "load_latest", "verify", "prune",
           "list_checkpoints", "write_atomic"]

MODEL_FILE = "model.safetensors"
STATE_FILE = "trainer_state.pt"
MANIFEST = "manifest.json"
_STEP_DIR = re.compile(r"^step_(\d{8})$")


class CheckpointError(RuntimeError):
    """No usable checkpoint (the message says which were tried and why each failed)."""


def checkpoint_root(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete-looking checkpoint, oldest first."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return sorted(found)


def save_checkpoint(run_dir: Path, step: int, model_state: dict, trainer_state: dict,
                    val_loss: float | None = None) -> Path:
    """Write checkpoint ``step`` atomically; returns its directory."""
    from safetensors.torch import save_file

    root = checkpoint_root(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:08d}"
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".tmp-step_{step:08d}-"))
    try:
        # tied weights share storage, which safetensors refuses: store each tensor on its own
        save_file({k: v.detach().cpu().contiguous().clone() for k, v in model_state.items()}, str(tmp / MODEL_FILE))
        torch.save(trainer_state, tmp / STATE_FILE)
        files = {}
        for name in (MODEL_FILE, STATE_FILE):
            with open(tmp / name, "rb+") as f:
                os.fsync(f.fileno())
            files[name] = {"size": (tmp / name).stat().st_size, "sha256": _sha256(tmp / name)}
        manifest = {"step": step, "val_loss": val_loss, "files": files}
        with open(tmp / MANIFEST, "w") as f:
            json.dump(manifest, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp)
        if final.exists():  # a checkpoint of this step from a run that was cut off after it: replace
            _remove(final)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(root)
    write_atomic(root / "latest", final.name.encode())
    return final


def verify(path: Path) -> dict:
    """The manifest of checkpoint ``path`` after checking every file against it; raises
    CheckpointError saying what is wrong."""
    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: no readable manifest ({e})") from None
    for name in (MODEL_FILE, STATE_FILE):
        f = path / name
        spec = files.get(name)
        if spec is None or not f.is_file():
            raise CheckpointError(f"{f} is missing")
        size = f.stat().st_size
        if size != spec["size"]:
            raise CheckpointError(f"{f} has {size} bytes, the manifest says {spec['size']}: truncated or damaged")
        if _sha256(f) != spec["sha256"]:
            raise CheckpointError(f"{f} does not match its checksum: damaged")
    return manifest


def load_checkpoint(path: Path) -> tuple[dict, dict, dict]:
    """(model_state, trainer_state, manifest) of one checkpoint, verified first."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    manifest = verify(path)
    try:
        model_state = load_file(str(Path(path) / MODEL_FILE))
        trainer_state = torch.load(Path(path) / STATE_FILE, map_location="cpu", weights_only=True)
    except (SafetensorError, RuntimeError, OSError, EOFError) as e:
        raise CheckpointError(f"{path}: cannot be read ({e})") from None
    return model_state, trainer_state, manifest


def load_latest(run_dir: Path, which: str = "latest") -> tuple[Path, dict, dict, dict]:
    """The newest checkpoint of ``run_dir`` that checks out (or the ``best`` one when
    ``which="best"``, falling back the same way): (path, model_state, trainer_state, manifest).

    A damaged checkpoint is skipped with a warning naming it; CheckpointError when none is usable.
    """
    candidates = [p for _, p in reversed(list_checkpoints(run_dir))]
    if not candidates:
        raise CheckpointError(f"no checkpoint in {checkpoint_root(run_dir)}")
    # "latest" is the newest step that checks out (its pointer can lag by one after a crash
    # between the rename and the pointer's update); "best" follows its pointer first
    pointer = checkpoint_root(run_dir) / which
    if which == "best" and pointer.is_file():
        named = checkpoint_root(run_dir) / pointer.read_text().strip()
        if named in candidates:
            candidates.remove(named)
            candidates.insert(0, named)
    errors = []
    for path in candidates:
        try:
            loaded = load_checkpoint(path)
        except CheckpointError as e:
            errors.append(str(e))
            warnings.warn(f"skipping damaged checkpoint: {e}", stacklevel=2)
            continue
        return (path, *loaded)
    raise CheckpointError("no usable checkpoint; " + "; ".join(errors))


def _remove(path: Path) -> None:
    """Delete a checkpoint directory: renamed out of the ``step_*`` namespace first (atomic), so
    a crash half-way through the deletion leaves no half-empty ``step_*`` directory behind."""
    trash = path.with_name(f".trash-{path.name}-{os.getpid()}")
    os.rename(path, trash)
    _fsync_dir(path.parent)
    shutil.rmtree(trash, ignore_errors=True)


def prune(run_dir: Path, keep_last: int) -> None:
    """Delete all but the ``keep_last`` newest checkpoints and the best one (lowest val_loss);
    update the ``best`` pointer. Leftovers of a crashed save or deletion go too."""
    root = checkpoint_root(run_dir)
    ckpts = list_checkpoints(run_dir)
    best, best_loss = None, float("inf")
    for _, p in ckpts:
        try:
            loss = json.loads((p / MANIFEST).read_text()).get("val_loss")
        except (OSError, ValueError):
            continue
        if loss is not None and loss < best_loss:
            best, best_loss = p, loss
    keep = {p for _, p in ckpts[-keep_last:]} | ({best} if best else set())
    for _, p in ckpts:
        if p not in keep:
            _remove(p)
    for pattern in (".tmp-step_*", ".trash-step_*", ".latest.*", ".best.*"):
        for p in root.glob(pattern):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    if best is not None:
        write_atomic(root / "best", best.name.encode())
