"""The project's tokenizers as transformers fast tokenizers: the same ids and text as the
project's own classes, the earlier on-disk format still read, damaged and unwritable files
reported in one line."""

import json
import random

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerFast

import minrnn.data.tokenizers as T
from minrnn.data.tokenizers import (
    BPETokenizer,
    ByteTokenizer,
    CharTokenizer,
    TokenizerError,
    VocabularyError,
    build_tokenizer,
    load_tokenizer,
)

from ..corpus import shakespeare
from .run_helpers import enospc, one_line

TEXT = shakespeare()
TRAIN, VALID = TEXT[:50_000], TEXT[50_000:]


@pytest.fixture(scope="module")
def tokenizers():
    return {kind: build_tokenizer(kind, TRAIN if kind == "bpe" else TEXT, bpe_vocab_size=400)
            for kind in ("char", "byte", "bpe")}


@pytest.mark.parametrize("kind", ["char", "byte", "bpe"])
def test_fast_tokenizer_gives_the_same_ids_and_text(kind, tokenizers, tmp_path):
    tok = tokenizers[kind]
    tok.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    fast = AutoTokenizer.from_pretrained(tmp_path)
    assert isinstance(fast, PreTrainedTokenizerFast)
    assert len(fast) == tok.vocab_size
    ids = tok.encode(VALID)
    assert fast(VALID)["input_ids"] == ids
    assert fast.decode(ids) == tok.decode(ids) == VALID
    # no special tokens are added or skipped: every id is a piece of text
    assert fast("ROMEO:\n  hi ,  .\n\n")["input_ids"] == tok.encode("ROMEO:\n  hi ,  .\n\n")
    assert fast.decode(ids[:100], skip_special_tokens=True) == tok.decode(ids[:100])
    back = load_tokenizer(tmp_path)
    assert type(back) is type(tok) and back.vocab_size == tok.vocab_size and back.encode(VALID) == ids


def test_char_tokenizer_refuses_characters_outside_its_alphabet_in_both_forms(tokenizers, tmp_path):
    tok = tokenizers["char"]
    tok.save(tmp_path)
    fast = AutoTokenizer.from_pretrained(tmp_path)
    with pytest.raises(VocabularyError, match="'€'"):
        tok.encode("ab€")
    # the fast form has no unknown token either: it raises rather than substituting one
    with pytest.raises(Exception, match="UNK"):
        fast("ab€")


def test_byte_tokenizer_decodes_invalid_utf8_like_the_project(tokenizers):
    tok, fast = tokenizers["byte"], tokenizers["byte"].to_hf()
    text = TEXT[:2000] + "héllo wörld ✓ 😀 \t\r\x00"
    assert fast.encode(text).ids == tok.encode(text) == list(text.encode())
    rnd = random.Random(0)
    for _ in range(500):
        ids = [rnd.randrange(256) for _ in range(rnd.randrange(1, 12))]
        assert fast.decode(ids) == tok.decode(ids), ids


def test_byte_symbols_are_the_byte_level_alphabet():
    from tokenizers import pre_tokenizers

    symbols = T.byte_symbols()
    assert len(set(symbols)) == 256 and set(symbols) == set(pre_tokenizers.ByteLevel.alphabet())
    assert symbols[ord("A")] == "A" and symbols[ord(" ")] == "Ġ" and symbols[ord("\n")] == "Ċ"


def _write_old_format(tok, directory):
    """The files of a run written before tokenizers were saved for transformers."""
    if tok.kind == "bpe":
        tok.tok.save(str(directory / "bpe.json"))
        spec = {"kind": "bpe", "file": "bpe.json"}
    else:
        spec = {"kind": tok.kind, **({"chars": tok.chars} if tok.kind == "char" else {})}
    (directory / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False))


@pytest.mark.parametrize("kind", ["char", "byte", "bpe"])
def test_earlier_format_still_loads_and_is_rewritten_in_the_new_one(kind, tokenizers, tmp_path):
    tok = tokenizers[kind]
    _write_old_format(tok, tmp_path)
    old = load_tokenizer(tmp_path)
    assert type(old) is type(tok) and old.encode(VALID) == tok.encode(VALID)
    old.save(tmp_path)
    assert not (tmp_path / "bpe.json").exists()
    assert AutoTokenizer.from_pretrained(tmp_path)(VALID)["input_ids"] == tok.encode(VALID)


@pytest.mark.parametrize("content, says", [
    ('{"version": "1.0", "model": {"type": "Word', "cannot be read"),
    ("", "cannot be read"),
    ("[]", "holds no tokenizer"),
    ('{"kind": "sentencepiece"}', "unknown tokenizer kind"),
    ('{"version": "1.0", "model": {"type": "Nonsense"}}', "not a valid tokenizer"),
])
def test_damaged_tokenizer_file_is_a_one_line_error_naming_it(content, says, tmp_path):
    (tmp_path / "tokenizer.json").write_text(content)
    with pytest.raises(TokenizerError, match=says) as e:
        load_tokenizer(tmp_path)
    assert str(tmp_path / "tokenizer.json") in one_line(str(e.value))


@pytest.mark.parametrize("where", ["write", "fsync", "replace"])
def test_full_disk_keeps_the_previous_tokenizer_files_and_leaves_no_partial_one(where, tokenizers, tmp_path,
                                                                               monkeypatch):
    import os

    tokenizers["char"].save(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    if where == "write":  # the data does not fit: write_atomic's temporary file gets part of it
        real_fdopen = os.fdopen

        class Full:
            def __init__(self, f):
                self.f = f

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self.f.close()

            def write(self, data):
                self.f.write(data[:3])
                raise OSError(28, "No space left on device")

        monkeypatch.setattr(os, "fdopen", lambda fd, *a, **k: Full(real_fdopen(fd, *a, **k)))
    else:
        monkeypatch.setattr(os, where, enospc)
    with pytest.raises(TokenizerError, match="No space left on device") as e:
        tokenizers["bpe"].save(tmp_path)
    monkeypatch.undo()
    one_line(str(e.value))
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert after == before, "a failed save changed or added files"
    assert isinstance(load_tokenizer(tmp_path), CharTokenizer)


def test_full_disk_at_the_first_save_leaves_no_tokenizer_file(tokenizers, tmp_path, monkeypatch):
    import os

    monkeypatch.setattr(os, "fsync", enospc)
    with pytest.raises(TokenizerError):
        tokenizers["byte"].save(tmp_path / "run")
    monkeypatch.undo()
    assert [p for p in (tmp_path / "run").iterdir() if p.stat().st_size == 0] == []
    with pytest.raises(FileNotFoundError):
        load_tokenizer(tmp_path / "run")


def test_classes_round_trip_through_their_fast_form():
    for tok in (CharTokenizer(list("\n abc")), ByteTokenizer(), BPETokenizer.train(TRAIN[:5000], 300)):
        fast = tok.to_hf()
        sample = "ab c\n" if tok.kind == "char" else VALID[:3000]
        assert fast.encode(sample).ids == tok.encode(sample)
        assert fast.decode(tok.encode(sample)) == sample
