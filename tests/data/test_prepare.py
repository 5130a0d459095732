"""`minrnn prepare`: every kind of source and tokenizer into token shards whose ids are the saved
tokenizer's, deterministic for any --workers, atomic under kill -9, and one-line errors."""

import gzip
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from minrnn.cli import main
from minrnn.data.prepare import prepare
from minrnn.data.shards import MANIFEST, PreparedData, is_prepared
from minrnn.data.text import DataError, split_90_10
from minrnn.data.tokenizers import BOUNDARY_TOKEN, HFTokenizer, load_prepared_tokenizer, load_tokenizer

WORDS = ["the", "cat", "sat", "on", "a", "mat", "dog", "ran", "far", "away", "éclair", "naïve", "日本"]


def _texts(n, seed=0, lo=3, hi=60):
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(lo, hi)))) + ("\n" if i % 3 else ".\n")
            for i in range(n)]


def _write_files(folder: Path, texts, suffix=".txt"):
    folder.mkdir(parents=True, exist_ok=True)
    for i, t in enumerate(texts):
        (folder / f"doc{i:03d}{suffix}").write_text(t, encoding="utf-8")
    return folder


def _stream(data, split):
    s = data.split(split)
    return s.read(0, len(s))


def _check_round_trip(out: Path, docs: dict[str, list[str]], boundary=True):
    """The shards hold exactly each document's ids under the saved tokenizer (transformers'
    AutoTokenizer), each preceded by the end-of-text id, and the index points at the documents."""
    from transformers import AutoTokenizer

    data = PreparedData.open(out, verify=True)
    fast = AutoTokenizer.from_pretrained(data.tokenizer_dir)
    assert len(fast) == data.vocab_size
    assert data.boundary_token_id == (fast.eos_token_id if boundary else None)
    for split, texts in docs.items():
        ids = [fast(t, add_special_tokens=False)["input_ids"] for t in texts]
        if boundary:
            ids = [[fast.eos_token_id, *x] for x in ids]
        np.testing.assert_array_equal(_stream(data, split), np.concatenate(ids))
        starts = np.concatenate(([0], np.cumsum([len(x) for x in ids])[:-1]))
        np.testing.assert_array_equal(data.split(split).all_document_starts(), starts)
        assert data.split(split).documents == len(texts)
    return data


def _fraction_split(texts, f=0.1):
    """The documents by the documented rule: i validates when floor((i + 1) f) > floor(i f)."""
    f = Fraction(str(f))
    valid = [i for i in range(len(texts)) if math.floor((i + 1) * f) > math.floor(i * f)]
    return {"train": [t for i, t in enumerate(texts) if i not in valid], "valid": [texts[i] for i in valid]}


@pytest.mark.parametrize("kind", ["char", "byte", "bpe"])
def test_folder_round_trip_for_each_builtin_tokenizer(kind, tmp_path):
    texts = _texts(40)
    src = _write_files(tmp_path / "src", texts)
    out = tmp_path / "out"
    manifest = prepare([str(src)], kind, out, shard_tokens=200, progress=False, log=lambda s: None,
                       **({"bpe_vocab_size": 300} if kind == "bpe" else {}))
    assert manifest["tokenizer"]["kind"] == kind and manifest["dtype"] == "uint16"
    assert _fraction_split(list(range(40)))["valid"] == [9, 19, 29, 39]
    data = _check_round_trip(out, _fraction_split(texts))
    assert len(data.manifest["splits"]["train"]["shards"]) > 2
    # the end-of-text token was added to the tokenizer: the next id after its own
    fast_vocab = load_prepared_tokenizer(out)
    assert fast_vocab.fast.convert_ids_to_tokens(data.boundary_token_id) == BOUNDARY_TOKEN
    assert data.boundary_token_id == data.vocab_size - 1
    # the tokenizer of the folder decodes the shards back to the documents
    first = data.split("train").read(1, data.split("train").document_starts(1, 10**9)[0])
    assert fast_vocab.decode(first) == texts[0]
    assert fast_vocab.kind == kind


