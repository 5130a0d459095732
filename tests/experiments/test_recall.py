"""The copy breakdown of a language model's loss (minrnn.experiments.recall): the classes against
plain loops, and end to end on a 2-step compare run that kept its weights."""

import json

import pytest
import torch

import minrnn.experiments.runner as C
from minrnn.experiments.compare import CompareError
from minrnn.experiments.compare import CompareConfig
from minrnn.experiments.compare import compare as _compare


def compare(experiment, preset, models, out, log=print, **kwargs):
    return _compare(CompareConfig(experiment, preset, models=models, out=str(out), **kwargs), log=log)
from minrnn.experiments.recall import (CLASSES, copy_classes, copy_classes_reference, copying_answers,
                                      copying_to_markdown, main, recall_breakdown, to_markdown)


def test_classes_by_hand():
    # window 5 7 5 7 9 and the token after it, 5
    x = torch.tensor([[5, 7, 5, 7, 9]])
    y = torch.tensor([[7, 5, 7, 9, 5]])
    # t=0: 5->7, nothing before: new; t=1: 7->5, 5 seen: token; t=2: 5->7, bigram (5, 7) at s=0;
    # t=3: 7->9, 9 unseen: new; t=4: 9->5, 5 seen, (9, 5) never: token
    assert copy_classes(x, y).tolist() == [[2, 1, 0, 2, 1]]
    assert copy_classes_reference(x, y).tolist() == [[2, 1, 0, 2, 1]]


def test_a_bigram_ending_in_the_current_token_does_not_count():
    # at t=1 (current 4, target 4) the pair (4, 4) is the very one being predicted
    x, y = torch.tensor([[3, 4]]), torch.tensor([[4, 4]])
    assert copy_classes(x, y).tolist() == [[2, 1]]


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("vocab", [2, 5, 30])
def test_classes_match_the_loops(seed, vocab):
    g = torch.Generator().manual_seed(seed)
    seq = torch.randint(vocab, (3, 41), generator=g)
    x, y = seq[:, :-1], seq[:, 1:]
    assert torch.equal(copy_classes(x, y), copy_classes_reference(x, y))


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match="inputs and targets"):
        copy_classes(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 4, dtype=torch.long))


@pytest.fixture
def short_wikitext(monkeypatch):
    """WikiText-2's files cut short: a full-split evaluation of the real test file takes
    minutes here, and every step of this test evaluates the whole split."""
    real = C._corpus_splits

    def cut(*args):
        splits = real(*args)
        return {"train": splits["train"][:150_000], "eval": splits["eval"][:12_000]}

    monkeypatch.setattr(C, "_corpus_splits", cut)


def test_end_to_end_on_a_two_step_run(tmp_path, short_wikitext):
    md = compare("wikitext2", "cpu", ["mingru", "llama"], tmp_path, steps=2, eval_every=2, isolate=False,
                 log=lambda s: None, progress=False, keep_weights=True)
    runs = md.parent / "runs"
    out = tmp_path / "recall.md"
    assert main([str(runs / "mingru"), str(runs / "llama"), "--out", str(out)]) == 0
    rows = json.loads(out.with_suffix(".json").read_text())
    assert [r["run"] for r in rows] == ["mingru", "llama"]
    for row in rows:
        result = json.loads((runs / row["run"] / "result.json").read_text())
        # the same windows as the run's final whole-split loss
        assert row["overall_loss"] == pytest.approx(result["final_split"]["loss"], rel=1e-5)
        shares = [row["classes"][c]["share"] for c in CLASSES]
        assert sum(shares) == pytest.approx(1.0) and all(s > 0 for s in shares)
        assert sum(row["classes"][c]["share"] * row["classes"][c]["loss"] for c in CLASSES) == \
            pytest.approx(row["overall_loss"], rel=1e-9)
    text = out.read_text()
    assert text == to_markdown(rows)
    assert "Loss difference to mingru" in text and "| llama |" in text
    # the per-class differences add up to the overall one
    d = {c: rows[0]["classes"][c]["share"] * (rows[1]["classes"][c]["loss"] - rows[0]["classes"][c]["loss"])
         for c in CLASSES}
    assert sum(d.values()) == pytest.approx(rows[1]["overall_loss"] - rows[0]["overall_loss"], rel=1e-6)


