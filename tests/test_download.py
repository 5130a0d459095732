"""WikiText from the Hugging Face hub (a fake hub here: the real one is not reachable from CI's tests)."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import pytest

pq = pytest.importorskip("pyarrow.parquet")
pa = pytest.importorskip("pyarrow")
huggingface_hub = pytest.importorskip("huggingface_hub")

from minrnn.data import CORPORA, download, locate_corpus  # noqa: E402
from minrnn.data.text import DataError, load_splits  # noqa: E402

from .corpus import requires_corpus  # noqa: E402

TRAIN = " \n = A training text = \n \n It has lines , and blank ones . \n \n" * 50


def _hub_sha1(split: str) -> str:
    return CORPORA["wikitext-2"].hub.splits[split][2]


def _with_hub_sha1(monkeypatch, split: str, sha1: str) -> None:
    """wikitext-2's record with another published SHA-1 for ``split``."""
    record = CORPORA["wikitext-2"]
    hub_split, name, _ = record.hub.splits[split]
    hub = dataclasses.replace(record.hub, splits={**record.hub.splits, split: (hub_split, name, sha1)})
    monkeypatch.setitem(CORPORA, "wikitext-2", dataclasses.replace(record, hub=hub))


def _hub_rows(text: str) -> list[str]:
    """The rows the hub holds for a wiki.*.tokens file: its lines, a blank line as an empty row."""
    return [line if line.strip() else "" for line in text.splitlines(keepends=True)]


def _write_parquet(path: Path, rows: list[str], shards: int = 1) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    per = -(-len(rows) // shards)
    for i in range(shards):
        table = pa.table({"text": rows[i * per:(i + 1) * per]})
        pq.write_table(table, path.parent / f"{path.name}-{i:05d}-of-{shards:05d}.parquet")


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    """A hub serving wikitext-2-v1 from local parquet files (valid/test from the shared data, a small train)."""
    valid = locate_corpus("wikitext-2", "valid").read_text(encoding="utf-8")
    test = locate_corpus("wikitext-2", "test").read_text(encoding="utf-8")
    root = tmp_path / "hub"
    _write_parquet(root / "wikitext-2-v1" / "train", _hub_rows(TRAIN), shards=2)
    _write_parquet(root / "wikitext-2-v1" / "validation", _hub_rows(valid))
    _write_parquet(root / "wikitext-2-v1" / "test", _hub_rows(test))
    calls = []

    def snapshot_download(**kwargs):
        calls.append(kwargs)
        return str(root)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    _with_hub_sha1(monkeypatch, "train", hashlib.sha1(TRAIN.encode()).hexdigest())
    monkeypatch.setenv("MINRNN_DATA_DIR", str(tmp_path / "nowhere"))
    monkeypatch.setenv("HOME", str(tmp_path))
    return calls, {"valid": valid, "test": test}


@requires_corpus("wikitext-2", "valid", "test")
def test_the_hub_rows_rebuild_the_original_files(tmp_path, fake_hub):
    calls, originals = fake_hub
    folder = download.download_from_hub("wikitext-2", tmp_path / "data")
    assert calls == [{"repo_id": "Salesforce/wikitext", "repo_type": "dataset",
                         "allow_patterns": ["wikitext-2-v1/*.parquet"]}]
    assert sorted(p.name for p in folder.iterdir()) == ["test.txt", "train.txt", "valid.txt"]
    # byte for byte the files the project's shared data holds (their SHA-256 is checked too)
    for split in ("valid", "test"):
        assert (folder / f"{split}.txt").read_text(encoding="utf-8") == originals[split]
        assert _hub_sha1(split) == hashlib.sha1(originals[split].encode()).hexdigest()
    assert (folder / "train.txt").read_text() == TRAIN


@requires_corpus("wikitext-2", "valid", "test")
def test_load_splits_downloads_once_then_reads_from_disk(tmp_path, fake_hub):
    calls, originals = fake_hub
    s = load_splits("wikitext-2", str(tmp_path / "data"))
    assert s["train"] == TRAIN and s["valid"] == originals["valid"] and s["test"] == originals["test"]
    assert len(calls) == 1
    load_splits("wikitext-2", str(tmp_path / "data"))
    assert len(calls) == 1, "found on disk the second time: no download"


@requires_corpus("wikitext-2", "valid", "test")
def test_a_wrong_checksum_writes_nothing(tmp_path, fake_hub, monkeypatch):
    _with_hub_sha1(monkeypatch, "test", "0" * 40)
    with pytest.raises(ValueError, match=r"wikitext-2-v1/test rebuilt has sha1 \w+, expected 0{40}\. Nothing was"):
        download.download_from_hub("wikitext-2", tmp_path / "data")
    assert not (tmp_path / "data" / "wikitext-2").exists()
    with pytest.raises(DataError, match="expected 0{40}"):
        load_splits("wikitext-2", str(tmp_path / "data"))


@requires_corpus("wikitext-2", "valid", "test")
def test_local_files_and_minrnn_data_dir_need_no_hub(tmp_path, monkeypatch):
    def no_hub(**kwargs):
        raise AssertionError("the hub was asked for files that are on disk")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_hub)
    # the shared layout: valid/test only in MINRNN_DATA_DIR, the train file beside them in a user folder
    d = tmp_path / "wikitext-2"
    d.mkdir()
    (d / "train.txt").write_text(TRAIN)
    (d / "valid.txt").write_bytes(locate_corpus("wikitext-2", "valid").read_bytes())
    s = load_splits("wikitext-2", str(tmp_path))
    assert s["train"] == TRAIN and "test" not in s
    monkeypatch.setenv("MINRNN_DATA_DIR", str(tmp_path))
    assert load_splits("wikitext-2")["train"] == TRAIN


def test_offline_fails_with_one_line(tmp_path, monkeypatch):
    """The real huggingface_hub, told it is offline: one line naming what was tried, no traceback chain."""
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)  # the real client, no network
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("MINRNN_DATA_DIR", str(tmp_path / "nowhere"))
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(OSError) as err:
        download.download_from_hub("wikitext-103", tmp_path / "data")
    message = str(err.value)
    assert "\n" not in message and message.startswith("could not download Salesforce/wikitext/wikitext-103-v1")
    with pytest.raises(FileNotFoundError) as err:
        load_splits("wikitext-103", str(tmp_path / "data"))
    message = str(err.value)
    assert "\n" not in message and "wikitext-103 not found; looked in:" in message
    assert "huggingface.co/datasets/Salesforce/wikitext" in message
    assert not (tmp_path / "data" / "wikitext-103").exists()


def test_unknown_corpus_is_named():
    with pytest.raises(KeyError, match="unknown corpus 'wikitext-3'"):
        download.download_from_hub("wikitext-3")
    with pytest.raises(KeyError, match="'tinyshakespeare' has no Hugging Face hub source"):
        download.download_from_hub("tinyshakespeare")
