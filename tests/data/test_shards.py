"""The prepared-data format: ShardWriter writes it, PreparedData / TokenStream read it."""

import hashlib
import json

import numpy as np
import pytest

from minrnn.data.shards import (
    MANIFEST,
    PreparedData,
    ShardWriter,
    TokenStream,
    is_prepared,
    token_dtype,
    write_manifest,
)
from minrnn.data.text import DataError


def _docs(seed=0, n=40, vocab=300):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, size=int(rng.integers(1, 30))) for _ in range(n)]


def _prepare(tmp_path, splits, vocab_size=300, shard_tokens=50):
    """A prepared folder holding ``splits`` ({name: [doc arrays]}); returns (path, {name: concatenated ids})."""
    entries, streams = {}, {}
    for name, docs in splits.items():
        w = ShardWriter(tmp_path, name, token_dtype(vocab_size), shard_tokens=shard_tokens)
        for d in docs:
            w.add(d)
        entries[name] = w.finish()
        streams[name] = np.concatenate(docs).astype(np.int64) if docs else np.empty(0, np.int64)
    write_manifest(tmp_path, {"format": "minrnn-prepared", "version": 1, "dtype": token_dtype(vocab_size).name,
                              "vocab_size": vocab_size, "boundary_token_id": None,
                              "tokenizer": {"source": "test", "kind": "pretrained", "dir": "tokenizer"},
                              "splits": entries, "sources": [], "command": "test", "created": "now"})
    return tmp_path, streams


def test_token_dtype_by_vocabulary_size():
    assert token_dtype(256) == np.uint16
    assert token_dtype(65536) == np.uint16  # ids 0..65535 fit
    assert token_dtype(65537) == np.uint32


def test_round_trip_across_shards(tmp_path):
    docs = _docs()
    path, streams = _prepare(tmp_path, {"train": docs, "valid": docs[:3]})
    assert is_prepared(path)
    data = PreparedData.open(path)
    assert data.splits == ("train", "valid") and data.vocab_size == 300 and data.boundary_token_id is None
    assert data.tokenizer_dir == path / "tokenizer"
    train = data.split("train")
    manifest = json.loads((path / MANIFEST).read_text())
    shards = manifest["splits"]["train"]["shards"]
    assert len(shards) > 3  # several shards, so reads cross borders
    # documents never span shards; each shard closes at the first document reaching shard_tokens
    for s in shards[:-1]:
        assert 50 <= s["tokens"] < 50 + 30
    assert len(train) == streams["train"].size and train.documents == len(docs)
    np.testing.assert_array_equal(train.read(0, len(train)), streams["train"])
    for a, b in [(0, 0), (3, 77), (49, 51), (len(train) - 5, len(train))]:
        np.testing.assert_array_equal(train.read(a, b), streams["train"][a:b])
    offsets = np.array([0, 10, 45, 48, 49, 100, len(train) - 9], dtype=np.int64)
    rows = train.gather(offsets, 9)
    assert rows.dtype == np.int64 and rows.shape == (7, 9)
    for r, o in zip(rows, offsets):
        np.testing.assert_array_equal(r, streams["train"][o:o + 9])
    # the files are what numpy reads: raw little-endian uint16
    raw = np.fromfile(path / shards[0]["file"], dtype="<u2")
    np.testing.assert_array_equal(raw, streams["train"][:shards[0]["tokens"]])
    assert hashlib.sha256((path / shards[0]["file"]).read_bytes()).hexdigest() == shards[0]["sha256"]
    assert hashlib.sha256((path / shards[0]["docs"]).read_bytes()).hexdigest() == shards[0]["docs_sha256"]


def test_document_starts(tmp_path):
    docs = _docs(1)
    path, _ = _prepare(tmp_path, {"train": docs})
    train = PreparedData.open(path).split("train")
    expected = np.concatenate(([0], np.cumsum([d.size for d in docs])[:-1]))
    np.testing.assert_array_equal(train.all_document_starts(), expected)
    for a, b in [(0, len(train)), (5, 60), (49, 200), (len(train) - 1, len(train) + 10), (7, 7)]:
        want = expected[(expected >= a) & (expected < b)]
        np.testing.assert_array_equal(train.document_starts(a, b), want)
    # each shard's index is local to the shard
    shard = json.loads((path / MANIFEST).read_text())["splits"]["train"]["shards"][1]
    local = np.load(path / shard["docs"])
    assert local[0] == 0 and local.dtype == np.int64 and local.size == shard["documents"]


def test_uint32_shards(tmp_path):
    docs = [np.array([0, 70000, 65536, 5]), np.array([69999])]
    path, streams = _prepare(tmp_path, {"train": docs}, vocab_size=70001)
    data = PreparedData.open(path)
    assert data.manifest["dtype"] == "uint32"
    np.testing.assert_array_equal(data.split("train").read(0, 5), streams["train"])
    assert (path / "train-00000.bin").stat().st_size == 5 * 4


