"""Fetching a named corpus that is not on disk yet: checksum checked, written atomically.

`ensure_corpus` first looks where `locate_corpus` looks; only a missing file is downloaded,
into the first of those directories, and only if its URL is known here. The bytes are
checked against the recorded size and SHA-256 before they are renamed into place, so an
interrupted or wrong download never leaves a file that `locate_corpus` would accept.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from .._files import write_atomic
from .corpora import CORPORA, locate_corpus, search_dirs

URLS = {
    ("tinyshakespeare", "input"):
        "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
}


def fetch(url: str, timeout: float = 30.0) -> bytes:
    """The body at ``url`` (the one place that touches the network; tests replace it)."""
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
                             f"{spec.size} bytes with sha256 {spec.sha256}. Nothing was written.")
        target.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(target, body)
        return target
