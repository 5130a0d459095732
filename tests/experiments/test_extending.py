"""Extending minrnn from outside the package: a toy baseline, a toy corpus and a toy cell, each
registered from this file (no edit to src/), then run by `minrnn compare` or built by it."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from minrnn.cli import main
from minrnn.data import CORPORA, Corpus, CorpusFile, register_corpus
from minrnn.data.corpora import sha256_of
from minrnn.experiments.baselines import (
    BASELINES,
    MINRNN_MODELS,
    Baseline,
    build_model,
    get_baseline,
    of_kind,
    register_baseline,
    unregister_baseline,
)
from minrnn.ops.cells import CELLS, CellSpec, g, log_g, register_cell


class ToyMLPLM(nn.Module):
    """Each position alone: embedding -> (Linear -> GELU) x layers -> head tied to the embedding."""

    def __init__(self, vocab_size: int, width: int, layers: int, tie: bool):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, width)
        nn.init.normal_(self.embed.weight, std=0.02)  # tied to the head: unit-variance logits would be huge
        self.blocks = nn.ModuleList(nn.Linear(width, width) for _ in range(layers))
        self.head = nn.Linear(width, vocab_size, bias=False)
        if tie:
            self.head.weight = self.embed.weight

    def forward(self, input_ids):
        x = self.embed(input_ids)
        for block in self.blocks:
            x = x + F.gelu(block(x))
        return self.head(x)


def make_toy_mlp(vocab_size, width, mlp_width, layers, opts):
    if opts["extra"]:
        raise TypeError(f"toy-mlp takes no options, got {sorted(opts['extra'])}")
    return ToyMLPLM(vocab_size, width, layers, opts["tie_word_embeddings"])


TOY_TEXT = "the quick brown fox jumps over the lazy dog; a toy corpus for a toy model.\n" * 400


@pytest.fixture
def toy_baseline():
    record = register_baseline(Baseline("toy-mlp", make_toy_mlp, "recurrent", num_hidden_layers=2,
                                        doc="an MLP over each position"))
    yield record
    unregister_baseline("toy-mlp")


@pytest.fixture
def toy_corpus(tmp_path, monkeypatch):
    """A corpus of one file, written here, with its checksum recorded and perplexity reported."""
    folder = tmp_path / "data" / "toy-corpus"
    folder.mkdir(parents=True)
    path = folder / "toy.txt"
    path.write_text(TOY_TEXT)
    monkeypatch.setenv("MINRNN_DATA_DIR", str(tmp_path / "data"))
    record = Corpus("toy-corpus", "file", "written by the test", perplexity=True, train_fraction=0.8,
                    files={"input": CorpusFile("toy.txt", sha256_of(path), path.stat().st_size)})
    register_corpus(record)
    yield record
    del CORPORA["toy-corpus"]


def toy_gates(hidden, gate):
    """A minGRU with a halved gate: a = 1 - z / 2, b = z / 2 g(hidden), z = sigmoid(gate)."""
    z = torch.sigmoid(gate) / 2
    return 1 - z, z * g(hidden)


def toy_log_gates(hidden, gate):
    log_half_z = F.logsigmoid(gate) - torch.log(torch.tensor(2.0, dtype=gate.dtype, device=gate.device))
    return torch.log1p(-torch.exp(log_half_z)), log_half_z + log_g(hidden)


@pytest.fixture
def toy_cell():
    register_cell(CellSpec("toygru", ("hidden", "gate"), toy_gates, toy_log_gates, decay_slot=1,
                           decay_bias_sign=-1.0, doc="a minGRU with a halved gate"))
    yield CELLS["toygru"]
    del CELLS["toygru"]


def test_a_registered_baseline_and_corpus_run_through_compare(tmp_path, toy_baseline, toy_corpus, capsys):
    assert "toy-mlp" in BASELINES and "toy-mlp" not in MINRNN_MODELS
    assert get_baseline("toy-mlp").option_keys() >= {"hidden_size", "num_hidden_layers", "dropout"}
    out = tmp_path / "out"
    # the text experiment on the named corpus; toy-mlp is in no preset: built to the preset's budget
    assert main(["compare", "text", "--data", "toy-corpus", "--models", "toy-mlp,gru", "--steps", "3",
                 "--eval-every", "3", "--out", str(out), "--no-progress", "--in-process",
                 "--set", "toy-mlp.num_layers=1"]) == 0
    md = out / "text-cpu" / "results.md"
    text = md.read_text()
    assert f"written: {md}" in capsys.readouterr().out
    results = json.loads((md.parent / "results.json").read_text())
    assert [r["model"] for r in results] == ["toy-mlp", "gru"]
    toy = results[0]
    assert toy["data"].startswith("toy-corpus (char tokens)") and toy["num_layers"] == 1 and toy["steps"] == 3
    assert abs(toy["params"] / results[1]["params"] - 1) < 0.1  # the same budget as the preset's models
    header = next(line for line in text.splitlines() if line.startswith("| run |"))
    assert "| ppl |" in header  # the corpus's record asks for perplexity
    assert any(line.startswith("| toy-mlp |") for line in text.splitlines())
    assert "toy-mlp.num_hidden_layers=1" in text  # --set's earlier name, reported under the current one
    # the corpus splits by its record's fraction
    from minrnn.data.text import load_splits

    splits = load_splits("toy-corpus")
    assert len(splits["train"]) == int(len(TOY_TEXT) * 0.8)


def test_a_registered_transformer_is_the_reports_reference(toy_baseline):
    import dataclasses

    register_baseline(dataclasses.replace(toy_baseline, name="toy-transformer", kind="transformer"))
    try:
        assert of_kind("transformer") == ("llama", "gpt2", "toy-transformer")
    finally:
        unregister_baseline("toy-transformer")
    assert "toy-transformer" not in BASELINES
    with pytest.raises(ValueError, match="record: a baseline 'llama' exists already"):
        register_baseline(dataclasses.replace(toy_baseline, name="llama"))


def test_a_registered_cell_is_a_compare_family(toy_cell):
    assert "toygru" in MINRNN_MODELS and "toygru-hybrid" in MINRNN_MODELS
    assert get_baseline("toygru").option_keys() >= {"hidden_size", "expansion_factor"}


def test_a_registered_cell_builds_to_the_budget(toy_cell):
    model = build_model("toygru", 65, 200_000)
    assert abs(model.baseline.params / 200_000 - 1) <= 0.10
    assert model.model.config.cell == "toygru"
    # same projections as minGRU's: the same width at the same budget
    assert model.baseline.width == build_model("mingru", 65, 200_000).baseline.width
    logits = model(torch.randint(0, 65, (2, 9)))
    assert logits.shape == (2, 9, 65) and torch.isfinite(logits).all()


def test_a_registered_cell_trains_through_compare(tmp_path, toy_cell, toy_corpus):
    out = tmp_path / "out"
    assert main(["compare", "text", "--data", "toy-corpus", "--models", "toygru,mingru", "--steps", "3",
                 "--eval-every", "3", "--out", str(out), "--no-progress", "--in-process"]) == 0
    results = json.loads((out / "text-cpu" / "results.json").read_text())
    assert [r["model"] for r in results] == ["toygru", "mingru"]
    toy, mingru = results
    # minGRU's projections at minGRU's budget, trained by the same engine on the toy corpus
    assert toy["params"] == mingru["params"] and toy["steps"] == 3 and toy["data"].startswith("toy-corpus")
    assert math.isfinite(toy["final_val"]) and toy["final_val"] != mingru["final_val"]
