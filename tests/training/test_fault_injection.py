"""Faults injected into real processes: a checkpoint writer SIGKILLed at each stage of a write,
a full disk, two trainers on one run folder. Each case checks that nothing earlier was lost
(the earlier checkpoints are bit-identical and load) and that every message is one line."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from minrnn.training import checkpoint as ckpt
from minrnn.training.run_folder import LOCK_FILE, RunInUseError, RunLock, lock_holder

from .conftest import cli_env
from .fault_child import state_of
from .run_helpers import one_line, snapshot

CHILD = Path(__file__).with_name("fault_child.py")
EXTRA = {"config.json": b"{}\n"}


def child(*args, **popen) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(CHILD), *map(str, args)], env=cli_env(), text=True, **popen)


def run_child(*args) -> subprocess.CompletedProcess:
    p = child(*args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = p.communicate(timeout=120)
    return subprocess.CompletedProcess(args, p.returncode, out, err)


def two_checkpoints(run: Path) -> dict:
    for step in (1, 2):
        ckpt.save_checkpoint(run, step, state_of(step), {"step": step}, 1.0 / step, extra_files=EXTRA)
    ckpt.prune(run, keep_last=2)
    return {p.name: snapshot(p) for _, p in ckpt.list_checkpoints(run)}


def assert_intact(run: Path, before: dict) -> None:
    """The checkpoints ``before`` holds are there, bit for bit, and every step_* verifies."""
    now = {p.name: p for _, p in ckpt.list_checkpoints(run)}
    for name, files in before.items():
        assert name in now, f"{name} was lost"
        assert snapshot(now[name]) == files, f"{name} changed"
    for path in now.values():
        ckpt.verify(path)


@pytest.mark.parametrize("kill_at, survives", [
    ("mid-weights", False), ("weights", False), ("state", False), ("extra", False), ("manifest", False),
    ("before-rename", False), ("after-rename", True), ("prune", True),
])
def test_sigkill_while_writing_a_checkpoint_loses_nothing_earlier(kill_at, survives, tmp_path):
    run = tmp_path / "run"
    before = two_checkpoints(run)
    r = run_child("save", run, 3, 3, kill_at)
    assert r.returncode == -signal.SIGKILL, r.stderr
    if kill_at == "prune":  # step 1 was being pruned (keep_last=2): it may go, the others may not
        before.pop("step_00000001")
    assert_intact(run, before)
    steps = [s for s, _ in ckpt.list_checkpoints(run)]
    assert (3 in steps) == survives, steps
    _, model_state, state, _ = ckpt.load_latest(run, fallback=False)
    assert state["step"] == (3 if survives else 2)
    expected = state_of(state["step"])
    assert all(model_state[k].equal(expected[k]) for k in expected)
    # the next save of the same run tidies what the killed one left behind
    ckpt.save_checkpoint(run, 4, state_of(4), {"step": 4}, 0.25, extra_files=EXTRA)
    ckpt.prune(run, keep_last=2)
    assert not [p.name for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]
    assert (run / "checkpoints" / "latest").read_text() == "step_00000004"


def test_sigkill_while_replacing_a_checkpoint_of_the_same_step_keeps_the_others(tmp_path):
    run = tmp_path / "run"
    before = two_checkpoints(run)
    r = run_child("save", run, 2, 99, "aside")  # step 2 again, killed once the old copy is set aside
    assert r.returncode == -signal.SIGKILL, r.stderr
    before.pop("step_00000002")
    assert_intact(run, before)
    assert ckpt.load_latest(run, fallback=False)[2]["step"] in (1, 2)


def test_a_child_that_is_not_killed_writes_a_checkpoint_that_loads(tmp_path):
    run = tmp_path / "run"
    before = two_checkpoints(run)
    r = run_child("save", run, 3, 3, "none")
    assert r.returncode == 0, r.stderr
    before.pop("step_00000001")  # pruned: keep_last=2
    assert_intact(run, before)
    assert ckpt.load_latest(run, fallback=False)[2] == {"step": 3, "seed": 3}


@pytest.fixture
def small_disk(tmp_path):
    """A 256 KiB tmpfs: a real disk that fills up (mounting one needs root)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    ok = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], capture_output=True)
    if ok.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root); the injected ENOSPC tests cover the logic")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def _fill(disk: Path, leave: int) -> None:
    """Fill ``disk`` so that about ``leave`` bytes stay free."""
    filler = disk / "filler"
    filler.unlink(missing_ok=True)
    free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
    filler.write_bytes(b"x" * max(0, free - leave))


