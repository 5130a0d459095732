"""The run folder through the real command (`python -m minrnn` in a subprocess): a finished run
is a transformers model, one trainer per folder, eval refuses damaged or mismatched runs with
one line, and a kill -9 leaves a folder that a fresh start or a resume turns into one clean run."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from minrnn.training import checkpoint as ckpt
from minrnn.training.metrics import read_metrics
from minrnn.training.run_folder import RunLock

from .conftest import TINY, assert_one_line_error, cli_env


def minrnn_process(*args, timeout=180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "minrnn", *map(str, args)], env=cli_env(), capture_output=True,
                          text=True, timeout=timeout)


def train_args(data, out, *more):
    return ("train", TINY, "--data", data, "--out_dir", out, "--progress", "never", *more)


@pytest.fixture(scope="module")
def run(small_text, tmp_path_factory) -> Path:
    """A finished 20-step run, checkpoints every 5 steps, validation at 10 and 20."""
    out = tmp_path_factory.mktemp("cli_run") / "run"
    r = minrnn_process(*train_args(small_text, out, "--steps", 20, "--checkpoint_every", 5, "--eval_every", 10,
                                   "--keep_last", 2))
    assert r.returncode == 0, r.stderr
    return out


@pytest.fixture
def run_copy(run, tmp_path) -> Path:
    out = tmp_path / "copy"
    shutil.copytree(run, out, symlinks=True)
    return out


# --- a finished run is a transformers model -------------------------------------------------

def test_best_and_latest_are_folders_transformers_loads(run):
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

    import minrnn.models  # noqa: F401  (registers the model type with the Auto classes)
    from minrnn.training import load_run

    assert (run / "latest").is_symlink() and (run / "best").is_symlink()
    assert (run / "latest").resolve() == ckpt.list_checkpoints(run)[-1][1].resolve()
    best_name = (run / "checkpoints" / "best").read_text().strip()
    assert (run / "best").resolve().name == best_name
    assert not (run / ".lock").read_text().strip(), "the lock still names a holder after the run ended"

    _, tokenizer, model, _ = load_run(run, "best")
    hf_model = AutoModelForCausalLM.from_pretrained(run / "best").eval()
    hf_tokenizer = AutoTokenizer.from_pretrained(run / "best")
    text = "ROMEO:\nWhat light"
    assert hf_tokenizer(text)["input_ids"] == tokenizer.encode(text)
    ids = torch.tensor([tokenizer.encode(text)])
    with torch.no_grad():
        assert torch.equal(hf_model(ids).logits, model(ids).logits)

    pipe = pipeline("text-generation", model=str(run / "best"))
    out = pipe("ROMEO:", max_new_tokens=12, do_sample=False)[0]["generated_text"]
    assert out.startswith("ROMEO:") and len(out) == len("ROMEO:") + 12, out
    assert set(out) <= set(tokenizer.chars)


def test_eval_and_generate_read_a_run_while_a_trainer_holds_it(run):
    with RunLock(run):
        r = minrnn_process("eval", "--run", run)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["checkpoint"] == str(ckpt.list_checkpoints(run)[-1][1])
        g = minrnn_process("generate", "--run", run, "--tokens", 8, "--prompt", "KING", "--greedy")
        assert g.returncode == 0 and g.stdout.startswith("KING") and len(g.stdout.rstrip("\n")) >= 4 + 8, g.stderr


# --- one trainer per folder -----------------------------------------------------------------

def test_a_second_trainer_on_a_locked_folder_exits_2_naming_the_holder(small_text, tmp_path):
    out = tmp_path / "busy"
    with RunLock(out):
        r = minrnn_process(*train_args(small_text, out, "--steps", 2))
        assert_one_line_error(r, str(out), f"pid {os.getpid()}", "in use")
        assert sorted(p.name for p in out.iterdir()) == [".lock"], "the refused trainer wrote into the folder"
    r = minrnn_process(*train_args(small_text, out, "--steps", 2))  # free again: it trains
    assert r.returncode == 0, r.stderr
    assert [row["step"] for row in read_metrics(out)] == [1, 2]


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="this torch build has no gloo backend")
def test_under_torchrun_every_rank_stops_with_rank_0s_lock_error(small_text, tmp_path):
    """Rank 0 alone takes the lock; its failure reaches rank 1 too (else rank 1 waits for ever)."""
    out = tmp_path / "busy"
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            "-m", "minrnn", *train_args(small_text, out, "--steps", 2)]
    with RunLock(out):
        r = subprocess.run(list(map(str, args)), env=cli_env(), capture_output=True, text=True, timeout=180)
    assert r.returncode != 0
    # the two ranks write to one stderr at once: their lines may run together, so split on the prefix
    errors = [e.split("\n")[0] for e in (r.stdout + r.stderr).split("minrnn train: error:")[1:]]
    assert len(errors) == 2 and all(f"pid {os.getpid()}" in e and "in use" in e for e in errors), \
        r.stderr[-3000:]
    assert "Traceback" not in "".join(errors)
    assert sorted(p.name for p in out.iterdir()) == [".lock"]


# --- eval refuses what it cannot trust ------------------------------------------------------

def test_a_flipped_byte_in_the_newest_weights_makes_eval_exit_2_naming_the_file(run_copy):
    newest = ckpt.list_checkpoints(run_copy)[-1][1] / ckpt.MODEL_FILE
    data = bytearray(newest.read_bytes())
    data[-10] ^= 0xFF
    newest.write_bytes(bytes(data))
    assert_one_line_error(minrnn_process("eval", "--run", run_copy), str(newest), "refusing")


@pytest.mark.parametrize("key, edit", [("hidden_act", '"relu"'), ("rms_norm_eps", "0.001")])
def test_an_edited_config_toml_makes_eval_exit_2_naming_the_key(run_copy, key, edit):
    path = run_copy / "config.toml"
    text, n = re.subn(rf"(?m)^{key} = .*$", f"{key} = {edit}", path.read_text())
    if n == 0:  # the setting was left at its default: write it into the [model] table
        text, n = text.replace("[model]\n", f"[model]\n{key} = {edit}\n"), 1
    assert n == 1
    path.write_text(text)
    assert_one_line_error(minrnn_process("eval", "--run", run_copy), key, "other model settings")


def test_a_run_of_the_earlier_format_still_evaluates_and_generates(run_copy):
    """A run written before checkpoints held config.json and the tokenizer (and before the
    tokenizer was saved in transformers' format) still works with eval and generate."""
    tokenizer = json.loads((run_copy / "tokenizer.json").read_text())
    chars = sorted(tokenizer["model"]["vocab"], key=tokenizer["model"]["vocab"].get)
    (run_copy / "tokenizer.json").write_text(json.dumps({"kind": "char", "chars": chars}, ensure_ascii=False))
    (run_copy / "tokenizer_config.json").unlink()
    for link in ("latest", "best"):
        (run_copy / link).unlink()
    for _, path in ckpt.list_checkpoints(run_copy):
        manifest = json.loads((path / ckpt.MANIFEST).read_text())
        for name in list(manifest["files"]):
            if name not in (ckpt.MODEL_FILE, ckpt.STATE_FILE):
                (path / name).unlink()
                del manifest["files"][name]
        (path / ckpt.MANIFEST).write_text(json.dumps(manifest))
    r = minrnn_process("eval", "--run", run_copy)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["loss"] < 3.5
    g = minrnn_process("generate", "--run", run_copy, "--tokens", 8, "--prompt", "KING", "--greedy")
    assert g.returncode == 0 and g.stdout.startswith("KING"), g.stderr


# --- kill -9, then a fresh start or a resume ------------------------------------------------

def kill_when(args, ready, what: str, timeout: float = 120) -> None:
    """Start `minrnn ARGS`, SIGKILL it as soon as ``ready()`` holds."""
    proc = subprocess.Popen([sys.executable, "-m", "minrnn", *map(str, args)], env=cli_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + timeout
    try:
        while not ready():
            assert proc.poll() is None, f"the run ended before it was killed: {proc.stderr.read().decode()}"
            assert time.time() < deadline, f"not {what} within {timeout} s"
            time.sleep(0.005)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()


def test_kill_before_the_first_checkpoint_then_a_fresh_start(small_text, tmp_path):
    out = tmp_path / "killed"
    args = train_args(small_text, out, "--steps", 100_000, "--checkpoint_every", 50_000, "--eval_every", 50_000)
    kill_when(args, lambda: len(read_metrics(out)) >= 3, "3 steps")
    assert not ckpt.list_checkpoints(out) and len(read_metrics(out)) >= 3

    assert_one_line_error(minrnn_process(*train_args(small_text, out, "--steps", 6)),
                          "already holds a run", "metrics.jsonl", "--overwrite")
    assert_one_line_error(minrnn_process(*train_args(small_text, out, "--steps", 6, "--resume")), "no checkpoint")
    r = minrnn_process(*train_args(small_text, out, "--steps", 6, "--checkpoint_every", 3, "--overwrite"))
    assert r.returncode == 0, r.stderr
    assert [row["step"] for row in read_metrics(out)] == [1, 2, 3, 4, 5, 6]
    assert [s for s, _ in ckpt.list_checkpoints(out)] == [3, 6]


def test_resume_after_a_kill_past_a_checkpoint_writes_each_step_once(small_text, tmp_path):
    out = tmp_path / "killed"
    args = train_args(small_text, out, "--steps", 100_000, "--checkpoint_every", 10, "--eval_every", 50_000)

    def past_a_checkpoint():
        ckpts = ckpt.list_checkpoints(out)
        return bool(ckpts) and max((r["step"] for r in read_metrics(out)), default=0) >= ckpts[-1][0] + 3

    kill_when(args, past_a_checkpoint, "3 steps past a checkpoint")
    resume_from = ckpt.list_checkpoints(out)[-1][0]
    before = (out / "metrics.jsonl").read_text().splitlines()
    assert max(json.loads(line)["step"] for line in before if line.startswith("{") and line.endswith("}")) \
        > resume_from, "no rows after the checkpoint: nothing to test"

    end = resume_from + 4
    r = minrnn_process(*train_args(small_text, out, "--steps", end, "--checkpoint_every", 10, "--eval_every", 50_000,
                                   "--resume"))
    assert r.returncode == 0, r.stderr
    after = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in after] == list(range(1, end + 1))
    assert after[:resume_from] == before[:resume_from], "rows up to the checkpoint changed"
