"""Tokenizers, splits and the windows a run reads."""

import json

import pytest
import torch

from minrnn.data.text import DataError, eval_offsets, load_splits, split_90_10, train_offsets, windows
from minrnn.data.tokenizers import (
    BPETokenizer,
    ByteTokenizer,
    CharTokenizer,
    VocabularyError,
    build_tokenizer,
    load_tokenizer,
)

from ..corpus import requires_corpus
from .conftest import TINY, minrnn

TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\nÆsop's café — 10€\n" * 40


@pytest.mark.parametrize("kind", ["char", "byte", "bpe"])
def test_tokenizers_round_trip_and_save(kind, tmp_path):
    tok = build_tokenizer(kind, TEXT, bpe_vocab_size=300)
    ids = tok.encode(TEXT)
    assert tok.decode(ids) == TEXT
    assert max(ids) < tok.vocab_size
    tok.save(tmp_path)
    back = load_tokenizer(tmp_path)
    assert type(back) is type(tok) and back.vocab_size == tok.vocab_size and back.encode(TEXT) == ids
    if kind == "bpe":
        assert len(ids) < len(TEXT.encode()) / 2, "BPE merges the repeated text"
    if kind == "byte":
        assert len(ids) == len(TEXT.encode("utf-8"))


def test_char_tokenizer_names_unknown_characters():
    tok = CharTokenizer.train("abc")
    with pytest.raises(VocabularyError, match=r"2 character\(s\) not in the vocabulary: 'x', 'é'"):
        tok.encode("abxéa")


def test_missing_tokenizer_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json not found"):
        load_tokenizer(tmp_path)