def test_a_real_full_disk_at_every_stage_of_a_save_keeps_the_earlier_checkpoint(small_disk):
    run = small_disk / "run"
    big = {**EXTRA, "tokenizer.json": b"t" * 9000}
    ckpt.save_checkpoint(run, 1, state_of(1), {"step": 1}, 1.0, extra_files=big)
    before = {p.name: snapshot(p) for _, p in ckpt.list_checkpoints(run)}
    outcomes = []
    for pages in range(12):  # from no room at all to room for everything, a page at a time
        _fill(small_disk, pages * 4096)
        try:
            path = ckpt.save_checkpoint(run, 2, state_of(2), {"step": 2}, 0.5, extra_files=big)
        except ckpt.CheckpointError as e:
            msg = one_line(str(e))
            assert "No space left on device" in msg or "bytes free on its disk" in msg, msg
            outcomes.append(msg.split(": ", 2)[-1][:40])
        else:
            ckpt.verify(path)
            outcomes.append("saved")
            ckpt._remove(path)
        assert_intact(run, before)
        assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith((".tmp", ".trash"))]
    print(outcomes)
    assert outcomes[0] != "saved" and outcomes[-1] == "saved"


def test_a_full_disk_in_a_child_is_a_one_line_message(small_disk):
    run = small_disk / "run"
    ckpt.save_checkpoint(run, 1, state_of(1), {"step": 1}, 1.0, extra_files=EXTRA)
    before = {p.name: snapshot(p) for _, p in ckpt.list_checkpoints(run)}
    _fill(small_disk, 4096)
    r = run_child("save", run, 2, 2, "none")
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert one_line(r.stderr).startswith("error: cannot write checkpoint") and "earlier checkpoints are kept" in r.stderr
    assert_intact(run, before)
    assert ckpt.load_latest(run, fallback=False)[2]["step"] == 1


def test_a_reader_loads_a_complete_checkpoint_while_a_trainer_saves_and_prunes(tmp_path):
    import warnings

    run = tmp_path / "run"
    ckpt.save_checkpoint(run, 0, state_of(0), {"step": 0})
    writer = child("write-loop", run, 150, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    seen = set()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # not even a "skipping damaged checkpoint"
            while writer.poll() is None or not seen:
                _, model_state, state, _ = ckpt.load_latest(run, fallback=False)
                expected = state_of(state["step"])
                assert all(model_state[k].equal(expected[k]) for k in expected), state["step"]
                seen.add(state["step"])
    finally:
        if writer.poll() is None:
            writer.kill()
        err = writer.stderr.read()
        writer.stderr.close()
    assert writer.wait() == 0, err
    assert len(seen) > 2, f"the reader saw too few checkpoints to test anything: {sorted(seen)}"
    assert ckpt.load_latest(run, fallback=False)[2]["step"] == 150


def test_second_trainer_is_refused_naming_the_holder_and_a_killed_holders_lock_is_taken_over(tmp_path):
    run = tmp_path / "run"
    holder = child("hold", run, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        line = holder.stdout.readline()
        assert line.startswith("locked "), holder.stderr.read()
        pid = int(line.split()[1])
        second = run_child("hold", run)
        assert second.returncode == 2
        assert f"in use by another trainer (pid {pid})" in one_line(second.stderr)
        with pytest.raises(RunInUseError, match=f"pid {pid}"):
            RunLock(run)
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(timeout=30)
    finally:
        if holder.poll() is None:
            holder.kill()
        holder.stdin.close()
        holder.stdout.close()
        holder.stderr.close()
    assert lock_holder(run) == pid  # the dead holder's pid is still written: stale, not held
    with RunLock(run) as lock:
        assert lock.held and lock_holder(run) == os.getpid()
    assert (run / LOCK_FILE).exists() and lock_holder(run) is None


def test_two_trainers_started_together_exactly_one_holds_the_lock(tmp_path):
    run = tmp_path / "run"
    procs = [child("hold", run, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for _ in range(2)]
    try:
        deadline = time.time() + 120
        while sum(p.poll() is not None for p in procs) < 1:  # the loser exits at once
            assert time.time() < deadline, "neither process gave up the race"
            time.sleep(0.05)
        loser = next(p for p in procs if p.poll() is not None)
        winner = next(p for p in procs if p is not loser)
        assert loser.returncode == 2
        err = one_line(loser.stderr.read())
        line = winner.stdout.readline()
        assert line == f"locked {winner.pid}\n"
        assert f"(pid {winner.pid})" in err
        winner.stdin.close()
        assert winner.wait(timeout=30) == 0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            for f in (p.stdin, p.stdout, p.stderr):
                if not f.closed:
                    f.close()
