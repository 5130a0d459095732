"""Prepared token data ("shards"): the folder `minrnn prepare` writes and training reads.

A prepared folder DIR holds::

    DIR/manifest.json              written last, atomically: its presence means the folder is complete
    DIR/tokenizer/                 a transformers PreTrainedTokenizerFast folder (AutoTokenizer loads it)
    DIR/<split>-<NNNNN>.bin        raw little-endian token ids, uint16 when vocab_size <= 65536 else uint32
    DIR/<split>-<NNNNN>.docs.npy   int64 (documents,): where each document of that shard starts, as an
                                   offset in tokens from the start of that shard

A split's token stream is its shards concatenated in order; documents never span shards. Each
document is stored as ``[boundary] + tokens(document)`` when the folder has a boundary token
(``boundary_token_id`` in the manifest), else as its tokens alone.

Writing: `ShardWriter` appends documents to one split's shards, closing a shard after the
document that brings it to ``shard_tokens``, and hashes every file as it writes it;
`write_manifest` writes the manifest atomically. Reading: `PreparedData.open(DIR)` checks the
manifest against the files (sizes always, SHA-256 with ``verify``); `PreparedData.split(name)`
gives a `TokenStream` whose reads go through ``numpy.memmap``, so resident memory does not grow
with the corpus.
"""

from __future__ import annotations

import hashlib
import io
import json
import mmap
import os
import re
from pathlib import Path

import numpy as np

from .._files import write_atomic
from .corpora import sha256_of
from .text import DataError

__all__ = ["FORMAT", "MANIFEST", "TOKENIZER_DIR", "VERSION", "PreparedData", "ShardWriter", "TokenStream",
           "is_prepared", "read_manifest", "shard_name", "token_dtype", "write_manifest"]

FORMAT = "minrnn-prepared"
VERSION = 1
MANIFEST = "manifest.json"
TOKENIZER_DIR = "tokenizer"
DEFAULT_SHARD_TOKENS = 2**27
# what a shard's files are called: <split>-<NNNNN>.bin and .docs.npy
SHARD_FILE = re.compile(r"^[A-Za-z0-9_]+-\d{5}\.(bin|docs\.npy)$")
_BUFFER_BYTES = 1 << 22


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id of a ``vocab_size`` vocabulary fits, else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def shard_name(split: str, index: int) -> str:
    """The ``.bin`` file name of shard ``index`` of ``split`` (its index is ``.docs.npy`` beside it)."""
    return f"{split}-{index:05d}.bin"


