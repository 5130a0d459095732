"""benchmarks/quantized_loss.py on a short run trained here: the float32 row is the run's own
windowed evaluation, the bf16 and int8 rows score the same windows with converted weights."""

import json

import pytest

pytest.importorskip("transformers")

from .corpus import SHAKESPEARE_SAMPLE  # noqa: E402
from .scripts import ROOT, load_script  # noqa: E402


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from minrnn.cli import main

    out = tmp_path_factory.mktemp("run") / "tiny"
    code = main(["train", str(ROOT / "src/minrnn/training/presets/tiny_test.toml"), "--data", str(SHAKESPEARE_SAMPLE),
                 "--out_dir", str(out), "--steps", "20", "--eval_every", "20", "--checkpoint_every", "20",
                 "--threads", "1", "--progress", "never"])
    assert code == 0
    return out


def test_rows_for_each_dtype_from_the_runs_own_evaluation(run_dir, tmp_path, capsys):
    import torch

    from minrnn.training.loop import evaluate, load_run

    bench = load_script("benchmarks", "quantized_loss")
    out = tmp_path / "q.json"
    assert bench.main(["--run", str(run_dir), "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    rows = res["results"]
    assert list(rows) == ["float32", "bf16", "int8"]
    config, tokenizer, model, _ = load_run(run_dir)
    tokens = bench.split_tokens(config, tokenizer, "valid")
    assert res["windows"] == config.eval_windows == 16
    assert rows["float32"]["loss"] == pytest.approx(evaluate(model, tokens, config, "cpu"), rel=1e-6)
    assert rows["float32"]["change"] == 0
    for dtype in ("bf16", "int8"):
        # rounded weights move the loss, a little
        assert rows[dtype]["loss"] != rows["float32"]["loss"]
        assert 0 < abs(rows[dtype]["change"]) < 0.05
        assert rows[dtype]["change"] == pytest.approx(rows[dtype]["loss"] / rows["float32"]["loss"] - 1)
    printed = capsys.readouterr().out
    assert "| int8 |" in printed and f"{rows['int8']['loss']:.4f}" in printed
    # the run's model is left float32 by the conversions
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_every_window_of_the_split(run_dir, tmp_path):
    bench = load_script("benchmarks", "quantized_loss")
    out = tmp_path / "q.json"
    assert bench.main(["--run", str(run_dir), "--windows", "0", "--out", str(out)]) == 0
    from minrnn.training.loop import load_run

    config, tokenizer, _, _ = load_run(run_dir)
    n = len(bench.split_tokens(config, tokenizer, "valid"))
    assert json.loads(out.read_text())["windows"] == n // config.seq_len


def test_bad_arguments_are_refused(run_dir, capsys):
    bench = load_script("benchmarks", "quantized_loss")
    with pytest.raises(SystemExit):
        bench.main(["--run", str(run_dir), "--windows", "-1"])
    assert "--windows must be >= 0" in capsys.readouterr().err
    with pytest.raises(ValueError, match="dtypes must include 'float32'"):
        bench.dtype_losses(None, None, None, ["int8"])
