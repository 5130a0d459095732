"""A run folder for one trainer at a time: the lock, the fresh-start check, and the metrics
rows a resumed run drops."""

import gc
import json
import os

import pytest

from minrnn.training import checkpoint as ckpt
from minrnn.training.run_folder import (
    LOCK_FILE,
    RunFolderError,
    RunInUseError,
    RunLock,
    check_fresh_start,
    existing_run_files,
    lock_holder,
    truncate_metrics,
    write_run_file,
)

from .fault_child import state_of
from .run_helpers import enospc, one_line


def test_lock_excludes_a_second_holder_until_released(tmp_path):
    run = tmp_path / "run"
    lock = RunLock(run)  # creates the folder
    assert lock.held and lock_holder(run) == os.getpid()
    # flock locks an open file, not a process: a second RunLock in the same process is refused too
    with pytest.raises(RunInUseError, match=f"in use by another trainer \\(pid {os.getpid()}\\)") as e:
        RunLock(run)
    one_line(str(e.value))
    assert isinstance(e.value, ckpt.CheckpointError), "the CLI reports CheckpointErrors in one line, exit 2"
    lock.release()
    lock.release()  # idempotent
    assert not lock.held and lock_holder(run) is None
    with RunLock(run) as again:
        assert again.held
    assert (run / LOCK_FILE).exists(), "the lock file stays: deleting it would let two holders lock two files"


def test_a_holder_that_has_not_yet_written_its_pid_is_still_named(tmp_path):
    """A second trainer may try the lock between the holder's flock and its pid write."""
    import fcntl
    import threading

    run = tmp_path / "run"
    run.mkdir()
    fd = os.open(run / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held, no pid yet
        late = threading.Timer(0.2, lambda: os.pwrite(fd, b"4242\n", 0))
        late.start()
        with pytest.raises(RunInUseError, match=r"\(pid 4242\)"):
            RunLock(run)
        late.join()
        os.ftruncate(fd, 0)  # a holder that never writes its pid is "another process"
        with pytest.raises(RunInUseError, match=r"\(another process\)"):
            RunLock(run)
    finally:
        os.close(fd)


def test_an_abandoned_lock_object_releases_the_lock(tmp_path):
    RunLock(tmp_path)
    gc.collect()
    with RunLock(tmp_path):
        pass


def test_lock_on_a_folder_that_cannot_be_created_is_one_line(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(RunFolderError, match="cannot lock") as e:
        RunLock(tmp_path / "file" / "run")
    one_line(str(e.value))


def test_readers_load_while_a_trainer_holds_the_lock(tmp_path):
    ckpt.save_checkpoint(tmp_path, 1, state_of(1), {"step": 1})
    with RunLock(tmp_path):
        assert ckpt.load_latest(tmp_path, fallback=False)[2] == {"step": 1}


def test_fresh_start_into_an_empty_or_unrelated_folder_is_fine(tmp_path):
    assert check_fresh_start(tmp_path / "new") == []
    (tmp_path / "notes.txt").write_text("mine")
    with RunLock(tmp_path):
        assert check_fresh_start(tmp_path) == []
    assert (tmp_path / "notes.txt").read_text() == "mine"


def _old_run(run):
    ckpt.save_checkpoint(run, 5, state_of(5), {"step": 5})
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    (run / "config.toml").write_text("seed = 1\n")
    (run / "tokenizer.json").write_text("{}")
    (run / "tb").mkdir()
    (run / "tb" / "events").write_text("x")
    (run / "notes.txt").write_text("mine")


def test_fresh_start_over_an_earlier_run_is_refused_naming_what_is_there(tmp_path):
    _old_run(tmp_path)
    with pytest.raises(RunFolderError, match="already holds a run \\(1 checkpoint\\(s\\) and checkpoints, config.toml, "
                                             "metrics.jsonl, tb, tokenizer.json\\).*--resume.*--overwrite") as e:
        check_fresh_start(tmp_path)
    one_line(str(e.value))
    assert ckpt.list_checkpoints(tmp_path) and (tmp_path / "metrics.jsonl").exists()


def test_a_killed_run_without_a_checkpoint_still_counts_as_a_run(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2}\n')
    with pytest.raises(RunFolderError, match="already holds a run \\(metrics.jsonl\\)"):
        check_fresh_start(tmp_path)


def test_overwrite_removes_the_run_files_only(tmp_path):
    _old_run(tmp_path)
    removed = check_fresh_start(tmp_path, overwrite=True)
    assert removed == ["checkpoints", "config.toml", "metrics.jsonl", "tb", "tokenizer.json"]
    assert existing_run_files(tmp_path) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def _metrics(path):
    return [json.loads(line)["step"] for line in path.read_text().splitlines()]


def test_truncate_metrics_keeps_the_rows_up_to_the_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [{"step": s, "train_loss": 1.0} for s in (1, 2, 3, 4, 5, 6)] + [{"note": "no step"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 7, "tra')  # killed mid-line
    assert truncate_metrics(tmp_path, 4) == 3
    assert path.read_text().splitlines() == [json.dumps(r) for r in rows if r.get("step", 0) <= 4]
    assert truncate_metrics(tmp_path, 4) == 0
    assert truncate_metrics(tmp_path / "none", 4) == 0


def test_truncate_metrics_on_a_full_disk_leaves_the_file_as_it_was(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n')
    monkeypatch.setattr(os, "fsync", enospc)
    with pytest.raises(RunFolderError, match="cannot rewrite .*metrics.jsonl: No space left on device"):
        truncate_metrics(tmp_path, 1)
    monkeypatch.undo()
    assert _metrics(path) == [1, 2]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]


def test_run_file_write_on_a_full_disk_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "config.toml"
    write_run_file(path, b"seed = 1\n")
    monkeypatch.setattr(os, "replace", enospc)
    with pytest.raises(RunFolderError, match="cannot write .*config.toml: No space left on device") as e:
        write_run_file(path, b"seed = 2\n")
    monkeypatch.undo()
    one_line(str(e.value))
    assert path.read_bytes() == b"seed = 1\n" and sorted(p.name for p in tmp_path.iterdir()) == ["config.toml"]


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_run_files_get_the_permissions_of_a_plain_open(tmp_path, umask):
    """Atomic writes go through a temporary file; it must not leave the owner-only 0600 of mkstemp."""
    old = os.umask(umask)
    try:
        write_run_file(tmp_path / "config.toml", b"seed = 1\n")
        with open(tmp_path / "plain.toml", "wb") as f:
            f.write(b"seed = 1\n")
    finally:
        os.umask(old)
    mode = (tmp_path / "config.toml").stat().st_mode & 0o777
    assert mode == (tmp_path / "plain.toml").stat().st_mode & 0o777 == 0o666 & ~umask