def is_prepared(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a complete prepared folder (its manifest exists)."""
    return (Path(path) / MANIFEST).is_file()


# --- writing -----------------------------------------------------------------------------------

class ShardWriter:
    """Writes one split's documents into shards in ``directory``.

        writer = ShardWriter(directory, "train", np.uint16, shard_tokens=2**27)
        writer.add(np.array([eos, 5, 6, 7]))        # one document's ids, boundary included
        entry = writer.finish()                     # the split's manifest entry

    A shard is closed (flushed, fsynced, its ``.docs.npy`` written) after the document that
    brings it to ``shard_tokens`` tokens, so documents never span shards. The SHA-256 of every
    file is computed from the bytes as they are written, not by reading the file back.
    """

    def __init__(self, directory: str | os.PathLike, split: str, dtype, shard_tokens: int = DEFAULT_SHARD_TOKENS):
        if not re.fullmatch(r"[A-Za-z0-9_]+", split):
            raise ValueError(f"split name must be letters, digits or _, got {split!r}")
        if shard_tokens < 1:
            raise ValueError(f"shard_tokens must be positive, got {shard_tokens}")
        self.directory = Path(directory)
        self.split = split
        self.dtype = np.dtype(dtype)
        self.shard_tokens = int(shard_tokens)
        self.shards: list[dict] = []
        self._file = None
        self._finished = False

    def add(self, tokens) -> None:
        """Append one document: its ids (1-D, any integer dtype; boundary token included)."""
        tokens = np.asarray(tokens)
        self.add_many(tokens, np.array([tokens.size], dtype=np.int64))

    def add_many(self, tokens, lengths) -> None:
        """Append several documents at once: ``tokens`` (N,) their ids concatenated, ``lengths``
        (documents,) how many ids each has (zero-length documents are skipped)."""
        if self._finished:
            raise RuntimeError("ShardWriter.add after finish")
        tokens = np.asarray(tokens).reshape(-1)
        lengths = np.asarray(lengths, dtype=np.int64).reshape(-1)
        if int(lengths.sum()) != tokens.size:
            raise ValueError(f"lengths sum to {int(lengths.sum())} but {tokens.size} tokens were given")
        if tokens.size and (tokens.min() < 0 or int(tokens.max()) > np.iinfo(self.dtype).max):
            raise ValueError(f"token ids must lie in [0, {np.iinfo(self.dtype).max}] for {self.dtype.name} shards")
        lengths = lengths[lengths > 0]
        data = tokens.astype(self.dtype, copy=False)
        pos = 0
        while lengths.size:
            if self._file is None:
                self._open_shard()
            # the documents up to and including the first that brings the shard to shard_tokens
            ends = self._tokens + np.cumsum(lengths)
            k = int(np.searchsorted(ends, self.shard_tokens, side="left")) + 1
            k = min(k, lengths.size)
            n = int(ends[k - 1] - self._tokens)
            starts = self._tokens + np.concatenate(([0], np.cumsum(lengths[:k - 1])))
            self._doc_starts.append(starts)
            chunk = data[pos:pos + n]
            self._write(chunk)
            self._tokens += n
            self._documents += k
            pos += n
            lengths = lengths[k:]
            if self._tokens >= self.shard_tokens:
                self._close_shard()

    def finish(self) -> dict:
        """Close the last shard; the split's manifest entry:
        ``{"tokens", "documents", "shards": [{"file", "docs", "tokens", "documents", "sha256", "docs_sha256"}]}``."""
        if not self._finished:
            if self._file is not None:
                self._close_shard()
            self._finished = True
        return {"tokens": sum(s["tokens"] for s in self.shards),
                "documents": sum(s["documents"] for s in self.shards),
                "shards": list(self.shards)}

    def abort(self) -> None:
        """Close the open shard's file without recording it (its partial file stays for the caller to remove)."""
        if self._file is not None:
            self._file.close()
            self._file = None
        self._finished = True

    def _open_shard(self) -> None:
        self._name = shard_name(self.split, len(self.shards))
        self._file = open(self.directory / self._name, "wb", buffering=_BUFFER_BYTES)
        self._hash = hashlib.sha256()
        self._tokens = 0
        self._documents = 0
        self._doc_starts: list[np.ndarray] = []

    def _write(self, chunk: np.ndarray) -> None:
        # little-endian on disk whatever the machine's order
        raw = chunk.astype(chunk.dtype.newbyteorder("<"), copy=False).tobytes()
        self._hash.update(raw)
        self._file.write(raw)

    def _close_shard(self) -> None:
        f, self._file = self._file, None
        f.flush()
        os.fsync(f.fileno())
        f.close()
        buf = io.BytesIO()
        np.save(buf, np.concatenate(self._doc_starts).astype(np.int64), allow_pickle=False)
        docs_name = self._name[:-len(".bin")] + ".docs.npy"
        write_atomic(self.directory / docs_name, buf.getvalue())
        self.shards.append({"file": self._name, "docs": docs_name, "tokens": int(self._tokens),
                            "documents": int(self._documents), "sha256": self._hash.hexdigest(),
                            "docs_sha256": hashlib.sha256(buf.getvalue()).hexdigest()})


def write_manifest(directory: str | os.PathLike, manifest: dict) -> None:
    """Write ``directory/manifest.json`` atomically (temporary file, fsync, os.replace)."""
    data = (json.dumps(manifest, indent=2, sort_keys=False) + "\n").encode("utf-8")
    write_atomic(Path(directory) / MANIFEST, data)


def read_manifest(directory: str | os.PathLike) -> dict:
    """The manifest of a prepared folder, its format checked; DataError (one line) when it is
    missing, unreadable or of another format or version."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise DataError(f"{directory} is not a prepared data folder: it has no {MANIFEST} "
                        "(make one with minrnn prepare)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DataError(f"{path} cannot be read ({' '.join(str(e).split())[:200]}): damaged") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise DataError(f"{path} is not a {FORMAT} manifest")
    if manifest.get("version") != VERSION:
        raise DataError(f"{path} has format version {manifest.get('version')!r}; this minrnn reads version {VERSION}")
    try:
        np.dtype(manifest["dtype"])
        int(manifest["vocab_size"])
        for split in manifest["splits"].values():
            for shard in split["shards"]:
                int(shard["tokens"]), int(shard["documents"]), str(shard["file"]), str(shard["docs"])
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise DataError(f"{path} lacks a field or has a malformed one ({type(e).__name__}: {e}): damaged") from None
    return manifest


# --- reading -----------------------------------------------------------------------------------

class PreparedData:
    """A prepared folder, opened for reading.

        data = PreparedData.open("data/owt")      # checks every shard's size and SHA-256
        train = data.split("train")               # a TokenStream
        x = train.gather(offsets, 257)            # (len(offsets), 257) int64
    """

    def __init__(self, path: Path, manifest: dict):
        self.path = Path(path)
        self.manifest = manifest
        self._streams: dict[str, TokenStream] = {}

    @classmethod
    def open(cls, path: str | os.PathLike, verify: bool = True) -> PreparedData:
        """Read ``path``'s manifest and check each shard against it: the file exists and holds
        ``tokens * itemsize`` bytes and its index ``documents`` entries; with ``verify`` also the
        SHA-256 of both files. DataError, one line naming the file, on any mismatch."""
        path = Path(path)
        manifest = read_manifest(path)
        itemsize = np.dtype(manifest["dtype"]).itemsize
        for split in manifest["splits"].values():
            for shard in split["shards"]:
                _check_file(path / shard["file"], shard["tokens"] * itemsize, shard.get("sha256") if verify else None)
                _check_file(path / shard["docs"], None, shard.get("docs_sha256") if verify else None)
                docs = _load_docs(path / shard["docs"])
                if docs.shape != (shard["documents"],):
                    raise DataError(f"{path / shard['docs']} holds {docs.shape} entries, the manifest says "
                                    f"{shard['documents']}: damaged (run minrnn prepare again)")
        return cls(path, manifest)

    @property
    def vocab_size(self) -> int:
        """What the model's embedding must hold: every id of the shards is below it."""
        return int(self.manifest["vocab_size"])

    @property
    def boundary_token_id(self) -> int | None:
        """The id that starts every document, or None (documents are then only in the index)."""
        b = self.manifest.get("boundary_token_id")
        return None if b is None else int(b)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.manifest["dtype"])

    @property
    def splits(self) -> tuple[str, ...]:
        return tuple(self.manifest["splits"])

    @property
    def tokenizer_dir(self) -> Path:
        """The PreTrainedTokenizerFast folder (``AutoTokenizer.from_pretrained`` reads it)."""
        return self.path / self.manifest.get("tokenizer", {}).get("dir", TOKENIZER_DIR)

    def split(self, name: str) -> TokenStream:
        """The token stream of split ``name``; DataError naming the splits there are if absent."""
        if name not in self.manifest["splits"]:
            raise DataError(f"{self.path} has no {name!r} split; it has {', '.join(self.splits) or 'none'}")
        if name not in self._streams:
            self._streams[name] = TokenStream(self.path, self.manifest["splits"][name], self.dtype)
        return self._streams[name]

    def __repr__(self) -> str:
        parts = ", ".join(f"{s}={len(self.split(s))}" for s in self.splits)
        return f"PreparedData({str(self.path)!r}, vocab_size={self.vocab_size}, tokens: {parts})"


