"""Checkpoints that survive a crash at any instant, and are checked before they are trusted.

A checkpoint is a directory ``<run>/checkpoints/step_XXXXXXXX/`` holding
  - ``model.safetensors``: the model's weights;
  - ``trainer_state.pt``: optimizer, scheduler and RNG states and the step (the data position
    is a function of the step, see minrnn.data.text);
  - optionally more files (``extra_files``): transformers' ``config.json`` and the tokenizer's
    files, which make the directory one that ``from_pretrained`` loads (see hf_export.py);
  - ``manifest.json``: size and SHA-256 of every other file, the step and the validation loss.
It is written into a hidden temporary directory, every file fsynced, and then renamed into
place (a rename is atomic), so a ``step_*`` directory is either complete or absent; pointer
files ``latest`` and ``best`` are replaced the same way. Loading checks the manifest before
reading anything, and falls back to the newest older checkpoint that checks out, with a
warning, when the newest one is damaged. A failed write (a full disk) is a CheckpointError
that leaves the earlier checkpoints untouched.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import tempfile
import time
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch

from .._files import fsync_dir as _fsync_dir
from .._files import write_atomic
from ..data.corpora import sha256_of as _sha256

__all__ = [
    "CheckpointError",
    "checkpoint_root",
    "list_checkpoints",
    "load_checkpoint",
    "load_latest",
    "prune",
    "save_checkpoint",
    "verify",
    "write_atomic",
]

MODEL_FILE = "model.safetensors"
STATE_FILE = "trainer_state.pt"
MANIFEST = "manifest.json"
_STEP_DIR = re.compile(r"^step_(\d{8})$")
_UMASK = os.umask(0o022)
os.umask(_UMASK)  # read the umask (setting it is the only way), then put it back


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
                    val_loss: float | None = None, extra_files: Mapping[str, bytes] | None = None) -> Path:
    """Write checkpoint ``step`` atomically; returns its directory.

    ``extra_files`` ({name: content}, e.g. transformers' ``config.json`` and the tokenizer's
    files) are written beside the weights and checksummed in the manifest like them. A failed
    write (a full disk) raises CheckpointError and leaves every earlier checkpoint as it was.
    """
    from safetensors import SafetensorError

    root = checkpoint_root(run_dir)
    extra = dict(extra_files or {})
    for name in extra:
        if name in (MODEL_FILE, STATE_FILE, MANIFEST) or not _plain_name(name):
            raise ValueError(f"extra_files: {name!r} is not a free plain file name")
    try:
        root.mkdir(parents=True, exist_ok=True)
        final = root / f"step_{step:08d}"
        tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".tmp-step_{step:08d}-"))
    except OSError as e:
        raise CheckpointError(f"cannot write checkpoint {step} in {root}: {_reason(e)}") from None
    try:
        _write_checkpoint_files(tmp, step, model_state, trainer_state, val_loss, extra)
        _move_into_place(tmp, final)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, (OSError, SafetensorError)):
            raise CheckpointError(f"cannot write checkpoint {final}: {_reason(e)}; "
                                  "the earlier checkpoints are kept") from None
        raise
    try:
        _fsync_dir(root)
        write_atomic(root / "latest", final.name.encode())
    except OSError as e:  # the checkpoint is complete; only the pointer (which loading does not need) lags
        raise CheckpointError(f"checkpoint {final} is written but {root / 'latest'} is not: {_reason(e)}") from None
    return final


def _write_checkpoint_files(tmp: Path, step: int, model_state: dict, trainer_state: dict,
                            val_loss: float | None, extra: dict[str, bytes]) -> None:
    from safetensors.torch import save_file

    # tied weights share storage, which safetensors refuses: store each tensor on its own;
    # the "format" entry is what transformers' save_pretrained writes too
    save_file({k: v.detach().cpu().contiguous().clone() for k, v in model_state.items()}, str(tmp / MODEL_FILE),
              metadata={"format": "pt"})
    try:
        torch.save(trainer_state, tmp / STATE_FILE)
    except RuntimeError as e:  # torch reports a short write (a full disk) as "unexpected pos ..."
        free = shutil.disk_usage(tmp).free
        raise OSError(0, f"{STATE_FILE}: {_reason(e)} ({free} bytes free on its disk)") from None
    for name, data in extra.items():
        _write_file(tmp / name, data)
    files = {}
    for name in (MODEL_FILE, STATE_FILE, *extra):
        with open(tmp / name, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp / name, 0o666 & ~_UMASK)
        files[name] = {"size": (tmp / name).stat().st_size, "sha256": _sha256(tmp / name)}
    manifest = {"step": step, "val_loss": val_loss, "files": files}
    _write_file(tmp / MANIFEST, json.dumps(manifest, indent=1).encode())
    os.chmod(tmp, 0o777 & ~_UMASK)  # mkdtemp's 0700 would hide the checkpoint from other users
    _fsync_dir(tmp)


def _move_into_place(tmp: Path, final: Path) -> None:
    """Rename the finished ``tmp`` to ``final``. A checkpoint of this step already there (from a
    run cut off after it) is set aside first and put back if the rename fails."""
    if not final.exists():
        os.rename(tmp, final)
        return
    aside = final.with_name(f".trash-{final.name}-{os.getpid()}")
    os.rename(final, aside)
    try:
        os.rename(tmp, final)
    except BaseException:
        os.rename(aside, final)
        raise
    _fsync_dir(final.parent)
    shutil.rmtree(aside, ignore_errors=True)


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _plain_name(name: str) -> bool:
    return isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name


def _reason(e: BaseException) -> str:
    """An OSError's reason in one line ("No space left on device"), else the error's text."""
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return " ".join(str(e).split())[:200]


def verify(path: Path) -> dict:
    """The manifest of checkpoint ``path`` after checking every file it lists (the weights and
    the trainer state at least) against it; raises CheckpointError saying what is wrong."""
    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path / MANIFEST} cannot be read ({_reason(e)}): damaged") from None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict):
        raise CheckpointError(f"{path / MANIFEST} lists no files: damaged")
    for name in (MODEL_FILE, STATE_FILE):
        if name not in files:
            raise CheckpointError(f"{path / MANIFEST} does not list {name}: damaged")
    for name, spec in files.items():
        if not _plain_name(name) or not isinstance(spec, dict) or not isinstance(spec.get("size"), int) \
                or not isinstance(spec.get("sha256"), str):
            raise CheckpointError(f"{path / MANIFEST}: entry {name!r} is malformed: damaged")
        _check_file(path / name, spec)
    return manifest


def _check_file(f: Path, spec: dict) -> None:
    try:
        size = f.stat().st_size
        if size != spec["size"]:
            raise CheckpointError(f"{f} has {size} bytes, the manifest says {spec['size']}: truncated or damaged")
        if _sha256(f) != spec["sha256"]:
            raise CheckpointError(f"{f} does not match its checksum: damaged")
    except FileNotFoundError:
        raise CheckpointError(f"{f} is missing") from None
    except OSError as e:  # also a checkpoint deleted while it is read: the caller looks again
        raise CheckpointError(f"{f} cannot be read ({_reason(e)})") from None


def load_checkpoint(path: Path) -> tuple[dict, dict, dict]:
    """(model_state, trainer_state, manifest) of one checkpoint, verified first."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    manifest = verify(path)
    try:
        model_state = load_file(str(Path(path) / MODEL_FILE))
        trainer_state = torch.load(Path(path) / STATE_FILE, map_location="cpu", weights_only=True)
    except (SafetensorError, RuntimeError, OSError, EOFError, ValueError, pickle.UnpicklingError) as e:
        raise CheckpointError(f"{path}: cannot be read ({_reason(e)})") from None
    return model_state, trainer_state, manifest


