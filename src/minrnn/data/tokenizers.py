"""Tokenizers for training: characters, bytes, or BPE (HF ``tokenizers``), saved with a run.

Each has ``encode(text) -> list[int]``, ``decode(ids) -> str``, ``vocab_size``, ``save(dir)``
and a ``unit`` ("char", "byte" or "token") naming what one id stands for. `load_tokenizer`
reads back whichever one a run directory holds (``tokenizer.json``).
"""

from __future__ import annotations

import json
from pathlib import Path

FILE = "tokenizer.json"


class VocabularyError(ValueError):
    """Text holds symbols the tokenizer cannot encode (the message names them)."""


class CharTokenizer:
    """One id per character of a fixed alphabet (built from the corpus, sorted)."""

    kind = "char"
    unit = "char"

    def __init__(self, chars: list[str]):
        self.chars = list(chars)
        self.index = {c: i for i, c in enumerate(self.chars)}

    @classmethod
    def train(cls, text: str) -> "CharTokenizer":
        return cls(sorted(set(text)))

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> list[int]:
        try:
            return [self.index[c] for c in text]
        except KeyError:
            missing = sorted(set(text) - set(self.index))
            raise VocabularyError(
                f"{len(missing)} character(s) not in the vocabulary: "
                + ", ".join(repr(c) for c in missing)
            ) from None

    def decode(self, ids) -> str:
        return "".join(self.chars[i] for i in ids)

    def save(self, directory: Path) -> None:
        _write_json(Path(directory) / FILE, {"kind": self.kind, "chars": self.chars})


class ByteTokenizer:
    """UTF-8 bytes: 256 ids, any text encodes."""

    kind = "byte"
    unit = "byte"
    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(ids).decode("utf-8", errors="replace")

    def save(self, directory: Path) -> None:
        _write_json(Path(directory) / FILE, {"kind": self.kind})


class BPETokenizer:
    """Byte-level BPE trained with HF ``tokenizers`` on the training split."""

    kind = "bpe"
    unit = "token"

    def __init__(self, tok):
        self.tok = tok

    @classmethod
    def train(cls, text: str, vocab_size: int) -> "BPETokenizer":
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        # one "document" per line keeps the trainer's memory use flat on a large corpus
        tok.train_from_iterator(text.splitlines(keepends=True), trainer=trainer)
        return cls(tok)

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text).ids

    def decode(self, ids) -> str:
        return self.tok.decode(list(ids))

    def save(self, directory: Path) -> None:
        directory = Path(directory)
        self.tok.save(str(directory / "bpe.json"))
        _write_json(directory / FILE, {"kind": self.kind, "file": "bpe.json"})


def build_tokenizer(kind: str, train_text: str, bpe_vocab_size: int = 8192):
    if kind == "char":
        return CharTokenizer.train(train_text)
    if kind == "byte":
        return ByteTokenizer()
    if kind == "bpe":
        return BPETokenizer.train(train_text, bpe_vocab_size)
    raise ValueError(f"tokenizer must be char, byte or bpe, got {kind!r}")


def load_tokenizer(directory: str | Path):
    directory = Path(directory)
    path = directory / FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: not a training run directory?")
    spec = json.loads(path.read_text())
    if spec["kind"] == "char":
        return CharTokenizer(spec["chars"])
    if spec["kind"] == "byte":
        return ByteTokenizer()
    if spec["kind"] == "bpe":
        from tokenizers import Tokenizer

        return BPETokenizer(Tokenizer.from_file(str(directory / spec["file"])))
    raise ValueError(f"{path}: unknown tokenizer kind {spec['kind']!r}")


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, ensure_ascii=False))
