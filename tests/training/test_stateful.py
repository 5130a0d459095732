"""Stateful training (truncated backpropagation through time): contiguous streams per batch row,
the state carried from each window into the next and saved with each checkpoint, so that a resumed
run (in any number of processes) equals an uninterrupted one bit for bit."""

import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from minrnn.data.text import DataError, stream_offsets
from minrnn.training import TrainConfig, Trainer
from minrnn.training import checkpoint as ckpt
from minrnn.training.config import ConfigError
from minrnn.training.metrics import read_metrics

from .conftest import TINY, cli_env

SETTINGS = {"steps": 8, "batch_size": 4, "seq_len": 16, "eval_every": 4, "checkpoint_every": 4, "keep_last": 3,
            "stateful": True, "model.dropout": 0.0, "model.hidden_size": 16}


def config(small_text, out_dir, **more) -> TrainConfig:
    return TrainConfig.from_file(TINY, {**SETTINGS, "data": str(small_text), "out_dir": str(out_dir), **more})


def train(cfg: TrainConfig, resume: bool = False) -> Trainer:
    trainer = Trainer(cfg, resume=resume, log=lambda s: None)
    try:
        trainer.train()
    finally:
        trainer.close()
    return trainer


def weights(run_dir, step: int | None = None) -> dict:
    found = dict(ckpt.list_checkpoints(run_dir))
    return load_file(str(found[max(found) if step is None else step] / ckpt.MODEL_FILE))


def test_stream_offsets_walk_each_part_and_start_over():
    # 4 rows of 100 tokens: parts of 25, windows of 8 (+1 target): 3 per pass
    got = [stream_offsets(100, 8, 4, k) for k in range(7)]
    assert got[0][0].tolist() == [0, 25, 50, 75] and got[0][1]
    assert got[1][0].tolist() == [8, 33, 58, 83] and not got[1][1]
    assert got[2][0].tolist() == [16, 41, 66, 91] and not got[2][1]
    assert got[3][0].tolist() == [0, 25, 50, 75] and got[3][1]  # a new pass: the state is dropped
    assert max(o.max().item() for o, _ in got) + 8 + 1 <= 100  # every window with its target fits
    with pytest.raises(DataError, match="lower batch_size or seq_len"):
        stream_offsets(100, 30, 4, 0)


def test_batches_continue_each_row_and_micro_steps_are_consecutive(small_text, tmp_path):
    trainer = Trainer(config(small_text, tmp_path / "run", grad_accum=2), log=lambda s: None)
    try:
        work = trainer.workload
        x0, y0 = work.batch(0, 0)
        x1, _ = work.batch(0, 1)
        x2, _ = work.batch(1, 0)
        # the next window of a row starts where the last one's targets ended
        assert torch.equal(x1[:, 0], y0[:, -1]) and torch.equal(x1[:, 1:], work.batch(0, 1)[1][:, :-1])
        assert torch.equal(x2[:, 0], work.batch(0, 1)[1][:, -1])
        assert work.stream_restart(0, 0) and not work.stream_restart(0, 1)
        assert work.signature()["stateful"] is True
    finally:
        trainer.close()


def test_each_step_starts_from_the_state_the_previous_window_left(small_text, tmp_path):
    from minrnn.training.loop import lm_stateful_logits

    run = tmp_path / "run"
    train(config(small_text, run, steps=2, checkpoint_every=1))
    first = ckpt.load_checkpoint(ckpt.list_checkpoints(run)[0][1])
    trainer = Trainer(config(small_text, tmp_path / "probe", steps=2), log=lambda s: None)  # the initial weights
    try:
        model, work = trainer.model.eval(), trainer.workload
        x, _ = work.batch(0, 0)
        with torch.no_grad():
            _, carried = lm_stateful_logits(model, x, None)
        saved = first[1]["carry"]  # what step 1 saved: the initial model's state after window 0
        assert saved.keys() == carried.keys()
        for k in saved:
            torch.testing.assert_close(saved[k], carried[k], rtol=1e-5, atol=1e-6, msg=k)
        # step 2's loss: the step-1 weights on window 1, starting from that state (not from zeros)
        model.load_state_dict(first[0])
        x, y = work.batch(1, 0)
        with torch.no_grad():
            logits, _ = lm_stateful_logits(model, x, saved)
            fresh = work.loss(model(input_ids=x).logits, y).item()
        logged = read_metrics(run)[1]["train_loss"]
        assert logged == pytest.approx(work.loss(logits, y).item(), abs=1e-5)
        assert abs(logged - fresh) > 1e-4, "the carried state made no difference: not carried"
    finally:
        trainer.close()


