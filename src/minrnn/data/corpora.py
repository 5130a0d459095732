"""Named text corpora, found on disk and checked against their known SHA-256.

Where files are looked for, in order:
  1. ``data_dir`` passed by the caller (a flag such as ``--data-dir``);
  2. the environment variable ``MINRNN_DATA_DIR``;
  3. ``~/.cache/minrnn/data``.
Each directory holds ``<corpus>/<file>``, e.g. ``tinyshakespeare/input.txt``.
A file whose checksum differs is an error, not a silent substitute.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class CorpusFile:
    name: str
    sha256: str
    size: int


CORPORA: dict[str, dict[str, CorpusFile]] = {
    # Karpathy's tiny shakespeare (char-rnn, nanoGPT): 1,115,394 bytes
    "tinyshakespeare": {
        "input": CorpusFile("input.txt", "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed", 1115394),
    },
    # WikiText-2 (tokenised, as distributed): only valid and test are kept offline here
    "wikitext-2": {
        "valid": CorpusFile("valid.txt", "f0737ed31fc1329026e95cb8b98e19c2a182c39c240ab909dc31abf2f8af58e8", 1121681),
        "test": CorpusFile("test.txt", "d790b833ef8cf03a90db7bf1271b7520b83c45ce07ba3c1a9699df81e239eca0", 1256449),
    },
}


def search_dirs(data_dir: str | os.PathLike | None = None) -> list[Path]:
    dirs = []
    if data_dir is not None:
        dirs.append(Path(data_dir))
    if os.environ.get("MINRNN_DATA_DIR"):
        dirs.append(Path(os.environ["MINRNN_DATA_DIR"]))
    dirs.append(Path.home() / ".cache" / "minrnn" / "data")
    return dirs


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def locate_corpus(corpus: str, split: str, data_dir: str | os.PathLike | None = None) -> Path:
    """Path of ``split`` of ``corpus`` after checking its size and SHA-256.

    Raises KeyError for an unknown corpus or split, FileNotFoundError naming every
    place looked in, ValueError for a file whose checksum does not match.
    """
    if corpus not in CORPORA:
        raise KeyError(f"unknown corpus {corpus!r}; known: {sorted(CORPORA)}")
    files = CORPORA[corpus]
    if split not in files:
        raise KeyError(f"corpus {corpus!r} has no split {split!r} here; available: {sorted(files)}")
    spec = files[split]
    tried = []
    for d in search_dirs(data_dir):
        path = d / corpus / spec.name
        tried.append(str(path))
        if path.is_file():
            digest = sha256_of(path)
            if digest != spec.sha256:
                raise ValueError(f"{path} has sha256 {digest}, expected {spec.sha256} "
                                 f"({spec.size} bytes): a different or damaged file")
            return path
    raise FileNotFoundError(
        f"{corpus}/{spec.name} not found; looked in: {', '.join(tried)}. "
        "Put the file in one of these places, or point MINRNN_DATA_DIR (or --data-dir) at a "
        f"directory holding {corpus}/{spec.name}."
    )
