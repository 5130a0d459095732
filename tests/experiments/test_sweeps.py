"""The table over many compare outputs (experiments/sweep_table.py): seeds grouped, means over
losses, the errors it names; end to end on real 1-step `minrnn compare` runs."""

import json
import math

import pytest

from minrnn.cli import main as minrnn

from ..scripts import load_script

sweep_table = load_script("experiments", "sweep_table")
SweepError, group_by_seed, load_results = sweep_table.SweepError, sweep_table.group_by_seed, sweep_table.load_results
main, to_markdown = sweep_table.main, sweep_table.to_markdown


def _fake_run(root, name, *, model="mingru", seed=0, lr=3e-3, optim=None, options=None, loss=None,
              accuracy=None, experiment="wikitext2", preset="cpu", val=4.0, train=3.5):
    """A run folder laid out as compare writes it, with only the fields the table reads."""
    run = root / name / f"{experiment}-{preset}" / "runs" / model
    run.mkdir(parents=True)
    split = {"loss": loss if loss is not None else 1.0}
    if accuracy is not None:
        split["accuracy"] = accuracy
    spec = {"experiment": experiment, "preset": preset, "model": model, "seed": seed, "lr": lr}
    result = {"run": model, "model": model, "task": None, "sweep": {}, "params": 1000, "steps": 10, "lr": lr,
              "final_split": split, "options": options or {}, "optim": optim or {},
              "history": [{"step": 10, "train_loss": train, "val_loss": val}], "spec": spec}
    (run / "result.json").write_text(json.dumps(result))
    (run / "spec.json").write_text(json.dumps(spec))
    return root / name


def test_seeds_are_grouped_and_averaged_over_losses(tmp_path):
    folders = [_fake_run(tmp_path, "a", seed=0, loss=3.0, optim={"weight_decay": 1.0}, val=4.0, train=3.0),
               _fake_run(tmp_path, "b", seed=2, loss=4.0, optim={"weight_decay": 1.0}, val=4.0, train=3.5),
               _fake_run(tmp_path, "c", seed=0, loss=3.2, optim={"weight_decay": 0.3}),
               _fake_run(tmp_path, "d", seed=0, loss=3.9, lr=1e-3, model="llama")]
    rows = group_by_seed(load_results(folders))
    assert [(r["model"], r["optim"], r["seeds"]) for r in rows] == [
        ("llama", "preset", [0]), ("mingru", "weight_decay=0.3", [0]), ("mingru", "weight_decay=1", [0, 2])]
    wd1 = rows[2]
    assert wd1["mean"] == pytest.approx(3.5)
    # perplexity of the mean loss, not the mean of perplexities (which would be larger)
    assert wd1["mean_ppl"] == pytest.approx(math.exp(3.5))
    assert wd1["per_seed_ppl"] == pytest.approx([math.exp(3.0), math.exp(4.0)])
    assert wd1["gap"] == pytest.approx(0.75)
    md = to_markdown(rows)
    assert "| mingru | preset | 0.003 | weight_decay=1 | 10 | 1,000 | 0, 2 | 20.1 / 54.6 | 3.5000 (33.1) | 0.75 |" in md
    assert "sweep" not in md  # no run has a sweep value


def test_accuracy_runs_are_averaged_highest_first(tmp_path):
    folders = [_fake_run(tmp_path, f"s{s}", seed=s, accuracy=a, experiment="selective_copying")
               for s, a in [(0, 0.99), (1, 0.93)]]
    folders.append(_fake_run(tmp_path, "other", seed=0, accuracy=0.97, lr=1e-2, experiment="selective_copying"))
    rows = group_by_seed(load_results(folders))
    assert [r["lr"] for r in rows] == [1e-2, 3e-3]
    assert rows[1]["mean"] == pytest.approx(0.96) and rows[1]["mean_ppl"] is None
    assert "99.00% / 93.00%" in to_markdown(rows)


def test_errors_name_what_is_wrong(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SweepError, match="empty holds no result.json"):
        load_results([empty])
    with pytest.raises(SweepError, match="is not a directory"):
        load_results([tmp_path / "missing"])
    lm = _fake_run(tmp_path, "lm", loss=3.0)
    sc = _fake_run(tmp_path, "sc", accuracy=0.5, experiment="selective_copying")
    with pytest.raises(SweepError, match="cannot share one table"):
        load_results([lm, sc])
    twin = _fake_run(tmp_path, "twin", loss=3.1)
    with pytest.raises(SweepError, match="same seed"):
        group_by_seed(load_results([lm, twin]))
    assert main([str(lm), "--model", "llama"]) == 2
    assert "--model: no run of llama" in capsys.readouterr().err


def test_the_gap_is_read_from_the_metrics_log(tmp_path):
    run = _fake_run(tmp_path, "a", val=9.0, train=1.0)
    folder = next(run.rglob("result.json")).parent
    (folder / "metrics.jsonl").write_text(json.dumps({"step": 5, "train_loss": 3.0, "val_loss": 3.5}) + "\n"
                                          + json.dumps({"step": 10, "train_loss": 2.0}) + "\n")
    (row,) = group_by_seed(load_results([run]))
    assert row["gap"] == pytest.approx(0.5)  # the last line with a validation loss, not result.json's history


def test_end_to_end_on_compare_outputs(tmp_path):
    outs = []
    for seed in (0, 1):
        out = tmp_path / f"seed{seed}"
        assert minrnn(["compare", "selective_copying", "--preset", "cpu", "--models", "lstm", "--steps", "1",
                       "--eval-every", "1", "--seed", str(seed), "--no-sweep", "--no-progress", "--threads", "1",
                       "--optim", "weight_decay=0.5", "--out", str(out)]) == 0
        outs.append(out)
    table = tmp_path / "table.md"
    assert main([str(o) for o in outs] + ["--out", str(table)]) == 0
    rows = json.loads(table.with_suffix(".json").read_text())
    assert len(rows) == 1 and rows[0]["seeds"] == [0, 1] and rows[0]["optim"] == "weight_decay=0.5"
    splits = [json.loads(next(o.rglob("result.json")).read_text())["final_split"] for o in outs]
    assert rows[0]["metric"] == "test accuracy"
    assert rows[0]["mean"] == pytest.approx(sum(s["accuracy"] for s in splits) / 2)
    assert splits[0]["loss"] != splits[1]["loss"]  # the seeds really differ
    assert "| lstm |" in table.read_text()