def test_pretrained_tokenizer_folder_with_its_own_eos(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["[UNK]", "</s>", *sorted(set(" ".join(_texts(30)).split()))])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="[UNK]").save_pretrained(tmp_path / "tok")
    texts = _texts(30)
    src = _write_files(tmp_path / "src", texts)
    manifest = prepare([str(src)], str(tmp_path / "tok"), tmp_path / "out", progress=False, log=lambda s: None)
    assert manifest["tokenizer"] == {"source": str(tmp_path / "tok"), "kind": "pretrained", "dir": "tokenizer"}
    assert manifest["boundary_token_id"] == 1 and manifest["vocab_size"] == len(vocab)  # its own EOS, nothing added
    _check_round_trip(tmp_path / "out", _fraction_split(texts))


def test_large_vocabulary_gives_uint32_shards(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted(set(re.findall(r"\w+|[^\w\s]+", "".join(_texts(20)))))  # what Whitespace() splits off
    # ids above 65535 for the words of the text, fillers below and above them
    ids = [*range(1, 65_600), *range(65_600 + len(words), 70_000)]
    vocab = {"[UNK]": 0, **{f"w{i}": i for i in ids}, **{w: 65_600 + i for i, w in enumerate(words)}}
    assert sorted(vocab.values()) == list(range(70_000))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(tmp_path / "tok")
    texts = _texts(20)
    prepare([str(_write_files(tmp_path / "src", texts))], str(tmp_path / "tok"), tmp_path / "out",
            valid_fraction=0, progress=False, log=lambda s: None)
    data = _check_round_trip(tmp_path / "out", {"train": texts})
    assert data.manifest["dtype"] == "uint32" and data.vocab_size == 70_001  # + <|endoftext|>
    assert _stream(data, "train").max() > 65_535
    assert 0 not in _stream(data, "train")  # every word known: no [UNK]


def test_gzipped_jsonl_parquet_glob_and_files_in_the_order_given(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = _texts(24, seed=3)
    rows = "".join(json.dumps({"id": i, "body": t}) + "\n" for i, t in enumerate(texts[:8]))
    (tmp_path / "a.jsonl.gz").write_bytes(gzip.compress(rows.encode()))
    pq.write_table(pa.table({"body": texts[8:16], "n": list(range(8))}), tmp_path / "b.parquet")
    _write_files(tmp_path / "txt", texts[16:])
    prepare([str(tmp_path / "a.jsonl.gz"), str(tmp_path / "b.parquet"), str(tmp_path / "txt" / "*.txt")], "byte",
            tmp_path / "out", text_field="body", valid_fraction=0.25, progress=False, log=lambda s: None)
    data = _check_round_trip(tmp_path / "out", _fraction_split(texts, 0.25))
    assert [s["format"] for s in data.manifest["sources"]] == ["json", "parquet", "text"]
    assert data.manifest["sources"][2]["files"] == 8


def test_split_files_and_document_per_line(tmp_path):
    train, valid = _texts(12, seed=4), _texts(3, seed=5)
    (tmp_path / "train.txt").write_text("".join(train) + "\n\n")  # empty lines are no documents
    (tmp_path / "valid.txt").write_text("".join(valid))
    prepare([], "char", tmp_path / "out", split_files=[f"train={tmp_path / 'train.txt'}", f"valid={tmp_path / 'valid.txt'}"],
            document_per_line=True, progress=False, log=lambda s: None)
    strip = lambda ts: [t.rstrip("\n") for t in ts]
    _check_round_trip(tmp_path / "out", {"train": strip(train), "valid": strip(valid)})


def test_saved_dataset_with_named_splits_and_no_boundary(tmp_path):
    import datasets

    texts = _texts(20, seed=6)
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": texts[:15]}),
                          "validation": datasets.Dataset.from_dict({"text": texts[15:]})}).save_to_disk(tmp_path / "ds")
    manifest = prepare([], "byte", tmp_path / "out", dataset=str(tmp_path / "ds"),
                       dataset_splits=["train=train", "valid=validation"], boundary_token="none",
                       progress=False, log=lambda s: None)
    assert manifest["vocab_size"] == 256 and manifest["boundary_token_id"] is None
    _check_round_trip(tmp_path / "out", {"train": texts[:15], "valid": texts[15:]}, boundary=False)
    with pytest.raises(DataError, match="no split 'test'; it has train, validation"):
        prepare([], "byte", tmp_path / "out2", dataset=str(tmp_path / "ds"), dataset_splits=["test"],
                progress=False, log=lambda s: None)


