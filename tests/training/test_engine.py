"""The engine's contract with its users: presets found by name, one-line errors that leave no
run folder behind, a used run folder never mixed into, a resume that keeps the run's settings,
and any workload and model trained by the same loop."""

import json

import pytest
import torch

from minrnn.training.config import ConfigError, TrainConfig, find_config, list_presets
from minrnn.training.metrics import read_metrics

from .conftest import TINY, minrnn
from .test_cli import assert_user_error


def test_version(capsys):
    import minrnn as package
    from minrnn.cli import main

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"minrnn {package.__version__}"


def test_presets_are_found_by_name_inside_the_package():
    assert {"shakespeare_char", "tiny_test", "wikitext2_bpe"} <= set(list_presets())
    path = find_config("shakespeare_char")
    assert path.parent.name == "presets" and path.parent.parent.name == "training"
    assert TrainConfig.from_file(path).model["cell"] == "mingru"
    with pytest.raises(ConfigError, match="did you mean 'shakespeare_char'"):
        find_config("shakespeare_chr")
    with pytest.raises(ConfigError, match="config file nowhere/x.toml not found"):
        find_config("nowhere/x.toml")


@pytest.mark.parametrize("key, value, message", [
    ("model.hidden_size", -4, ("hidden_size must be a positive integer, got -4",)),
    # the cells known are the registry's (minrnn.ops.cells.CELLS), however it lists them
    ("model.cell", "gru", ("cell must be one of", "'mingru'", "'minlstm_signed'", "got 'gru'")),
    ("model.hidden_act", "nope", ("hidden_act must be one of",)),
])
def test_a_bad_model_value_is_one_line_and_leaves_no_run_folder(small_text, tmp_path, key, value, message):
    out = tmp_path / "run"
    assert_user_error(minrnn("train", TINY, "--data", small_text, "--out_dir", out, f"--{key}", value),
                      "[model]", *message)
    assert not out.exists()


def _run(small_text, out, *more):
    return minrnn("train", TINY, "--data", small_text, "--out_dir", out, "--steps", 4, "--checkpoint_every", 2,
                  "--eval_every", 2, *more)


def test_a_used_run_folder_needs_resume_or_overwrite(small_text, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1, "train_loss": 9.0}\n')  # a run killed before its first checkpoint
    assert_user_error(_run(small_text, out), "already holds a run", "--overwrite")
    r = _run(small_text, out, "--overwrite")
    assert r.returncode == 0, r.stderr
    assert [m["step"] for m in read_metrics(out)] == [1, 2, 3, 4]
    assert_user_error(_run(small_text, out, "--resume", "--overwrite"), "exclude each other")


def test_a_resume_keeps_the_runs_settings(small_text, tmp_path):
    out = tmp_path / "run"
    assert _run(small_text, out).returncode == 0
    assert_user_error(_run(small_text, out, "--resume", "--lr", "0.5", "--seed", 9),
                      "--resume: lr, seed differ from the run's config.toml")
    # steps and the cadences may change; the run goes on from its checkpoint, the log truncated there
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "train_loss": 9.0}\n')
    r = _run(small_text, out, "--resume", "--steps", 6)
    assert r.returncode == 0, r.stderr
    assert [m["step"] for m in read_metrics(out)] == [1, 2, 3, 4, 5, 6]
    assert TrainConfig.from_file(out / "config.toml").steps == 6
    # the run folder itself stands for its config
    r = minrnn("train", out, "--resume", "--steps", 8)
    assert r.returncode == 0, r.stderr
    assert [m["step"] for m in read_metrics(out)] == list(range(1, 9))


def test_any_workload_and_model_train_in_the_same_loop(tmp_path):
    """A synthetic task and a baseline model: the same metrics log and checkpoints as a text run."""
    from minrnn.experiments.baselines import build_model
    from minrnn.training import ModelSpec, TaskWorkload, Trainer
    from minrnn.training.checkpoint import list_checkpoints

    work = TaskWorkload("parity_check", batch_size=8, train_lengths=(2, 10), eval_lengths=[12, 16])
    spec = ModelSpec(lambda: build_model("lstm", work.vocab_size, None, width=16), {"model": "lstm"},
                     logits=lambda model, x: model(x))
    cfg = TrainConfig(steps=3, eval_every=3, checkpoint_every=3, out_dir=str(tmp_path), plot=False, progress="never",
                      data="parity_check", warmup_steps=1)
    end = Trainer(cfg, work, spec, log=lambda s: None).train()
    assert end["step"] == 3 and set(end["val"]) == {"loss", "accuracy"}
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3] and "val_accuracy" in rows[-1]
    assert [s for s, _ in list_checkpoints(tmp_path)] == [3]
    # resumable like any run: more steps continue from the checkpoint
    cfg.steps = 4
    again = Trainer(cfg, work, spec, resume=True, log=lambda s: None)
    assert again.step == 3 and again.train()["step"] == 4
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 4
    assert torch.isfinite(torch.tensor(end["train_loss"]))


def test_every_rank_refuses_a_config_that_differs_from_rank_0s():
    from minrnn.training.config import check_same_config

    class TwoRanks:  # what all_gather_object returns on every rank of a 2-process job
        enabled, rank = True, 0

        def __init__(self, configs):
            self.configs = configs

        def gather(self, obj):
            return self.configs

    mine = TrainConfig(lr=1e-3, model={"hidden_size": 8})
    other = {**mine.to_dict(), "lr": 0.5, "model": {"hidden_size": 16}}
    from minrnn.training.config import flat_config as _flat

    same = TwoRanks([_flat(mine.to_dict()), _flat(mine.to_dict())])
    check_same_config(mine, same)
    for rank in (0, 1):
        dist = TwoRanks([_flat(mine.to_dict()), _flat(other)])
        dist.rank = rank
        with pytest.raises(ConfigError, match=r"differ from rank 0's in: lr, model.hidden_size \(this is rank "
                                              + str(rank)):
            check_same_config(mine, dist)


def test_a_start_that_fails_gives_the_lock_back(small_text, tmp_path):
    from minrnn.training.run_folder import RunLock

    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert_user_error(_run(tmp_path / "no_such_corpus.txt", out), "no_such_corpus")
    with RunLock(out):  # taken at once: the failed trainer released it
        pass
    assert sorted(p.name for p in out.iterdir()) == [".lock", "notes.txt"]
    fresh = tmp_path / "fresh"
    assert_user_error(_run(tmp_path / "no_such_corpus.txt", fresh), "no_such_corpus")
    assert not fresh.exists(), "a failed start into a new folder leaves it behind"


def test_metrics_on_a_full_disk_is_a_one_line_error(tmp_path, monkeypatch):
    import errno
    import os

    from minrnn.training.metrics import MetricsLog
    from minrnn.training.run_folder import RunFolderError

    log = MetricsLog(tmp_path, tensorboard=False)
    log.write({"step": 1, "train_loss": 1.0})

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(RunFolderError, match=r"cannot write .*metrics.jsonl: No space left on device$"):
        log.write({"step": 2, "train_loss": 1.0})
