"""The order of a checkpoint's writes, as a power loss would test it: every file fsynced with its
final content before the rename that makes the checkpoint visible, the temporary folder fsynced
before that rename, the parent folder fsynced after it, and the ``latest`` pointer replaced only
once the checkpoint it names is durable.

A recorder wraps ``os.fsync``, ``os.rename`` and ``os.replace`` for the duration of one
``save_checkpoint`` and notes, for each fsync, which file or folder it was and (for a file) a
hash of its content at that moment.
"""

import hashlib
import os
from pathlib import Path

import pytest
import torch

from minrnn.training.checkpoint import save_checkpoint

pytestmark = pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to name an fd's file")


def _digest(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


class Recorder:
    def __init__(self, monkeypatch):
        self.events: list[tuple] = []
        fsync, rename, replace = os.fsync, os.rename, os.replace

        def recorded_fsync(fd):
            path = os.readlink(f"/proc/self/fd/{fd}")
            if os.path.isdir(path):
                self.events.append(("fsync_dir", path))
            else:
                self.events.append(("fsync", path, _digest(path)))
            return fsync(fd)

        def recorded(kind, fn):
            def call(src, dst, *args, **kwargs):
                self.events.append((kind, os.path.abspath(src), os.path.abspath(dst)))
                return fn(src, dst, *args, **kwargs)
            return call

        monkeypatch.setattr(os, "fsync", recorded_fsync)
        monkeypatch.setattr(os, "rename", recorded("rename", rename))
        monkeypatch.setattr(os, "replace", recorded("replace", replace))

    def index(self, *match) -> int:
        """The position of the first event that starts with ``match``."""
        for i, event in enumerate(self.events):
            if event[:len(match)] == match:
                return i
        raise AssertionError(f"no event {match} among {self.events}")

    def last_index(self, *match) -> int:
        return max(i for i, event in enumerate(self.events) if event[:len(match)] == match)


def _save(run_dir: Path, step: int) -> Path:
    model = {"w": torch.randn(8, 4), "b": torch.randn(4)}
    trainer = {"optimizer": {"m": torch.randn(8, 4)}, "step": step}
    extra = {"config.json": b'{"hidden_size": 4}', "tokenizer.json": b"{}"}
    return save_checkpoint(run_dir, step, model, trainer, val_loss=1.5, extra_files=extra)


@pytest.mark.parametrize("again", [False, True], ids=["new", "over-an-existing-step"])
def test_a_checkpoint_is_durable_before_it_is_visible_and_before_latest_names_it(tmp_path, monkeypatch, again):
    run_dir = tmp_path / "run"
    if again:  # a run cut off after writing step 7 writes it again on resume
        _save(run_dir, 7)
    rec = Recorder(monkeypatch)
    final = str(_save(run_dir, 7).resolve())
    root = str(Path(final).parent)

    # the rename that makes the checkpoint visible: its temporary folder onto step_00000007
    shown = next(i for i, e in enumerate(rec.events) if e[0] == "rename" and e[2] == final
                 and Path(e[1]).name.startswith(".tmp-"))
    tmp = rec.events[shown][1]
    files = sorted(os.listdir(final))
    assert {"model.safetensors", "trainer_state.pt", "manifest.json", "config.json", "tokenizer.json"} <= set(files)
    for name in files:
        # fsynced in the temporary folder, before the rename, with the content it has now
        synced = [e for e in rec.events[:shown] if e[0] == "fsync" and e[1] == os.path.join(tmp, name)]
        assert synced, f"{name} was never fsynced before the checkpoint became visible"
        assert synced[-1][2] == _digest(os.path.join(final, name)), f"{name} changed after its fsync"
    # the folder's entries: fsynced after the last file, before the rename
    last_file = rec.last_index("fsync", os.path.join(tmp, "manifest.json"))
    assert last_file < rec.last_index("fsync_dir", tmp) < shown
    # the rename itself made durable in the parent, and only then the pointer replaced
    pointer = rec.index("replace")
    assert rec.events[pointer][2] == os.path.join(root, "latest")
    assert any(e == ("fsync_dir", root) for e in rec.events[shown + 1:pointer]), \
        "the checkpoints folder was not fsynced between the rename and the pointer"
    # the pointer's new content fsynced before its replace, and the replace made durable
    written = [e for e in rec.events[:pointer] if e[0] == "fsync" and e[1] == rec.events[pointer][1]]
    assert written and Path(root, "latest").read_text() == Path(final).name
    assert ("fsync_dir", root) in rec.events[pointer + 1:]
