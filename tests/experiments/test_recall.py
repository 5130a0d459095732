"""The copy breakdown of a language model's loss (experiments/recall.py): the classes against
plain loops, and end to end on two short `minrnn train` runs."""

import contextlib
import io
import json

import pytest
import torch

from minrnn.cli import main as minrnn

from ..corpus import shakespeare
from ..scripts import load_script

recall = load_script("experiments", "recall")
CLASSES, copy_classes, copy_classes_reference = recall.CLASSES, recall.copy_classes, recall.copy_classes_reference
main, to_markdown = recall.main, recall.to_markdown


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


CONFIG = """data = "{data}"
tokenizer = "char"
steps = 20
batch_size = 8
seq_len = 32
lr = 1e-2
warmup_steps = 2
eval_every = 10
eval_windows = 12
checkpoint_every = 10
sample_tokens = 0
plot = false
seed = {seed}

[model]
hidden_size = {width}
num_hidden_layers = 1
"""


def _train(tmp_path, name, data, seed, width):
    config = tmp_path / f"{name}.toml"
    config.write_text(CONFIG.format(data=data, seed=seed, width=width))
    out = tmp_path / name
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        assert minrnn(["train", str(config), "--out_dir", str(out)]) == 0
    return out


def _eval_loss(run) -> float:
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        assert minrnn(["eval", "--run", str(run), "--split", "valid"]) == 0
    return json.loads(printed.getvalue())["loss"]


def test_end_to_end_on_two_short_training_runs(tmp_path):
    data = tmp_path / "text.txt"
    data.write_text(shakespeare(30_000))
    runs = [_train(tmp_path, "narrow", data, 0, 16), _train(tmp_path, "wide", data, 1, 32)]
    out = tmp_path / "recall.md"
    with contextlib.redirect_stdout(io.StringIO()):
        assert main([str(r) for r in runs] + ["--out", str(out)]) == 0
    rows = json.loads(out.with_suffix(".json").read_text())
    assert [r["run"] for r in rows] == ["narrow", "wide"]
    for run, row in zip(runs, rows):
        assert row["tokens"] == 12 * 32  # the run's own evaluation windows
        assert row["overall_loss"] == pytest.approx(_eval_loss(run), rel=1e-5)  # what `minrnn eval` scores
        shares = [row["classes"][c]["share"] for c in CLASSES]
        assert sum(shares) == pytest.approx(1.0) and all(s > 0 for s in shares)
        assert sum(row["classes"][c]["share"] * row["classes"][c]["loss"] for c in CLASSES) == \
            pytest.approx(row["overall_loss"], rel=1e-9)
    text = out.read_text()
    assert text == to_markdown(rows)
    assert "Loss difference to narrow" in text and "| wide |" in text
    # the per-class differences add up to the overall one
    d = {c: rows[0]["classes"][c]["share"] * (rows[1]["classes"][c]["loss"] - rows[0]["classes"][c]["loss"])
         for c in CLASSES}
    assert sum(d.values()) == pytest.approx(rows[1]["overall_loss"] - rows[0]["overall_loss"], rel=1e-6)


def test_errors_name_what_is_wrong(tmp_path, capsys):
    assert main([str(tmp_path)]) == 2
    assert "config.toml" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([str(tmp_path), "--windows", "0"])
