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


# WikiText (Merity et al. 2016), as the Salesforce release distributes it: one zip per corpus
# holding wiki.{train,valid,test}.tokens. The SHA-1s are those published with GluonNLP's
# WikiText datasets; the valid and test SHA-1s of wikitext-2 match the files in the project's
# shared data. Only the SHA-1 of the train files is known, so SHA-1 is what is checked.
WIKITEXT = {
    "wikitext-2": {
        "url": "https://s3.amazonaws.com/research.metamind.io/wikitext/wikitext-2-v1.zip",
        "sha1": "3c914d17d80b1459be871a5039ac23e752a53cbe",
        "files": {"train": ("wiki.train.tokens", "863f29c46ef9d167fff4940ec821195882fe29d1"),
                  "valid": ("wiki.valid.tokens", "0418625c8b4da6e4b5c7a0b9e78d4ae8f7ee5422"),
                  "test": ("wiki.test.tokens", "c7b8ce0aa086fb34dab808c5c49224211eb2b172")},
    },
    "wikitext-103": {
        "url": "https://s3.amazonaws.com/research.metamind.io/wikitext/wikitext-103-v1.zip",
        "sha1": "0aec09a7537b58d4bb65362fee27650eeaba625a",
        "files": {"train": ("wiki.train.tokens", "b7497e2dfe77e72cfef5e3dbc61b7b53712ac211"),
                  "valid": ("wiki.valid.tokens", "c326ac59dc587676d58c422eb8a03e119582f92b"),
                  "test": ("wiki.test.tokens", "8a5befc548865cec54ed4273cf87dbbad60d1e47")},
    },
}


def download_wikitext(corpus: str, data_dir: str | os.PathLike | None = None) -> Path:
    """Fetch ``corpus``'s zip, check it and each split, and write ``<dir>/<corpus>/{train,valid,test}.txt``.

    The archive's and every member's SHA-1 are checked before anything is written; each
    file is written atomically. Returns the folder. Raises OSError (no network or HTTP
    error) or ValueError (a checksum differs).
    """
    import io
    import zipfile

    spec = WIKITEXT[corpus]
    body = fetch(spec["url"], timeout=300.0)
    digest = hashlib.sha1(body).hexdigest()
    if digest != spec["sha1"]:
        raise ValueError(f"download of {spec['url']} has sha1 {digest}, expected {spec['sha1']}. Nothing was written.")
    with zipfile.ZipFile(io.BytesIO(body)) as z:
        members = {Path(n).name: n for n in z.namelist()}
        texts = {}
        for split, (name, sha1) in spec["files"].items():
            if name not in members:
                raise ValueError(f"{spec['url']} holds no {name}. Nothing was written.")
            data = z.read(members[name])
            if hashlib.sha1(data).hexdigest() != sha1:
                raise ValueError(f"{name} in {spec['url']} does not have sha1 {sha1}. Nothing was written.")
            texts[split] = data
    folder = search_dirs(data_dir or None)[0] / corpus
    folder.mkdir(parents=True, exist_ok=True)
    for split, data in texts.items():
        write_atomic(folder / f"{split}.txt", data)
    return folder
