"""Named text corpora: each one record (`Corpus`), registered here; found on disk and checked.

    register_corpus(Corpus("my-corpus", layout="folder", source="...", files={...}))
    load_splits("my-corpus")                 # minrnn.data.text: its train/valid[/test] text
    minrnn compare ... (a preset's ``corpus = "my-corpus"``), minrnn train --data my-corpus

A record says what the rest of the package needs, so nothing else names a corpus: its files
(split -> name, SHA-256, size; the splits whose checksums are known), its layout ("file": one
text file split by ``train_fraction`` into train and valid, as nanoGPT does; "folder": a folder of
train/valid[/test] files), where it comes from (``urls`` for files fetched as they are, ``hub``
for a Hugging Face dataset rebuilt into the original files) and whether the compare report adds
a perplexity column.

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
from dataclasses import dataclass, field
from pathlib import Path

LAYOUTS = ("file", "folder")


@dataclass(frozen=True)
class CorpusFile:
    name: str
    sha256: str
    size: int


@dataclass(frozen=True)
class HubSource:
    """A corpus held as parquet files on the Hugging Face hub, one row per line of the original
    files. ``splits``: split -> (the hub's split name, the original file's name, its SHA-1)."""

    repo: str
    config: str
    splits: dict[str, tuple[str, str, str]]

    @property
    def url(self) -> str:
        return f"https://huggingface.co/datasets/{self.repo}/tree/main/{self.config}"


@dataclass(frozen=True)
class Corpus:
    """One named corpus (see the module docstring). For the "file" layout ``files`` has one
    entry, "input"; for "folder" one per split whose checksum is known (maybe none)."""

    name: str
    layout: str
    source: str
    files: dict[str, CorpusFile] = field(default_factory=dict)
    urls: dict[str, str] = field(default_factory=dict)  # split -> URL of the file as it is
    hub: HubSource | None = None
    perplexity: bool = False  # the compare report adds exp(loss) beside the loss
    train_fraction: float = 0.9  # "file" layout: the first fraction of the characters trains

    def __post_init__(self):
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {self.layout!r}")
        if self.layout == "file" and set(self.files) != {"input"}:
            raise ValueError(f"files of a 'file' corpus must be {{'input': CorpusFile}}, got {sorted(self.files)}")
        if not 0 < self.train_fraction < 1:
            raise ValueError(f"train_fraction must be in (0, 1), got {self.train_fraction!r}")


CORPORA: dict[str, Corpus] = {}


def register_corpus(corpus: Corpus, replace: bool = False) -> Corpus:
    """Make ``corpus`` known by its name to training, `minrnn compare` presets and the report."""
    if not isinstance(corpus, Corpus):
        raise TypeError(f"corpus must be a Corpus, got {type(corpus).__name__}")
    if corpus.name in CORPORA and not replace:
        raise ValueError(f"corpus: {corpus.name!r} is registered already (replace=True to replace it)")
    CORPORA[corpus.name] = corpus
    return corpus


def get_corpus(name: str) -> Corpus:
    """The record of corpus ``name``; a KeyError naming the known ones."""
    try:
        return CORPORA[name]
    except KeyError:
        raise KeyError(f"unknown corpus {name!r}; known: {sorted(CORPORA)}") from None


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
    files = get_corpus(corpus).files
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


# --- the corpora shipped ------------------------------------------------------------------------

register_corpus(Corpus(
    "tinyshakespeare", "file", "Karpathy's tiny shakespeare (char-rnn, nanoGPT), split 90/10 like nanoGPT",
    files={"input": CorpusFile("input.txt", "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
                               1115394)},
    urls={"input": "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"}))

# WikiText (Merity et al. 2016) as the Hugging Face hub holds it: one parquet file (or a few
# shards) per split, one row per line of the original wiki.*.tokens. The SHA-1s are those
# published for the original files (GluonNLP's WikiText datasets); the SHA-256s are those of the
# valid and test files as distributed, so a rebuilt file is the original or an error.
_HUB_SPLITS = {"train": "train", "valid": "validation", "test": "test"}
register_corpus(Corpus(
    "wikitext-2", "folder", "WikiText-2 (Merity et al. 2016), from the Hugging Face hub (Salesforce/wikitext)",
    files={"valid": CorpusFile("valid.txt", "f0737ed31fc1329026e95cb8b98e19c2a182c39c240ab909dc31abf2f8af58e8",
                               1121681),
           "test": CorpusFile("test.txt", "d790b833ef8cf03a90db7bf1271b7520b83c45ce07ba3c1a9699df81e239eca0",
                              1256449)},
    hub=HubSource("Salesforce/wikitext", "wikitext-2-v1", {
        "train": (_HUB_SPLITS["train"], "wiki.train.tokens", "863f29c46ef9d167fff4940ec821195882fe29d1"),
        "valid": (_HUB_SPLITS["valid"], "wiki.valid.tokens", "0418625c8b4da6e4b5c7a0b9e78d4ae8f7ee5422"),
        "test": (_HUB_SPLITS["test"], "wiki.test.tokens", "c7b8ce0aa086fb34dab808c5c49224211eb2b172")}),
    perplexity=True))
register_corpus(Corpus(
    "wikitext-103", "folder", "WikiText-103 (Merity et al. 2016), from the Hugging Face hub (Salesforce/wikitext)",
    hub=HubSource("Salesforce/wikitext", "wikitext-103-v1", {
        "train": (_HUB_SPLITS["train"], "wiki.train.tokens", "b7497e2dfe77e72cfef5e3dbc61b7b53712ac211"),
        "valid": (_HUB_SPLITS["valid"], "wiki.valid.tokens", "c326ac59dc587676d58c422eb8a03e119582f92b"),
        "test": (_HUB_SPLITS["test"], "wiki.test.tokens", "8a5befc548865cec54ed4273cf87dbbad60d1e47")}),
    perplexity=True))
