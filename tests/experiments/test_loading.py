"""`minrnn eval --run` on the runs of `minrnn compare --keep-weights` (minrnn.experiments.loading):
the rebuilt model scores the run's validation windows as training did, recurrent models read
the split statefully, and runs that cannot be rebuilt are one-line errors."""

import json
import shutil

import pytest

pytest.importorskip("transformers")

from minrnn.experiments.compare import CompareConfig, compare  # noqa: E402
from minrnn.experiments.loading import load_compare_run  # noqa: E402

from ..corpus import shakespeare  # noqa: E402
from ..training.conftest import assert_one_line_error, minrnn  # noqa: E402

MODELS = ("mingru", "lstm", "llama")


@pytest.fixture(scope="module")
def compare_runs(tmp_path_factory):
    """One step of minGRU, nn.LSTM and Llama on 8,000 bytes of Shakespeare, weights kept."""
    root = tmp_path_factory.mktemp("compare")
    data = root / "corpus.txt"
    data.write_text(shakespeare(8_000))
    md = compare(CompareConfig("text", "cpu", models=list(MODELS), out=str(root / "out"), data=str(data),
                               tokenizer="byte", steps=1, eval_every=1, isolate=False, progress=False,
                               keep_weights=True), log=lambda s: None)
    return md.parent / "runs"


def test_eval_scores_a_compare_run_as_its_training_validated_it(compare_runs):
    for model in MODELS:
        run = compare_runs / model
        result = json.loads((run / "result.json").read_text())
        r = minrnn("eval", "--run", run)
        assert r.returncode == 0, r.stderr
        out = json.loads(r.stdout)
        assert out["split"] == "valid" and out["checkpoint"] == str(run / "weights.pt")
        # the last evaluation of training read the final weights on the same windows
        assert out["loss"] == pytest.approx(result["history"][-1]["val_loss"], rel=1e-5)
        assert out["bits_per_byte"] > 0
    loaded = load_compare_run(compare_runs / "llama")
    assert loaded.config.seq_len == 64 and loaded.config.tokenizer == "byte" and not loaded.model.training


def test_stateful_eval_of_compare_runs_carries_the_state(compare_runs):
    """Chunks of 64 with the state carried give the loss of one chunk holding the whole split."""
    for model in ("mingru", "lstm"):
        run = compare_runs / model
        chunked = json.loads(minrnn("eval", "--run", run, "--stateful", "--context", 64).stdout)
        whole = json.loads(minrnn("eval", "--run", run, "--stateful", "--context", 10 ** 6).stdout)
        assert chunked["stateful"] and chunked["tokens"] == whole["tokens"] > 500
        assert chunked["loss"] == pytest.approx(whole["loss"], rel=1e-5)
    assert_one_line_error(minrnn("eval", "--run", compare_runs / "llama", "--stateful"),
                          "LlamaForCausalLM carries no recurrent state")


def test_compare_runs_that_cannot_be_rebuilt_are_one_line_errors(compare_runs, tmp_path):
    run = tmp_path / "mingru"
    shutil.copytree(compare_runs / "mingru", run)
    assert_one_line_error(minrnn("eval", "--run", run, "--checkpoint", "best"), "--checkpoint", "weights.pt")
    spec = json.loads((run / "spec.json").read_text())
    (run / "spec.json").write_text(json.dumps({**spec, "preset_digest": "0" * 16}))
    assert_one_line_error(minrnn("eval", "--run", run), "preset text/cpu has changed")
    (run / "spec.json").write_text(json.dumps(spec))
    (run / "weights.pt").unlink()
    assert_one_line_error(minrnn("eval", "--run", run), "weights.pt not found", "--keep-weights")
    (run / "result.json").unlink()
    assert_one_line_error(minrnn("eval", "--run", run), "has not finished training")


def test_beyond_context_benchmark_reads_windowed_and_stateful_figures(compare_runs, tmp_path, capsys):
    """benchmarks/beyond_context.py: the windowed loss at the windows' length is the mean over every
    position, a shorter context the mean over the first positions; stateful for the recurrent
    models only; a rerun reads its kept figures; one plot of every run."""
    from ..scripts import load_script

    bench = load_script("benchmarks", "beyond_context")
    out, plot = tmp_path / "out", tmp_path / "positions.png"
    args = [str(compare_runs / m) for m in MODELS[:2]] + [f"Llama x=1={compare_runs / 'llama'}"]
    assert bench.main(args + ["--length", "64", "--contexts", "16,64", "--out", str(out), "--plot", str(plot)]) == 0
    figures = {p.stem: json.loads(p.read_text()) for p in out.glob("*.json")}
    assert set(figures) == {"mingru", "lstm", "Llama_x=1"} and plot.read_bytes()[:4] == b"\x89PNG"
    for label, r in figures.items():
        assert r["windowed"]["64"] == pytest.approx(r["positions"]["loss"], rel=1e-9)
        first16 = [b for b in r["positions"]["buckets"] if b["to"] <= 16]
        assert r["windowed"]["16"] == pytest.approx(sum(b["loss"] * (b["to"] - b["from"]) for b in first16) / 16)
        assert ("stateful" in r) == (label != "Llama_x=1")
    printed = capsys.readouterr().out
    assert "| Llama x=1 |" in printed and "| model | 32-63 |" in printed  # the buckets past half the context
    before = (out / "lstm.json").stat().st_mtime_ns
    assert bench.main(args + ["--length", "64", "--contexts", "16,64", "--out", str(out)]) == 0
    assert (out / "lstm.json").stat().st_mtime_ns == before
    with pytest.raises(ValueError, match="context 24 is not a bucket edge"):
        bench.windowed(figures["lstm"]["positions"]["buckets"], 24)
