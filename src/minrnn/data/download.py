"""Fetching a named corpus that is not on disk yet: checksum checked, written atomically.

`ensure_corpus` first looks where `locate_corpus` looks; only a missing file is downloaded,
into the first of those directories, and only if its URL is known here. The bytes are
checked against the recorded size and SHA-256 before they are renamed into place, so an
interrupted or wrong download never leaves a file that `locate_corpus` would accept.

WikiText-2/103 come from the Hugging Face hub (`Salesforce/wikitext`, its parquet files,
fetched with `huggingface_hub` and its progress bars); `download_wikitext` rebuilds the
original ``wiki.*.tokens`` files from them and checks each against its published SHA-1.
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

from .._files import fsync_dir, temporary_file_beside, write_atomic
from .corpora import CORPORA, locate_corpus, search_dirs

URLS = {
    ("tinyshakespeare", "input"):
        "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
}


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
        url = URLS.get((corpus, split))
        if url is None:
            raise
        spec = CORPORA[corpus][split]
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


# WikiText (Merity et al. 2016) as the Hugging Face hub holds it: one parquet file (or a few
# shards) per split, one row per line of the original wiki.*.tokens. The SHA-1s are those
# published for the original files (GluonNLP's WikiText datasets); the valid and test SHA-1s
# of wikitext-2 match the project's shared data, so a rebuilt file is the original or an error.
HUB_REPO = "Salesforce/wikitext"
HUB_SPLITS = {"train": "train", "valid": "validation", "test": "test"}
WIKITEXT = {
    "wikitext-2": {
        "config": "wikitext-2-v1",
        "url": f"https://huggingface.co/datasets/{HUB_REPO}/tree/main/wikitext-2-v1",
        "files": {"train": ("wiki.train.tokens", "863f29c46ef9d167fff4940ec821195882fe29d1"),
                  "valid": ("wiki.valid.tokens", "0418625c8b4da6e4b5c7a0b9e78d4ae8f7ee5422"),
                  "test": ("wiki.test.tokens", "c7b8ce0aa086fb34dab808c5c49224211eb2b172")},
    },
    "wikitext-103": {
        "config": "wikitext-103-v1",
        "url": f"https://huggingface.co/datasets/{HUB_REPO}/tree/main/wikitext-103-v1",
        "files": {"train": ("wiki.train.tokens", "b7497e2dfe77e72cfef5e3dbc61b7b53712ac211"),
                  "valid": ("wiki.valid.tokens", "c326ac59dc587676d58c422eb8a03e119582f92b"),
                  "test": ("wiki.test.tokens", "8a5befc548865cec54ed4273cf87dbbad60d1e47")},
    },
}


def hub_snapshot(corpus: str) -> Path:
    """The local folder holding ``corpus``'s parquet files, downloaded from the hub (with progress bars) if needed.

    Raises OSError with a one-line message when the hub cannot be reached or the files are missing.
    """
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise OSError("downloading WikiText needs huggingface_hub: pip install 'minrnn[train]'") from None
    config = WIKITEXT[corpus]["config"]
    print(f"minrnn: downloading {corpus} from the Hugging Face hub ({HUB_REPO}, {config})", file=sys.stderr)
    try:
        folder = snapshot_download(repo_id=HUB_REPO, repo_type="dataset", allow_patterns=[f"{config}/*.parquet"])
    except Exception as e:  # offline, DNS failure, HTTP error: the first line of what the hub said is enough
        first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise OSError(f"could not download {HUB_REPO}/{config} from the Hugging Face hub: {first_line}") from None
    return Path(folder) / config


def _parquet_rows(paths: list[Path]):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise OSError("reading the hub's WikiText files needs pyarrow: pip install 'minrnn[train]'") from None
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


def download_wikitext(corpus: str, data_dir: str | os.PathLike | None = None) -> Path:
    """Fetch ``corpus`` from the hub, check every split and write ``<dir>/<corpus>/{train,valid,test}.txt``.

    Each split is rebuilt from its parquet rows and checked against the original file's SHA-1
    before anything is renamed into place. Returns the folder. Raises OSError (no network,
    missing files) or ValueError (a checksum differs).
    """
    if corpus not in WIKITEXT:
        raise KeyError(f"unknown WikiText corpus {corpus!r}; known: {sorted(WIKITEXT)}")
    spec = WIKITEXT[corpus]
    source = hub_snapshot(corpus)
    folder = search_dirs(data_dir or None)[0] / corpus
    folder.mkdir(parents=True, exist_ok=True)
    ready = {}
    try:
        for split, (_, sha1) in spec["files"].items():
            shards = sorted(source.glob(f"{HUB_SPLITS[split]}-*.parquet"))
            if not shards:
                raise OSError(f"{HUB_REPO}/{spec['config']} has no {HUB_SPLITS[split]} parquet file")
            ready[split] = _rebuild_split(_parquet_rows(shards), folder / f"{split}.txt", sha1,
                                          f"{spec['config']}/{HUB_SPLITS[split]}")
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
