"""`minrnn export` on a trained run (the session's run of tests/training/conftest.py): the two
ONNX graphs and the tokenizer, and onnxruntime's logits equal the run's model's."""

import numpy as np
import pytest
import torch

pytest.importorskip("onnxscript")
ort = pytest.importorskip("onnxruntime")

from ..test_export import _onnx_decode, _torch_decode  # noqa: E402
from .conftest import assert_one_line_error, minrnn  # noqa: E402


def test_cli_export_of_a_trained_run(trained_run, tmp_path):
    """`minrnn export` on a run: the two graphs and the tokenizer; the step graph's logits are the
    run's model's (greedy from the prefill)."""
    from minrnn.training.loop import load_run

    run_dir, _ = trained_run
    r = minrnn("export", "--run", run_dir, "--format", "onnx", "--out", tmp_path / "onnx", "--prompt-length", 4)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in (tmp_path / "onnx").iterdir()) == ["prefill.onnx", "step.onnx", "tokenizer.json"]
    _, tokenizer, model, _ = load_run(run_dir)
    prompt = torch.tensor([tokenizer.encode("KING")])
    from tokenizers import Tokenizer  # the folder's tokenizer, read without minrnn

    assert Tokenizer.from_file(str(tmp_path / "onnx" / "tokenizer.json")).encode("KING").ids == prompt[0].tolist()
    sessions = [ort.InferenceSession(str(tmp_path / "onnx" / f"{k}.onnx")) for k in ("prefill", "step")]
    want_tokens, want_logits = _torch_decode(model, prompt, 20)
    got_tokens, got_logits = _onnx_decode(sessions, prompt.numpy(), 20)
    np.testing.assert_array_equal(got_tokens, want_tokens)
    np.testing.assert_allclose(got_logits, want_logits, atol=1e-4, rtol=1e-4)


def test_cli_export_of_a_folder_that_is_no_run(tmp_path):
    r = minrnn("export", "--run", tmp_path, "--out", tmp_path / "onnx")
    assert_one_line_error(r, "config.toml")


@pytest.mark.parametrize("dtype", ["bf16", "int8"])
def test_generate_with_low_precision_weights(trained_run, dtype):
    run_dir, _ = trained_run
    r = minrnn("generate", "--run", run_dir, "--prompt", "KING", "--tokens", 20, "--greedy", "--dtype", dtype)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("KING") and len(r.stdout.rstrip("\n")) > len("KING")
