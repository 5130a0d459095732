"""torchrun: 2 processes (gloo, CPU) train exactly as 1 process with the same global batch."""

import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from minrnn.training import TrainConfig, Trainer
from minrnn.training import checkpoint as ckpt
from minrnn.training.metrics import read_metrics

from .conftest import TINY, cli_env

SETTINGS = {"steps": 12, "batch_size": 8, "grad_accum": 2, "eval_every": 6, "checkpoint_every": 6,
            "model.dropout": 0.0}


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="this torch build has no gloo backend")
def test_two_processes_equal_one(small_text, tmp_path):
    settings = {**SETTINGS, "data": str(small_text)}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        Trainer(TrainConfig.from_file(TINY, {**settings, "out_dir": str(tmp_path / "one")}), log=lambda s: None).train()
    finally:
        torch.set_num_threads(threads)

    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            "-m", "minrnn", "train", str(TINY), "--out_dir", str(tmp_path / "two")]
    for k, v in settings.items():
        args += [f"--{k}", str(v)]
    r = subprocess.run(args, env=cli_env(), capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    assert r.stdout.count("training ") == 1, "only rank 0 reports"

    one, two = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert [x["step"] for x in two] == list(range(1, 13)), "rank 0 alone writes the log, once per step"
    for a, b in zip(one, two):
        assert abs(a["train_loss"] - b["train_loss"]) <= 1e-5, (a, b)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5), (a, b)
        if "val_loss" in a:
            assert abs(a["val_loss"] - b["val_loss"]) <= 1e-5, (a, b)
    w1 = load_file(str(ckpt.list_checkpoints(tmp_path / "one")[-1][1] / ckpt.MODEL_FILE))
    w2 = load_file(str(ckpt.list_checkpoints(tmp_path / "two")[-1][1] / ckpt.MODEL_FILE))
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=0, atol=1e-5, msg=k)