def test_splits_of_a_file_and_a_folder(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("0123456789" * 10)
    s = load_splits(str(f))
    assert s == split_90_10("0123456789" * 10) and len(s["train"]) == 90 and s["train"] + s["valid"] == f.read_text()
    d = tmp_path / "corpus"
    d.mkdir()
    (d / "train.txt").write_text("train text")
    (d / "valid.txt").write_text("valid text")
    (d / "test.txt").write_text("test text")
    assert load_splits(str(d)) == {"train": "train text", "valid": "valid text", "test": "test text"}
    (d / "valid.txt").unlink()
    with pytest.raises(DataError, match="has no valid file; looked for valid.txt, val.txt"):
        load_splits(str(d))
    with pytest.raises(DataError, match="neither a named corpus .* nor an existing file"):
        load_splits(str(tmp_path / "nope"))


@requires_corpus("tinyshakespeare", "input")
def test_tinyshakespeare_split_is_nanogpts():
    s = load_splits("tinyshakespeare")
    assert len(s["train"]) == int(1115394 * 0.9) and len(s["train"]) + len(s["valid"]) == 1115394


def test_windows_are_a_function_of_seed_and_step():
    a = train_offsets(1000, 16, 8, seed=1, step=5, micro=0)
    assert torch.equal(a, train_offsets(1000, 16, 8, seed=1, step=5, micro=0))
    assert not torch.equal(a, train_offsets(1000, 16, 8, seed=1, step=6, micro=0))
    assert not torch.equal(a, train_offsets(1000, 16, 8, seed=1, step=5, micro=1))
    assert not torch.equal(a, train_offsets(1000, 16, 8, seed=2, step=5, micro=0))
    assert a.min() >= 0 and a.max() <= 1000 - 16 - 1
    tokens = torch.arange(1000)
    x, y = windows(tokens, a, 16)
    assert x.shape == y.shape == (8, 16)
    assert torch.equal(y[:, :-1], x[:, 1:]) and torch.equal(x[:, 0], a)
    e = eval_offsets(1000, 16, 10)
    assert e.numel() == 10 and e[0] == 0 and e[-1] == 1000 - 17
    assert eval_offsets(40, 16, 10).numel() == 2


@requires_corpus("wikitext-2", "valid")
def test_bpe_run_on_a_folder_reports_bits_per_byte(tmp_path):
    from minrnn.data import locate_corpus

    d = tmp_path / "wiki"
    d.mkdir()
    valid = locate_corpus("wikitext-2", "valid").read_text()
    (d / "train.txt").write_text(valid[:150_000])
    (d / "valid.txt").write_text(valid[150_000:200_000])
    (d / "test.txt").write_text(valid[200_000:250_000])
    out = tmp_path / "run"
    r = minrnn("train", TINY, "--data", d, "--tokenizer", "bpe", "--bpe_vocab_size", 400, "--out_dir", out,
               "--steps", 4, "--eval_every", 4, "--checkpoint_every", 4)
    assert r.returncode == 0, r.stderr
    assert isinstance(load_tokenizer(out), BPETokenizer) and load_tokenizer(out).vocab_size == 400
    e = minrnn("eval", "--run", out, "--split", "test")
    assert e.returncode == 0, e.stderr
    result = json.loads(e.stdout)
    text = (d / "test.txt").read_text()
    n_tokens = len(load_tokenizer(out).encode(text))
    assert result["bits_per_byte"] == pytest.approx(result["loss"] / 0.6931471805599453 * n_tokens
                                                    / len(text.encode()), rel=1e-9)
    g = minrnn("generate", "--run", out, "--prompt", " The", "--tokens", 5)
    assert g.returncode == 0 and g.stdout.startswith(" The") and len(g.stdout) > 5


def test_byte_tokenizer_run(small_text, tmp_path):
    r = minrnn("train", TINY, "--data", small_text, "--tokenizer", "byte", "--out_dir", tmp_path, "--steps", 3,
               "--eval_every", 3, "--checkpoint_every", 3, "--dtype", "bfloat16")
    assert r.returncode == 0, r.stderr
    assert isinstance(load_tokenizer(tmp_path), ByteTokenizer)
    e = minrnn("eval", "--run", tmp_path)
    assert "bits_per_byte" in json.loads(e.stdout)
    g = minrnn("generate", "--run", tmp_path, "--prompt", "Æsop €", "--tokens", 4, "--greedy")
    assert g.returncode == 0 and g.stdout.startswith("Æsop €")


def _offline(url, timeout=30.0):
    raise OSError("no network in tests")


@requires_corpus("wikitext-2", "valid")
def test_named_wikitext_folder(tmp_path, monkeypatch):
    from minrnn.data import locate_corpus

    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)  # the real client, no network
    # the shared data directory holds wikitext-2's valid and test files but no train file
    with pytest.raises(FileNotFoundError, match=r"wikitext-2 not found; looked in: .*has no train file.*"
                                                r"downloading https://\S+wikitext-2-v1 failed too"):
        load_splits("wikitext-2")
    d = tmp_path / "wikitext-2"
    d.mkdir()
    (d / "wiki.train.tokens").write_text("some training text")
    (d / "wiki.valid.tokens").write_bytes(locate_corpus("wikitext-2", "valid").read_bytes())
    s = load_splits("wikitext-2", str(tmp_path))
    assert s["train"] == "some training text" and len(s["valid"]) > 1000 and "test" not in s
    (d / "wiki.valid.tokens").write_text("another valid file")
    with pytest.raises(DataError, match="not the wikitext-2 valid file"):
        load_splits("wikitext-2", str(tmp_path))


def test_generation_streams_token_by_token(trained_run):
    import io

    from minrnn.training import load_run
    from minrnn.training.sampling import sample

    class Recorder(io.StringIO):
        writes = 0

        def write(self, s):
            Recorder.writes += 1
            return super().write(s)

    _, tok, model, _ = load_run(trained_run[0])
    out = Recorder()
    text = sample(model, tok, "KING", 12, temperature=None, out=out)
    assert out.getvalue() == text and len(text) == 12
    assert Recorder.writes == 12, "one write per new character, as it is produced"
    # the stream equals decoding all at once, greedy = argmax of the full forward pass
    ids = torch.tensor([tok.encode("KING" + text)])
    logits = model(input_ids=ids, use_cache=False).logits[0, 3:-1]
    assert tok.decode(logits.argmax(-1).tolist()) == text


@requires_corpus("wikitext-2", "valid", "test")
def test_wikitext_checksums_match_the_shared_files():
    import hashlib

    from minrnn.data import CORPORA, locate_corpus

    for split in ("valid", "test"):
        data = locate_corpus("wikitext-2", split).read_bytes()
        assert hashlib.sha1(data).hexdigest() == CORPORA["wikitext-2"].hub.splits[split][2]
