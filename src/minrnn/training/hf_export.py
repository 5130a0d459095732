"""Checkpoints that transformers loads as they are.

A checkpoint written with ``extra_files=pretrained_files(model, tokenizer)`` holds, beside the
weights and the trainer state, transformers' ``config.json`` and the tokenizer as a fast
tokenizer (``tokenizer.json``, ``tokenizer_config.json``), all checksummed in its manifest:

    import minrnn.models  # registers model type "minrnn" with the Auto classes
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline
    model = AutoModelForCausalLM.from_pretrained("runs/x/checkpoints/step_00001000")
    pipe = pipeline("text-generation", model="runs/x/checkpoints/step_00001000")

The import is what makes transformers know the model type. A process that never imports
minrnn (lm-evaluation-harness's ``hf`` model, a ``pipeline`` script) takes the other route,
``trust_remote_code=True``: ``config.json``'s ``auto_map`` names ``minrnn_auto.py`` in the
folder, one import line that loads the installed minrnn package's classes:

    model = AutoModelForCausalLM.from_pretrained("runs/x/best", trust_remote_code=True)
    tokenizer = AutoTokenizer.from_pretrained("runs/x/best")

Every checkpoint the Trainer writes carries both (``remote_code=True``, the default).
``AutoTokenizer`` reads ``config.json`` before the tokenizer's files, so without
``trust_remote_code`` it asks on a terminal whether to run the folder's code; either answer
(or ``trust_remote_code=False``) loads the tokenizer, which needs no code.

`link_checkpoints` keeps ``<run>/latest`` and ``<run>/best`` pointing at those checkpoint
folders (symbolic links), the paths to give ``from_pretrained``; `add_pretrained_files`
upgrades a checkpoint of an earlier version in place.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

from .._files import write_atomic
from ..data.corpora import sha256_of
from ..data.tokenizers import FILE as TOKENIZER_FILE
from ..data.tokenizers import TokenizerError, hf_files, load_tokenizer
from .checkpoint import (
    MANIFEST,
    MODEL_FILE,
    STATE_FILE,
    CheckpointError,
    checkpoint_root,
    list_checkpoints,
    load_latest,
    verify,
)

__all__ = [
    "CONFIG_FILE",
    "LINKS",
    "REMOTE_CODE_FILE",
    "add_pretrained_files",
    "check_pretrained_config",
    "link_checkpoints",
    "load_run_tokenizer",
    "pretrained_files",
    "pretrained_path",
]

CONFIG_FILE = "config.json"
LINKS = ("latest", "best")
REMOTE_CODE_FILE = "minrnn_auto.py"
_REMOTE_CODE = '''"""Lets transformers' Auto classes load this folder with trust_remote_code=True without
`import minrnn.models` first. The classes are those of the installed minrnn package."""

from minrnn.models import MinRNNConfig, MinRNNForCausalLM, MinRNNModel  # noqa: F401
'''
# keys of config.json that describe the file, not the model
_BOOKKEEPING = {"transformers_version", "architectures", "auto_map", "dtype", "torch_dtype", "_name_or_path"}


def pretrained_files(model, tokenizer, remote_code: bool = True) -> dict[str, bytes]:
    """{file name: content} that make a checkpoint of ``model`` (a MinRNNForCausalLM)
    trained with ``tokenizer`` a folder transformers loads: ``config.json`` (every setting
    written out, so later changes of a default do not change the model) and the tokenizer's
    files; with ``remote_code`` (the default) also the ``auto_map`` entry and ``minrnn_auto.py``.

    Pass it as ``save_checkpoint(..., extra_files=...)``; it does not change during a run,
    so it can be computed once."""
    config = json.loads(model.config.to_json_string(use_diff=False))
    config["architectures"] = [type(model).__name__]
    files = dict(hf_files(tokenizer))
    if remote_code:
        module = REMOTE_CODE_FILE[:-len(".py")]
        config["auto_map"] = {"AutoConfig": f"{module}.MinRNNConfig", "AutoModel": f"{module}.MinRNNModel",
                              "AutoModelForCausalLM": f"{module}.MinRNNForCausalLM"}
        files[REMOTE_CODE_FILE] = _REMOTE_CODE.encode()
    files[CONFIG_FILE] = (json.dumps(config, indent=2, sort_keys=True) + "\n").encode()
    return files


def add_pretrained_files(checkpoint: str | Path, files: Mapping[str, bytes]) -> None:
    """Add ``files`` (from `pretrained_files`) to an existing checkpoint and to its manifest.

    The checkpoint is verified first. Each file is replaced atomically and the manifest last,
    so a crash or a full disk on the way leaves a checkpoint that still verifies (a file not
    yet in the manifest is not checked); CheckpointError on failure. Do not run this on a run
    that a trainer is writing (its lock says so)."""
    checkpoint = Path(checkpoint)
    manifest = verify(checkpoint)
    for name in files:
        if name in (MODEL_FILE, STATE_FILE, MANIFEST) or "/" in name:
            raise ValueError(f"files: {name!r} would replace a checkpoint's own file")
    try:
        for name, data in files.items():
            write_atomic(checkpoint / name, data)
        manifest["files"].update({name: _describe(checkpoint / name) for name in files})
        write_atomic(checkpoint / MANIFEST, json.dumps(manifest, indent=1).encode())
    except OSError as e:
        raise CheckpointError(f"cannot add files to {checkpoint}: {e.strerror or e}") from None


def _describe(path: Path) -> dict:
    return {"size": path.stat().st_size, "sha256": sha256_of(path)}


def load_run_tokenizer(run_dir: str | Path, checkpoint: str | Path | None = None):
    """The tokenizer of a run: the copy inside ``checkpoint`` when its manifest lists one
    (checked with the weights), else the run folder's ``tokenizer.json`` (either format).
    A damaged or missing file is a one-line CheckpointError naming it."""
    if checkpoint is not None:
        try:
            listed = json.loads((Path(checkpoint) / MANIFEST).read_text()).get("files", {})
        except (OSError, ValueError, AttributeError):
            listed = {}
        if isinstance(listed, dict) and TOKENIZER_FILE in listed:
            verify(checkpoint)
            return _load(Path(checkpoint))
    return _load(Path(run_dir))


def _load(directory: Path):
    try:
        return load_tokenizer(directory)
    except (TokenizerError, FileNotFoundError) as e:
        raise CheckpointError(str(e)) from None


def check_pretrained_config(checkpoint: str | Path, config) -> None:
    """CheckpointError naming the keys where ``config`` (a MinRNNConfig, e.g. built from a
    run's config.toml) differs from the ``config.json`` the checkpoint was saved with; nothing
    when the checkpoint has no config.json (an earlier version's)."""
    path = Path(checkpoint) / CONFIG_FILE
    if not path.is_file():
        return
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path} cannot be read ({e}): damaged") from None
    mine = json.loads(config.to_json_string(use_diff=False))  # keys and values as config.json spells them
    differ = sorted(k for k in set(saved) & set(mine) if k not in _BOOKKEEPING and saved[k] != mine[k])
    if differ:
        detail = ", ".join(f"{k}: checkpoint {saved[k]!r} vs config {mine[k]!r}" for k in differ)
        raise CheckpointError(f"{Path(checkpoint)} was trained with other model settings ({detail})")


def pretrained_path(run_dir: str | Path, which: str = "latest") -> Path:
    """The folder of a run's newest (``which="latest"``) or best verified checkpoint, the one
    to hand to ``from_pretrained``; CheckpointError when it is damaged or absent."""
    return load_latest(run_dir, which, fallback=False)[0]


def link_checkpoints(run_dir: str | Path) -> dict[str, Path]:
    """Point ``<run>/latest`` at the newest checkpoint folder and ``<run>/best`` at the one the
    ``best`` pointer names (relative symbolic links, each replaced atomically); returns
    {link name: target} of the links made. Call it after `save_checkpoint` and `prune`. A link never names a
    checkpoint that was not complete; a path of that name that is not a link is left alone."""
    run_dir = Path(run_dir)
    ckpts = list_checkpoints(run_dir)
    if not ckpts:
        return {}
    targets = {"latest": ckpts[-1][1]}
    try:
        best = checkpoint_root(run_dir) / (checkpoint_root(run_dir) / "best").read_text().strip()
        if best.name.startswith("step_") and best.is_dir():
            targets["best"] = best
    except (OSError, ValueError):
        pass
    made = {}
    for name, target in targets.items():
        link = run_dir / name
        if link.exists() and not link.is_symlink():
            continue
        tmp = run_dir / f".{name}.link-{os.getpid()}"
        try:
            tmp.unlink(missing_ok=True)
            os.symlink(os.path.relpath(target, run_dir), tmp, target_is_directory=True)
            os.replace(tmp, link)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise CheckpointError(f"cannot point {link} at {target.name}: {e.strerror or e}") from None
        made[name] = target
    return made
