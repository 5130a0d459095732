"""Checkpoints: a run killed with SIGKILL and resumed equals an uninterrupted run; a crash or
damage never yields a checkpoint that loads wrongly."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from minrnn.training import TrainConfig, Trainer
from minrnn.training import checkpoint as ckpt
from minrnn.training.metrics import read_metrics

from .conftest import TINY, cli_env

STEPS = 120


def overrides(small_text, out_dir, **more):
    o = {"data": str(small_text), "out_dir": str(out_dir), "steps": STEPS, "checkpoint_every": 10,
         "eval_every": 40, "keep_last": 2, "model.dropout": 0.1}
    o.update(more)
    return o


def final_weights(run_dir):
    path = ckpt.list_checkpoints(run_dir)[-1][1]
    return load_file(str(path / ckpt.MODEL_FILE))


def test_sigkill_then_resume_equals_uninterrupted(small_text, tmp_path):
    # the reference: one uninterrupted run, in this process, on one thread like the subprocesses
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        Trainer(TrainConfig.from_file(TINY, overrides(small_text, tmp_path / "ref")), log=lambda s: None).train()
    finally:
        torch.set_num_threads(threads)

    run = tmp_path / "killed"
    args = [sys.executable, "-m", "minrnn", "train", str(TINY)]
    for k, v in overrides(small_text, run).items():
        args += [f"--{k}", str(v)]
    proc = subprocess.Popen(args, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 90
    while not (run / "checkpoints" / "step_00000030").exists():
        assert proc.poll() is None, f"the run ended before it was killed: {proc.stderr.read().decode()}"
        assert time.time() < deadline, "no checkpoint at step 30 within 90 s"
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    steps_done = max(r["step"] for r in read_metrics(run))
    print(f"killed after step {steps_done}; left: {sorted(p.name for p in (run / 'checkpoints').iterdir())}")
    assert steps_done < STEPS, "killed too late to test anything"

    # what the kill left: every step_* directory is complete and verifies
    left = ckpt.list_checkpoints(run)
    assert left and all(step < STEPS for step, _ in left)
    for _, path in left:
        ckpt.verify(path)

    resumed = subprocess.run(args + ["--resume"], env=cli_env(), capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout

    ref, got = final_weights(tmp_path / "ref"), final_weights(run)
    assert ref.keys() == got.keys()
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=0, atol=1e-6, msg=k)
    ref_log, got_log = read_metrics(tmp_path / "ref"), read_metrics(run)
    assert [r["step"] for r in got_log] == list(range(1, STEPS + 1))
    for a, b in zip(ref_log, got_log):
        assert abs(a["train_loss"] - b["train_loss"]) <= 1e-6, (a, b)
        assert ("val_loss" in a) == ("val_loss" in b)
        if "val_loss" in a:
            assert abs(a["val_loss"] - b["val_loss"]) <= 1e-6


def _short_run(small_text, out_dir, **more):
    more = {"steps": 20, "checkpoint_every": 5, "keep_last": 10, **more}
    cfg = TrainConfig.from_file(TINY, overrides(small_text, out_dir, **more))
    return Trainer(cfg, log=lambda s: None).train()


def test_crash_during_save_leaves_no_checkpoint(small_text, tmp_path, monkeypatch):
    _short_run(small_text, tmp_path)
    before = [s for s, _ in ckpt.list_checkpoints(tmp_path)]

    def dying_save(obj, f, *a, **k):
        with open(f, "wb") as fh:
            fh.write(b"half")
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(tmp_path, 99, {"w": torch.ones(3)}, {"step": 99})
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == before
    assert (tmp_path / "checkpoints" / "latest").read_text() == f"step_{before[-1]:08d}"


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_damaged_newest_checkpoint_falls_back_to_older(small_text, tmp_path, damage):
    _short_run(small_text, tmp_path)
    (_, newest), (step_old, _) = ckpt.list_checkpoints(tmp_path)[-1], ckpt.list_checkpoints(tmp_path)[-2]
    f = newest / ckpt.MODEL_FILE
    data = bytearray(f.read_bytes())
    if damage == "truncate":
        f.write_bytes(data[: len(data) // 2])
    else:
        data[-10] ^= 0xFF
        f.write_bytes(bytes(data))
    with pytest.raises(ckpt.CheckpointError, match="truncated|checksum"):
        ckpt.verify(newest)
    with pytest.warns(UserWarning, match="skipping damaged checkpoint"):
        path, _, state, _ = ckpt.load_latest(tmp_path)
    assert path.name == f"step_{step_old:08d}" and state["step"] == step_old
    assert newest.exists(), "the damaged checkpoint is left for the user to inspect"


def test_keeps_last_n_and_best(small_text, tmp_path):
    _short_run(small_text, tmp_path, keep_last=1, eval_every=5)
    kept = ckpt.list_checkpoints(tmp_path)
    losses = {json.loads((p / ckpt.MANIFEST).read_text())["val_loss"]: p for _, p in kept}
    best_name = (tmp_path / "checkpoints" / "best").read_text()
    assert kept[-1][0] == 20 and len(kept) <= 2
    assert best_name == losses[min(losses)].name
    assert best_name in {p.name for _, p in kept}


def test_crash_while_pruning_leaves_no_half_deleted_checkpoint(small_text, tmp_path, monkeypatch):
    import shutil

    _short_run(small_text, tmp_path)
    before = ckpt.list_checkpoints(tmp_path)

    def dying_rmtree(path, ignore_errors=False):
        from pathlib import Path

        next(Path(path).iterdir()).unlink()  # one file deleted, then the process dies
        raise KeyboardInterrupt("killed while deleting")

    monkeypatch.setattr(shutil, "rmtree", dying_rmtree)
    with pytest.raises(KeyboardInterrupt):
        ckpt.prune(tmp_path, keep_last=1)
    monkeypatch.undo()
    left = ckpt.list_checkpoints(tmp_path)
    assert len(left) == len(before) - 1
    for _, path in left:
        ckpt.verify(path)
    ckpt.prune(tmp_path, keep_last=1)  # the next prune clears the leftovers
    assert not list((tmp_path / "checkpoints").glob(".trash-*"))


def test_the_fused_optimizer_is_the_default_and_makes_the_loops_updates(small_text, tmp_path):
    """AdamW runs as its fused kernel unless fused_optimizer = false: the same update rule, so the
    weights after 20 steps agree with the per-tensor loop's to rounding."""
    plain = Trainer(TrainConfig.from_file(TINY, overrides(small_text, tmp_path / "plain", steps=20,
                                                          fused_optimizer=False)), log=lambda s: None)
    assert not plain.optimizer.defaults["fused"]
    plain.train()
    fused = Trainer(TrainConfig.from_file(TINY, overrides(small_text, tmp_path / "fused", steps=20)),
                    log=lambda s: None)
    assert fused.optimizer.defaults["fused"] is True
    fused.train()
    a, b = final_weights(tmp_path / "plain"), final_weights(tmp_path / "fused")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=k)