def test_writer_rejects_ids_the_dtype_cannot_hold(tmp_path):
    w = ShardWriter(tmp_path, "train", np.uint16)
    with pytest.raises(ValueError, match="65535"):
        w.add(np.array([1, 70000]))


def test_add_many_equals_add(tmp_path):
    docs = _docs(2)
    a = ShardWriter(tmp_path, "a", np.uint16, shard_tokens=37)
    for d in docs:
        a.add(d)
    b = ShardWriter(tmp_path, "b", np.uint16, shard_tokens=37)
    b.add_many(np.concatenate(docs[:17]), [d.size for d in docs[:17]])
    b.add_many(np.concatenate(docs[17:]), [d.size for d in docs[17:]])
    ea, eb = a.finish(), b.finish()
    assert [(s["tokens"], s["documents"], s["sha256"], s["docs_sha256"]) for s in ea["shards"]] == \
           [(s["tokens"], s["documents"], s["sha256"], s["docs_sha256"]) for s in eb["shards"]]


def test_flipped_byte_is_a_one_line_error_naming_the_shard(tmp_path):
    path, _ = _prepare(tmp_path, {"train": _docs()})
    f = path / "train-00002.bin"
    raw = bytearray(f.read_bytes())
    raw[3] ^= 0x01
    f.write_bytes(bytes(raw))
    with pytest.raises(DataError, match="train-00002.bin") as e:
        PreparedData.open(path, verify=True)
    assert "\n" not in str(e.value) and "SHA-256" in str(e.value)
    PreparedData.open(path, verify=False)  # sizes still match: only the checksum finds it


def test_short_or_missing_shard(tmp_path):
    path, _ = _prepare(tmp_path, {"train": _docs()})
    f = path / "train-00001.bin"
    f.write_bytes(f.read_bytes()[:-2])
    with pytest.raises(DataError, match="train-00001.bin holds .* bytes"):
        PreparedData.open(path, verify=False)
    f.unlink()
    with pytest.raises(DataError, match="train-00001.bin is missing"):
        PreparedData.open(path, verify=False)


def test_damaged_docs_index(tmp_path):
    path, _ = _prepare(tmp_path, {"train": _docs()})
    f = path / "train-00000.docs.npy"
    f.write_bytes(b"not an npy file")
    with pytest.raises(DataError, match="train-00000.docs.npy"):
        PreparedData.open(path, verify=True)


def test_errors_name_what_is_wrong(tmp_path):
    with pytest.raises(DataError, match="no manifest.json"):
        PreparedData.open(tmp_path)
    assert not is_prepared(tmp_path)
    path, _ = _prepare(tmp_path, {"train": _docs()})
    with pytest.raises(DataError, match="no 'test' split; it has train"):
        PreparedData.open(path).split("test")
    train = PreparedData.open(path).split("train")
    with pytest.raises(IndexError):
        train.gather(np.array([len(train) - 3]), 4)
    with pytest.raises(IndexError):
        train.read(-1, 3)
    manifest = json.loads((path / MANIFEST).read_text())
    manifest["version"] = 99
    (path / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="version 99"):
        PreparedData.open(path)


def test_stream_pickles_without_its_maps(tmp_path):
    import pickle

    path, streams = _prepare(tmp_path, {"train": _docs()})
    train = PreparedData.open(path).split("train")
    train.read(0, 10)
    copy = pickle.loads(pickle.dumps(train))
    assert isinstance(copy, TokenStream) and not copy._maps
    np.testing.assert_array_equal(copy.read(0, len(copy)), streams["train"])


def _mapped_kib(path) -> int:
    """Resident KiB of this process's mappings of ``path`` (/proc/self/smaps)."""
    total, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            fields = line.split()
            if "-" in fields[0] and len(fields) >= 5:  # a mapping's header line
                inside = fields[-1] == str(path)
            elif inside and fields[0] == "Rss:":
                total += int(fields[1])
    return total


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/smaps"), reason="needs Linux's /proc/self/smaps")
def test_reads_leave_no_shard_pages_in_the_resident_set(tmp_path):
    """A read copies its tokens out and drops the shard's pages from the process (they stay in the
    page cache): a run's resident memory does not grow with the windows it reads."""
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 300, size=4096) for _ in range(256)]  # 1M tokens, one 2 MiB shard
    path, streams = _prepare(tmp_path, {"train": docs}, shard_tokens=1 << 22)
    stream = PreparedData.open(path).split("train")
    offsets = rng.integers(0, len(stream) - 512, size=64)
    rows = stream.gather(offsets, 512)
    np.testing.assert_array_equal(rows, streams["train"][offsets[:, None] + np.arange(512)])
    np.testing.assert_array_equal(stream.read(1000, 300_000), streams["train"][1000:300_000])
    shard = (path / stream.entry["shards"][0]["file"]).resolve()
    assert _mapped_kib(shard) == 0