def test_one_document_splits_by_characters_as_the_text_path_does(tmp_path):
    text = "".join(_texts(50, seed=7))
    (tmp_path / "one.txt").write_text(text)
    prepare([str(tmp_path / "one.txt")], "char", tmp_path / "out", progress=False, log=lambda s: None)
    expected = split_90_10(text)
    _check_round_trip(tmp_path / "out", {"train": [expected["train"]], "valid": [expected["valid"]]})


def test_workers_give_the_same_bytes(tmp_path, monkeypatch):
    import minrnn.data.prepare as P

    monkeypatch.setattr(P, "_BATCH_CHARS", 500)  # many batches, so that two processes share them
    src = _write_files(tmp_path / "src", _texts(60, seed=8))
    for w in (1, 2):
        prepare([str(src)], "bpe", tmp_path / f"w{w}", workers=w, bpe_vocab_size=320, shard_tokens=300,
                progress=False, log=lambda s: None)
    m1, m2 = (json.loads((tmp_path / f"w{w}" / MANIFEST).read_text()) for w in (1, 2))
    assert m1["splits"] == m2["splits"] and len(m1["splits"]["train"]["shards"]) > 3
    for shard in m1["splits"]["train"]["shards"]:
        assert (tmp_path / "w1" / shard["file"]).read_bytes() == (tmp_path / "w2" / shard["file"]).read_bytes()


def test_rerun_is_a_no_op_and_a_different_one_needs_overwrite(tmp_path, capsys):
    src = _write_files(tmp_path / "src", _texts(20))
    args = ["prepare", str(src), "--tokenizer", "byte", "--out", str(tmp_path / "out"), "--progress", "never"]
    assert main(args) == 0
    created = json.loads((tmp_path / "out" / MANIFEST).read_text())["created"]
    assert main(args + ["--workers", "2"]) == 0  # the same output: nothing to do
    assert "nothing to do" in capsys.readouterr().err
    assert json.loads((tmp_path / "out" / MANIFEST).read_text())["created"] == created
    assert main(args + ["--valid-fraction", "0.5"]) == 2
    assert "already holds a prepared folder made differently" in capsys.readouterr().err
    assert main(args + ["--valid-fraction", "0.5", "--overwrite"]) == 0
    data = PreparedData.open(tmp_path / "out")
    assert data.split("valid").documents == 10 and data.manifest["command"].startswith("minrnn prepare ")