def load_latest(run_dir: Path, which: str = "latest", fallback: bool = True) -> tuple[Path, dict, dict, dict]:
    """The newest checkpoint of ``run_dir`` that checks out (or the ``best`` one when
    ``which="best"``, falling back the same way): (path, model_state, trainer_state, manifest).

    A damaged checkpoint is skipped with a warning naming it; CheckpointError when none is
    usable. ``fallback=False`` (for eval and generate, which should not silently score an
    older model) makes a damaged newest (or best) checkpoint an error naming the file. A
    checkpoint that disappears while it is read (deleted by a run training beside the reader)
    is passed over either way.
    """
    if which not in ("latest", "best"):
        raise ValueError(f"which must be 'latest' or 'best', got {which!r}")
    for attempt in range(5):  # a trainer beside the reader may prune what was listed: then list again
        candidates = _candidates(run_dir, which)
        if not candidates:
            # a listing taken while the newest was renamed in and the oldest out can miss both
            if attempt < 4 and checkpoint_root(run_dir).is_dir():
                time.sleep(0.01)
                continue
            raise CheckpointError(f"no checkpoint in {checkpoint_root(run_dir)}")
        errors = []
        for path in candidates:
            try:
                loaded = load_checkpoint(path)
            except CheckpointError as e:
                if not path.is_dir():  # deleted since it was listed
                    break
                if not fallback:
                    raise CheckpointError(f"{e}; refusing to use {path.name}") from None
                errors.append(str(e))
                warnings.warn(f"skipping damaged checkpoint: {e}", stacklevel=2)
                continue
            return (path, *loaded)
        else:
            raise CheckpointError("no usable checkpoint; " + "; ".join(errors))
    raise CheckpointError(f"the checkpoints in {checkpoint_root(run_dir)} kept changing while they were read")


def _candidates(run_dir: Path, which: str) -> list[Path]:
    """Checkpoints to try, in order: newest first, the one the ``best`` pointer names first for "best"."""
    candidates = [p for _, p in reversed(list_checkpoints(run_dir))]
    # "latest" is the newest step that checks out (its pointer can lag by one after a crash
    # between the rename and the pointer's update); "best" follows its pointer first
    pointer = checkpoint_root(run_dir) / which
    if which == "best" and pointer.is_file():
        try:
            named = checkpoint_root(run_dir) / pointer.read_text().strip()
        except (OSError, ValueError):
            named = None
        if named in candidates:
            candidates.remove(named)
            candidates.insert(0, named)
    return candidates


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
            manifest = json.loads((p / MANIFEST).read_text())
        except (OSError, ValueError):
            continue
        loss = manifest.get("val_loss") if isinstance(manifest, dict) else None
        if isinstance(loss, (int, float)) and loss < best_loss:
            best, best_loss = p, loss
    keep = {p for _, p in ckpts[-keep_last:]} | ({best} if best else set())
    try:
        for _, p in ckpts:
            if p not in keep:
                _remove(p)
        for pattern in (".tmp-step_*", ".trash-step_*", ".latest.*", ".best.*"):
            for p in root.glob(pattern):
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        if best is not None:
            write_atomic(root / "best", best.name.encode())
    except OSError as e:
        raise CheckpointError(f"cannot tidy the checkpoints in {root}: {_reason(e)}") from None