def test_resumed_stateful_run_is_bit_identical(small_text, tmp_path):
    train(config(small_text, tmp_path / "whole"))
    train(config(small_text, tmp_path / "cut", steps=4))
    train(config(small_text, tmp_path / "cut", steps=8), resume=True)
    ref, got = weights(tmp_path / "whole"), weights(tmp_path / "cut")
    assert all(torch.equal(ref[k], got[k]) for k in ref)
    assert [r["train_loss"] for r in read_metrics(tmp_path / "whole")] == \
        [r["train_loss"] for r in read_metrics(tmp_path / "cut")]


def test_refusals(small_text, tmp_path):
    with pytest.raises(ConfigError, match="attention blocks"):
        Trainer(config(small_text, tmp_path / "a", **{"model.attention_layers": [1]}), log=lambda s: None)
    with pytest.raises(ConfigError, match="exclude each other"):
        config(small_text, tmp_path / "b", pack_documents=True)
    with pytest.raises(DataError, match="lower batch_size or seq_len"):
        Trainer(config(small_text, tmp_path / "c", batch_size=64, seq_len=2048), log=lambda s: None)
    assert not (tmp_path / "a").exists() and not (tmp_path / "c").exists()


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="this torch build has no gloo backend")
def test_two_processes_carry_their_rows_and_resume_in_one(small_text, tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(config(small_text, tmp_path / "one"))
    finally:
        torch.set_num_threads(threads)
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            "-m", "minrnn", "train", str(TINY), "--out_dir", str(tmp_path / "two")]
    for k, v in {**SETTINGS, "data": str(small_text)}.items():
        args += [f"--{k}", str(v)]
    r = subprocess.run(args, env=cli_env(), capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    one, two = weights(tmp_path / "one"), weights(tmp_path / "two")
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=0, atol=1e-5, msg=k)
    # the 2-process run's checkpoint at step 4 holds every row's state: one process continues it
    shutil.copytree(tmp_path / "two", tmp_path / "cut")
    shutil.rmtree(ckpt.list_checkpoints(tmp_path / "cut")[-1][1])
    train(config(small_text, tmp_path / "cut"), resume=True)
    got = weights(tmp_path / "cut")
    for k in one:
        torch.testing.assert_close(got[k], one[k], rtol=0, atol=1e-5, msg=k)


def test_compare_stateful_trains_models_that_carry_a_state_and_refuses_others(tmp_path):
    from minrnn.experiments.compare import CompareConfig, CompareError, compare, plan_runs

    from ..corpus import shakespeare

    data = tmp_path / "corpus.txt"
    data.write_text(shakespeare(20_000))
    request = dict(data=str(data), tokenizer="byte", steps=2, eval_every=2, stateful=True, isolate=False,
                   progress=False, out=str(tmp_path / "out"))
    md = compare(CompareConfig("text", models=["mingru", "lstm"], **request), log=lambda s: None)
    import json

    results = json.loads((md.parent / "results.json").read_text())
    assert [r["model"] for r in results] == ["mingru", "lstm"]
    assert all("stateful streams" in r["data"] and r["spec"]["stateful"] for r in results)
    with pytest.raises(CompareError, match="llama carries no fixed-size state"):
        plan_runs(CompareConfig("text", models=["mingru", "llama"], **request))
    with pytest.raises(CompareError, match="--stateful is for text experiments"):
        plan_runs(CompareConfig("selective_copying", stateful=True))


def test_compile_trains_like_eager_and_keeps_the_weight_names(small_text, tmp_path, monkeypatch):
    # compile and stateful together: the carried cache passes through the compiled forward. The
    # aot_eager backend captures the same graphs as inductor at a fraction of the compile time
    # (inductor's own numbers: tests/test_compile.py)
    compiled_with = []
    original = torch.nn.Module.compile

    def compile_aot_eager(module, *args, **kwargs):
        compiled_with.append(type(module).__name__)
        return original(module, *args, **{**kwargs, "backend": "aot_eager"})

    monkeypatch.setattr(torch.nn.Module, "compile", compile_aot_eager)
    base = dict(steps=2, eval_every=2, checkpoint_every=2)
    train(config(small_text, tmp_path / "eager", **base))
    train(config(small_text, tmp_path / "compiled", compile=True, **base))
    assert compiled_with == ["MinRNNForCausalLM"]
    eager, compiled = read_metrics(tmp_path / "eager"), read_metrics(tmp_path / "compiled")
    for a, b in zip(eager, compiled):
        assert b["train_loss"] == pytest.approx(a["train_loss"], abs=1e-5)
    ref, got = weights(tmp_path / "eager"), weights(tmp_path / "compiled")
    assert ref.keys() == got.keys()
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-4, atol=1e-5, msg=k)
