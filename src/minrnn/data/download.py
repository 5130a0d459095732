"""Fetching a named corpus that is not on disk yet: checksum checked, written atomically.

What to fetch is the corpus record's (minrnn.data.corpora): `ensure_corpus` first looks where
`locate_corpus` looks; only a missing file is downloaded, into the first of those directories,
and only if the record has its URL (``urls``). The bytes are checked against the recorded size
and SHA-256 before they are renamed into place, so an interrupted or wrong download never leaves
a file that `locate_corpus` would accept.

A record with a ``hub`` source (WikiText-2/103: `Salesforce/wikitext`) is fetched as the hub's
parquet files (with `huggingface_hub` and its progress bars); `download_from_hub` rebuilds the
original files from them and checks each against its published SHA-1.
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

from .._files import fsync_dir, temporary_file_beside, write_atomic
from .corpora import CORPORA, get_corpus, locate_corpus, search_dirs


def fetch(url: str, timeout: float = 30.0) -> bytes:
    """The body at ``url`` (the one place that touches the network for plain URLs; tests replace it)."""
    from urllib.request import urlopen

    with urlopen(url, timeout=timeout) as r:
        return r.read()


def ensure_corpus(corpus: str, split: str, data_dir: str | os.PathLike | None = None) -> Path:
    """The checked path of ``split`` of ``corpus``, downloading it first if it is missing."""
    try:
        return locate_corpus(corpus, split, data_dir or None)
    except FileNotFoundError as missing:
        url = CORPORA[corpus].urls.get(split)
        if url is None:
            raise
        spec = CORPORA[corpus].files[split]
        target = search_dirs(data_dir or None)[0] / corpus / spec.name
        try:
            body = fetch(url)
        except Exception as e:  # no network, HTTP error, DNS failure: all say the same to the user
            raise FileNotFoundError(f"{missing} Downloading {url} failed too: {e}") from None
        digest = hashlib.sha256(body).hexdigest()
        if len(body) != spec.size or digest != spec.sha256:
            raise ValueError(f"download of {url} gave {len(body)} bytes with sha256 {digest}; expected "
                             f"{spec.size} bytes with sha256 {spec.sha256}. Nothing was written.") from None
        target.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(target, body)
        return target


def _hub_of(corpus: str):
    hub = get_corpus(corpus).hub
    if hub is None:
        raise KeyError(f"corpus {corpus!r} has no Hugging Face hub source; those with one: "
                       f"{sorted(n for n, c in CORPORA.items() if c.hub is not None)}")
    return hub


def hub_snapshot(corpus: str) -> Path:
    """The local folder holding ``corpus``'s parquet files, downloaded from the hub (with progress bars) if needed.

    Raises OSError with a one-line message when the hub cannot be reached or the files are missing.
    """
    hub = _hub_of(corpus)
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise OSError(f"downloading {corpus} needs huggingface_hub: pip install 'minrnn[train]'") from None
    print(f"minrnn: downloading {corpus} from the Hugging Face hub ({hub.repo}, {hub.config})", file=sys.stderr)
    try:
        folder = snapshot_download(repo_id=hub.repo, repo_type="dataset", allow_patterns=[f"{hub.config}/*.parquet"])
    except Exception as e:  # offline, DNS failure, HTTP error: the first line of what the hub said is enough
        first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise OSError(f"could not download {hub.repo}/{hub.config} from the Hugging Face hub: {first_line}") from None
    return Path(folder) / hub.config


def _parquet_rows(paths: list[Path]):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise OSError("reading the hub's parquet files needs pyarrow: pip install 'minrnn[train]'") from None
    for path in paths:
        for batch in pq.ParquetFile(path).iter_batches(columns=["text"]):
            yield from batch.column(0).to_pylist()


def _rebuild_split(rows, target: Path, sha1: str, source: str) -> Path:
    """Write the rows as the original file beside ``target`` (a blank line, " \\n", is an empty row on the hub)."""
    h = hashlib.sha1()
    fd, tmp = temporary_file_beside(target)
    try:
        with os.fdopen(fd, "wb") as f:
            for row in rows:
                data = (row or " \n").encode("utf-8")
                h.update(data)
                f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if h.hexdigest() != sha1:
            raise ValueError(f"{source} rebuilt has sha1 {h.hexdigest()}, expected {sha1}. Nothing was written.")
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Path(tmp)


def download_from_hub(corpus: str, data_dir: str | os.PathLike | None = None) -> Path:
    """Fetch ``corpus`` (a record with a ``hub`` source) from the hub, check every split and write
    ``<dir>/<corpus>/{train,valid,test}.txt``.

    Each split is rebuilt from its parquet rows and checked against the original file's SHA-1
    before anything is renamed into place. Returns the folder. Raises OSError (no network,
    missing files) or ValueError (a checksum differs).
    """
    hub = _hub_of(corpus)
    source = hub_snapshot(corpus)
    folder = search_dirs(data_dir or None)[0] / corpus
    folder.mkdir(parents=True, exist_ok=True)
    ready = {}
    try:
        for split, (hub_split, _, sha1) in hub.splits.items():
            shards = sorted(source.glob(f"{hub_split}-*.parquet"))
            if not shards:
                raise OSError(f"{hub.repo}/{hub.config} has no {hub_split} parquet file")
            ready[split] = _rebuild_split(_parquet_rows(shards), folder / f"{split}.txt", sha1,
                                          f"{hub.config}/{hub_split}")
    except BaseException:
        for tmp in ready.values():
            tmp.unlink(missing_ok=True)
        if not any(folder.iterdir()):
            folder.rmdir()
        raise
    for split, tmp in ready.items():
        os.replace(tmp, folder / f"{split}.txt")
    fsync_dir(folder)
    return folder