def _check_file(path: Path, size: int | None, sha256: str | None) -> None:
    if not path.is_file():
        raise DataError(f"{path} is missing: the prepared folder is incomplete (run minrnn prepare again)")
    actual = path.stat().st_size
    if size is not None and actual != size:
        raise DataError(f"{path} holds {actual} bytes, the manifest says {size}: damaged or truncated "
                        "(run minrnn prepare again)")
    if sha256 is not None and sha256_of(path) != sha256:
        raise DataError(f"{path} does not match its SHA-256 in the manifest: damaged (run minrnn prepare again)")


def _load_docs(path: Path) -> np.ndarray:
    try:
        docs = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as e:
        raise DataError(f"{path} cannot be read as a .npy index ({' '.join(str(e).split())[:200]}): damaged") from None
    if docs.ndim != 1 or docs.dtype != np.int64:
        raise DataError(f"{path} is not a 1-D int64 index: damaged")
    return docs


class TokenStream:
    """One split's tokens: its shards concatenated, read through memory maps.

    ``len(stream)`` is its number of tokens, ``stream.documents`` its number of documents.
    Every read returns int64 arrays; offsets are positions in the split's whole stream. The
    memory maps are opened on first use, so a stream can be handed to forked workers.
    """

    def __init__(self, root: Path, entry: dict, dtype):
        self.root = Path(root)
        self.entry = entry
        self.dtype = np.dtype(dtype).newbyteorder("<")
        self._shards = entry["shards"]
        sizes = np.array([s["tokens"] for s in self._shards], dtype=np.int64)
        # starts[i]: offset of shard i in the stream; starts[-1]: the stream's length
        self.starts = np.concatenate(([0], np.cumsum(sizes))).astype(np.int64)
        self.documents = int(sum(s["documents"] for s in self._shards))
        self._maps: dict[int, np.ndarray] = {}
        self._mmaps: dict[int, mmap.mmap] = {}
        self._docs: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_maps"], state["_mmaps"], state["_docs"] = {}, {}, {}  # memory maps are reopened where used
        return state

    def _map(self, i: int) -> np.ndarray:
        m = self._maps.get(i)
        if m is None:
            with open(self.root / self._shards[i]["file"], "rb") as f:
                if os.fstat(f.fileno()).st_size == 0:  # mmap refuses an empty file
                    m = self._maps[i] = np.empty(0, dtype=self.dtype)
                    return m
                self._mmaps[i] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            m = self._maps[i] = np.frombuffer(self._mmaps[i], dtype=self.dtype)
        return m

    def _release(self, i: int) -> None:
        """Drop shard ``i``'s pages from this process's resident set (they stay in the page cache).

        A read faults in the whole page-cache block around it (hundreds of KiB), and mapped pages
        count in the resident set until unmapped: without this, a run's RSS would grow with every
        window it reads, up to the size of the shards."""
        mm = self._mmaps.get(i)
        if mm is not None and hasattr(mmap, "MADV_DONTNEED"):
            mm.madvise(mmap.MADV_DONTNEED)

    def _doc_index(self, i: int) -> np.ndarray:
        d = self._docs.get(i)
        if d is None:
            d = self._docs[i] = _load_docs(self.root / self._shards[i]["docs"])
        return d

    def read(self, start: int, stop: int) -> np.ndarray:
        """Tokens ``[start, stop)`` of the stream, across shard borders: (stop - start,) int64."""
        start, stop = int(start), int(stop)
        if not 0 <= start <= stop <= len(self):
            raise IndexError(f"read({start}, {stop}) outside the stream's [0, {len(self)}]")
        out = np.empty(stop - start, dtype=np.int64)
        if stop == start:
            return out
        first = int(np.searchsorted(self.starts, start, side="right")) - 1
        pos = start
        i = first
        while pos < stop:
            lo = pos - int(self.starts[i])
            hi = min(stop, int(self.starts[i + 1])) - int(self.starts[i])
            out[pos - start:pos - start + hi - lo] = self._map(i)[lo:hi]
            self._release(i)
            pos += hi - lo
            i += 1
        return out

    def gather(self, offsets, length: int) -> np.ndarray:
        """Rows ``tokens[o : o + length]`` for each ``o`` of ``offsets``: (len(offsets), length) int64.

        Rows inside one shard are read with one fancy index per shard; the rare row that
        crosses a shard border is read on its own."""
        offsets = np.asarray(offsets, dtype=np.int64).reshape(-1)
        length = int(length)
        if length < 0:
            raise ValueError(f"length must be >= 0, got {length}")
        out = np.empty((offsets.size, length), dtype=np.int64)
        if offsets.size == 0 or length == 0:
            return out
        bad = (offsets < 0) | (offsets + length > len(self))
        if bad.any():
            o = int(offsets[bad][0])
            raise IndexError(f"gather: row [{o}, {o + length}) lies outside the stream's [0, {len(self)}]")
        shard = np.searchsorted(self.starts, offsets, side="right") - 1
        inside = offsets + length <= self.starts[shard + 1]
        cols = np.arange(length, dtype=np.int64)
        for i in np.unique(shard[inside]):
            rows = np.flatnonzero(inside & (shard == i))
            local = offsets[rows] - self.starts[i]
            out[rows] = self._map(int(i))[local[:, None] + cols]
            self._release(int(i))
        for r in np.flatnonzero(~inside):
            out[r] = self.read(offsets[r], offsets[r] + length)
        return out

    def document_starts(self, start: int, stop: int) -> np.ndarray:
        """Start offsets (stream positions, int64, ascending) of the documents that begin in ``[start, stop)``."""
        start, stop = max(int(start), 0), min(int(stop), len(self))
        if start >= stop:
            return np.empty(0, dtype=np.int64)
        first = int(np.searchsorted(self.starts, start, side="right")) - 1
        last = int(np.searchsorted(self.starts, stop, side="left")) - 1
        parts = []
        for i in range(first, last + 1):
            docs = self._doc_index(i)
            base = int(self.starts[i])
            lo, hi = np.searchsorted(docs, [start - base, stop - base], side="left")
            parts.append(np.asarray(docs[lo:hi], dtype=np.int64) + base)
        return np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)

    def all_document_starts(self) -> np.ndarray:
        """Start offsets of every document of the stream: (documents,) int64."""
        if not self._shards:
            return np.empty(0, dtype=np.int64)
        return np.concatenate([np.asarray(self._doc_index(i), dtype=np.int64) + int(self.starts[i])
                               for i in range(len(self._shards))])

    def __repr__(self) -> str:
        return f"TokenStream({len(self)} tokens, {self.documents} documents, {len(self._shards)} shards)"