def test_a_run_without_weights_is_refused_with_the_fix(tmp_path, capsys, short_wikitext):
    md = compare("wikitext2", "cpu", ["lstm"], tmp_path, steps=1, eval_every=1, isolate=False,
                 log=lambda s: None, progress=False)
    run = md.parent / "runs" / "lstm"
    with pytest.raises(CompareError, match="--keep-weights"):
        recall_breakdown(run)
    assert main([str(run)]) == 2 and "--keep-weights" in capsys.readouterr().err
    with pytest.raises(CompareError, match="no spec.json"):
        recall_breakdown(tmp_path)


# --- selective copying ---------------------------------------------------------------------------


def test_copying_answers_by_hand():
    B_ = 15  # BLANK
    # span of 6 with data tokens 3, 5, 3 at positions 0, 2, 5; then 3 markers (id 0)
    x = torch.tensor([[3, B_, 5, B_, B_, 3, 0, 0, 0]])
    # answer 1 right; answer 2 says 3 (a neighbour of 5: both sides hold 3); answer 3 says 9 (absent)
    correct, kind, distance = copying_answers(x, torch.tensor([[3, 3, 9]]), 3)
    assert correct.tolist() == [[True, False, False]]
    assert kind.tolist() == [[-1, 0, 2]]
    assert distance.tolist() == [[6, 5, 3]]   # markers at 6, 7, 8; tokens at 0, 2, 5
    # four tokens 1 2 3 4: at the 1st marker "3" is elsewhere (not next to 1), "2" a neighbour
    x = torch.tensor([[1, 2, 3, 4, 0, 0, 0, 0]])
    _, kind, _ = copying_answers(x, torch.tensor([[3, 1, 1, 15]]), 4)
    assert kind.tolist() == [[1, 0, 1, 2]]


def test_copying_answers_checks_its_input():
    with pytest.raises(ValueError, match=r"predictions \(B, 3\)"):
        copying_answers(torch.zeros(2, 9, dtype=torch.long), torch.zeros(2, 4, dtype=torch.long), 3)
    with pytest.raises(ValueError, match="3 data tokens"):
        copying_answers(torch.tensor([[1, 15, 15, 15, 15, 15, 0, 0, 0]]), torch.zeros(1, 3, dtype=torch.long), 3)


def test_copying_breakdown_end_to_end(tmp_path, capsys, short_wikitext):
    md = compare("selective_copying", "cpu", ["mingru", "lstm"], tmp_path, steps=2, eval_every=2, sweep=False,
                 isolate=False, log=lambda s: None, progress=False, keep_weights=True)
    runs = md.parent / "runs"
    out = tmp_path / "copying.md"
    assert main([str(runs / "mingru"), str(runs / "lstm"), "--out", str(out)]) == 0
    rows = json.loads(out.with_suffix(".json").read_text())
    for row in rows:
        result = json.loads((runs / row["run"] / "result.json").read_text())
        assert row["accuracy"] == pytest.approx(result["final_split"]["accuracy"], abs=1e-12)
        assert row["answers"] == 8 * 64 * 16   # eval_batches x eval_batch_size x num_tokens
        wrong = sum(v["count"] for v in row["wrong"].values())
        assert wrong == round((1 - row["accuracy"]) * row["answers"]) and wrong > 0
        assert sum(row["by_index"]) / 16 == pytest.approx(row["accuracy"])
        assert sum(b["answers"] for b in row["by_distance"]) == row["answers"]
        assert row["by_distance"][0]["from"] == 1 and row["by_distance"][-1]["to"] == 64 + 16 - 1
    assert out.read_text() == copying_to_markdown(rows)
    # one table holds one kind of run
    lm = compare("wikitext2", "cpu", ["lstm"], tmp_path / "lm", steps=1, eval_every=1, isolate=False,
                 log=lambda s: None, progress=False, keep_weights=True)
    assert main([str(runs / "mingru"), str(lm.parent / "runs" / "lstm")]) == 2
    assert "cannot share one table" in capsys.readouterr().err
    with pytest.raises(CompareError, match="use copying_breakdown"):
        recall_breakdown(runs / "mingru")