@pytest.mark.parametrize("args, message", [
    ([], "give what to read"),
    (["{src}", "--dataset", "x"], "not SOURCE and --dataset"),
    (["{tmp}/nothing*.txt"], "matches no file"),
    (["{tmp}/missing.txt"], "is no file, folder or glob"),
    (["{src}", "--valid-fraction", "1.5"], "--valid-fraction must lie in"),
    (["{src}", "--bpe-vocab-size", "500"], "--bpe-vocab-size is for --tokenizer bpe only"),
    (["{src}", "--split", "train"], "--split is for --dataset only"),
    (["--split-files", "train"], "SPLIT=VALUE"),
    (["--split-files", "valid={src}"], "need a train split"),
    (["{src}", "--tokenizer", "{tmp}/no-such-tokenizer"], "cannot load tokenizer"),
    (["{tmp}/bad.bin"], "bad.bin is not UTF-8 text"),
    (["{tmp}/rows.jsonl"], "no field 'text' (it has body)"),
    (["{src}", "--out", "{tmp}/busy"], "holds files minrnn prepare did not write (notes.md)"),
    (["{tmp}/two"], "the valid split got no document"),
])
def test_bad_arguments_are_one_line_errors(args, message, tmp_path, capsys):
    src = _write_files(tmp_path / "src", _texts(5))
    (tmp_path / "bad.bin").write_bytes(b"\xff\xfe\x00binary")
    (tmp_path / "rows.jsonl").write_text('{"body": "x"}\n')
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.md").write_text("mine")
    _write_files(tmp_path / "two", _texts(2))
    fill = lambda a: a.replace("{src}", str(src)).replace("{tmp}", str(tmp_path))
    argv = ["prepare", *map(fill, args), "--progress", "never"]
    argv += [] if "--tokenizer" in args else ["--tokenizer", "byte"]
    argv += [] if "--out" in args else ["--out", str(tmp_path / "out")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and err.startswith("minrnn prepare: error:")
    assert not is_prepared(tmp_path / "out") and not (tmp_path / "out" / ".partial").exists()


def test_kill_9_half_way_then_the_same_command_completes(tmp_path):
    """A prepare killed between shards leaves no manifest; a second one running meanwhile is
    refused; the same command then finishes with checksums that match its shards."""
    src = _write_files(tmp_path / "src", _texts(120, seed=9))
    out = tmp_path / "out"
    argv = [str(src), "--tokenizer", "byte", "--out", str(out), "--shard-tokens", "200", "--progress", "never"]
    env = {**os.environ, "MINRNN_PREPARE_TEST_SHARD_SLEEP": "0.3"}  # the hidden test hook: sleep after each shard
    proc = subprocess.Popen([sys.executable, "-m", "minrnn", "prepare", *argv], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while len(list((out / ".partial").glob("train-*.bin"))) < 3:
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "the prepare wrote no shards"
            time.sleep(0.05)
        with pytest.raises(DataError, match=r"in use by another minrnn prepare \(pid \d+\)"):
            prepare([str(src)], "byte", out, shard_tokens=200, progress=False, log=lambda s: None)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert not is_prepared(out)
    assert main(["prepare", *argv]) == 0
    data = PreparedData.open(out, verify=True)  # every checksum matches its shard
    assert not (out / ".partial").exists()
    # and the shards are those of a prepare that was never interrupted
    prepare([str(src)], "byte", tmp_path / "clean", shard_tokens=200, progress=False, log=lambda s: None)
    clean = json.loads((tmp_path / "clean" / MANIFEST).read_text())
    assert data.manifest["splits"] == clean["splits"]


def test_stale_files_of_an_interrupted_commit_are_replaced(tmp_path):
    src = _write_files(tmp_path / "src", _texts(20))
    out = tmp_path / "out"
    out.mkdir()
    (out / "train-00007.bin").write_bytes(b"old")  # a shard moved in before a kill, no manifest
    (out / ".partial").mkdir()
    (out / ".partial" / "train-00000.bin").write_bytes(b"half")
    prepare([str(src)], "byte", out, progress=False, log=lambda s: None)
    assert not (out / "train-00007.bin").exists() and not (out / ".partial").exists()
    PreparedData.open(out, verify=True)


def test_hf_tokenizer_interface_and_run_folder_round_trip(tmp_path):
    from minrnn.data.tokenizers import CharTokenizer, VocabularyError

    char = CharTokenizer.train("abc <|>endoftx\n")
    tok = HFTokenizer.of(char)
    assert tok.kind == "char" and tok.unit == "char" and tok.vocab_size == char.vocab_size + 1
    assert tok.eos_token_id == char.vocab_size
    # text spelling the end-of-text token is text, never the boundary id
    assert tok.encode(BOUNDARY_TOKEN) == char.encode(BOUNDARY_TOKEN)
    assert tok.encode("abc\n") == char.encode("abc\n") and tok.decode(tok.encode("cab")) == "cab"
    with pytest.raises(VocabularyError):
        tok.encode("z")
    tok.save(tmp_path)  # as a run folder holds it: load_tokenizer gives it back with its end-of-text token
    back = load_tokenizer(tmp_path)
    assert isinstance(back, HFTokenizer) and back.kind == "char" and back.vocab_size == tok.vocab_size
    assert HFTokenizer.of(char, boundary=False).vocab_size == char.vocab_size


def test_a_folder_prepared_inside_its_source_folder_is_not_read_back(tmp_path):
    texts = _texts(20)
    src = _write_files(tmp_path / "src", texts)
    prepare([str(src)], "byte", src / "prepared", progress=False, log=lambda s: None)
    # again, made differently: the first folder's shards and tokenizer are no sources
    prepare([str(src)], "byte", src / "prepared", valid_fraction=0.5, overwrite=True, progress=False,
            log=lambda s: None)
    _check_round_trip(src / "prepared", _fraction_split(texts, 0.5))
