"""Tokenizers for training: characters, bytes, or BPE (HF ``tokenizers``), saved with a run.

Each has ``encode(text) -> list[int]``, ``decode(ids) -> str``, ``vocab_size``, ``save(dir)``,
``to_hf()`` (the same mapping as a ``tokenizers.Tokenizer``), a ``kind`` and a ``unit`` ("char",
"byte" or "token") naming what one id stands for. `HFTokenizer` gives any transformers fast
tokenizer (an ``AutoTokenizer`` name or folder, or one of the above with an end-of-text token
added, as `minrnn prepare` writes) the same interface; `load_prepared_tokenizer` opens the
tokenizer of a prepared folder.

On disk a tokenizer is what transformers reads: ``tokenizer.json`` in the ``tokenizers``
format plus ``tokenizer_config.json``, so ``AutoTokenizer.from_pretrained(dir)`` gives a fast
tokenizer with the same ids. `load_tokenizer` reads that, and the format of earlier versions
(``{"kind": ...}`` in ``tokenizer.json``, BPE merges in ``bpe.json``).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from .._files import write_atomic

FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
# the end-of-text token added to a tokenizer that has none (GPT-2's spelling)
BOUNDARY_TOKEN = "<|endoftext|>"
# tokenizer_config.json key naming the project's kind of a saved HFTokenizer (char, byte, bpe, pretrained)
KIND_KEY = "minrnn_kind"


class VocabularyError(ValueError):
    """Text holds symbols the tokenizer cannot encode (the message names them)."""


class TokenizerError(ValueError):
    """A tokenizer file that cannot be read or written (the message names the file)."""


class CharTokenizer:
    """One id per character of a fixed alphabet (built from the corpus, sorted).

    Text with a character outside the alphabet is an error (VocabularyError here; the
    ``tokenizers`` form raises too, as it has no unknown token), never a silent substitute.
    """

    kind = "char"
    unit = "char"

    def __init__(self, chars: list[str]):
        self.chars = list(chars)
        self.index = {c: i for i, c in enumerate(self.chars)}

    @classmethod
    def train(cls, text: str) -> CharTokenizer:
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

    def to_hf(self):
        from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

        # every character its own word (newlines too, hence [\s\S]), words joined without spaces
        tok = Tokenizer(models.WordLevel(dict(self.index), unk_token=None))
        tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
        tok.decoder = decoders.Fuse()
        return tok

    def save(self, directory: Path) -> None:
        save_hf(self, directory)


def byte_symbols() -> list[str]:
    """The printable character standing for each byte in byte-level BPE (GPT-2's mapping):
    printable Latin-1 bytes stand for themselves, the others for 256, 257, ... in order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    out, extra = [], 0
    for b in range(256):
        if b in keep:
            out.append(chr(b))
        else:
            out.append(chr(256 + extra))
            extra += 1
    return out


class ByteTokenizer:
    """UTF-8 bytes: 256 ids, any text encodes."""

    kind = "byte"
    unit = "byte"
    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(ids).decode("utf-8", errors="replace")

    def to_hf(self):
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers

        # byte-level BPE without merges: id b is byte b
        vocab = {s: b for b, s in enumerate(byte_symbols())}
        tok = Tokenizer(models.BPE(vocab, []))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        tok.decoder = decoders.ByteLevel()
        return tok

    def save(self, directory: Path) -> None:
        save_hf(self, directory)


class BPETokenizer:
    """Byte-level BPE trained with HF ``tokenizers`` on the training split."""

    kind = "bpe"
    unit = "token"

    def __init__(self, tok):
        self.tok = tok

    @classmethod
    def train(cls, text: str, vocab_size: int) -> BPETokenizer:
        # one "document" per line keeps the trainer's memory use flat on a large corpus
        return cls.train_from_iterator(text.splitlines(keepends=True), vocab_size)

    @classmethod
    def train_from_iterator(cls, texts, vocab_size: int, show_progress: bool = False) -> BPETokenizer:
        """Train on the strings of the iterable ``texts`` (read once, not held in memory)."""
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=show_progress,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(tok)

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text).ids

    def decode(self, ids) -> str:
        return self.tok.decode(list(ids))

    def to_hf(self):
        return self.tok

    def save(self, directory: Path) -> None:
        save_hf(self, directory)


class HFTokenizer:
    """A transformers fast tokenizer (``PreTrainedTokenizerFast``) with the project's interface.

    ``fast`` is the transformers tokenizer; ``kind`` what made it: "pretrained" (an
    ``AutoTokenizer`` name or folder) or the project's "char", "byte", "bpe" with an end-of-text
    token added. `encode` adds no special tokens and encodes special-token text that occurs in
    a document as ordinary text (what transformers does with ``split_special_tokens=True``), so a
    document can never produce the end-of-text id itself.
    """

    def __init__(self, fast, kind: str = "pretrained"):
        import copy

        self.fast = fast
        self.kind = kind
        self.unit = {"char": "char", "byte": "byte"}.get(kind, "token")
        self._backend = copy.deepcopy(fast.backend_tokenizer)
        self._backend.encode_special_tokens = True
        self._backend.no_truncation()
        self._backend.no_padding()

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, kind: str | None = None) -> HFTokenizer:
        """``AutoTokenizer.from_pretrained(name_or_path)`` (a local folder or a hub name); its fast
        version is required. TokenizerError, one line, when it cannot be loaded."""
        from transformers import AutoTokenizer

        try:
            fast = AutoTokenizer.from_pretrained(str(name_or_path), use_fast=True)
        except Exception as e:  # OSError, ValueError, hub errors: all mean "no such tokenizer here"
            raise TokenizerError(f"cannot load tokenizer {str(name_or_path)!r} ({_one_line(e)}); give char, byte, "
                                 "bpe, a local tokenizer folder or a hub name") from None
        if not getattr(fast, "is_fast", False) or getattr(fast, "backend_tokenizer", None) is None:
            raise TokenizerError(f"tokenizer {str(name_or_path)!r} has no fast (tokenizers) version")
        return cls(fast, kind or fast.init_kwargs.get(KIND_KEY) or "pretrained")

    @classmethod
    def of(cls, tokenizer, boundary: bool = True) -> HFTokenizer:
        """``tokenizer`` (any of this module's) as an HFTokenizer. With ``boundary`` it has an
        end-of-text token: its own EOS token, else BOUNDARY_TOKEN added as a special token (the
        next free id)."""
        if isinstance(tokenizer, HFTokenizer):
            fast = copy_fast(tokenizer.fast)
        else:
            from transformers import PreTrainedTokenizerFast

            fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer.to_hf(), clean_up_tokenization_spaces=False)
        if boundary and fast.eos_token_id is None:
            fast.add_special_tokens({"eos_token": BOUNDARY_TOKEN})
        fast.init_kwargs[KIND_KEY] = tokenizer.kind
        return cls(fast, tokenizer.kind)

    @property
    def vocab_size(self) -> int:
        """Every id the tokenizer can give, added tokens included (``len(fast)``)."""
        return len(self.fast)

    @property
    def eos_token_id(self) -> int | None:
        return self.fast.eos_token_id

    def encode(self, text: str) -> list[int]:
        try:
            return self._backend.encode(text, add_special_tokens=False).ids
        except Exception as e:  # tokenizers raises its own type, e.g. a character a WordLevel vocabulary lacks
            raise VocabularyError(f"the text cannot be encoded by this {self.kind} tokenizer ({_one_line(e)})") from None

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """`encode` of each text (tokenizers' batch call: one call, its own threads)."""
        try:
            return [e.ids for e in self._backend.encode_batch(list(texts), add_special_tokens=False)]
        except Exception as e:  # see encode
            raise VocabularyError(f"the text cannot be encoded by this {self.kind} tokenizer ({_one_line(e)})") from None

    def decode(self, ids) -> str:
        return self.fast.decode(list(ids), clean_up_tokenization_spaces=False)

    def to_hf(self):
        return self.fast.backend_tokenizer

    def save(self, directory: Path) -> None:
        save_hf(self, directory)

    def __getstate__(self):
        return {"files": hf_files(self), "kind": self.kind}

    def __setstate__(self, state):
        with tempfile.TemporaryDirectory() as tmp:
            for name, data in state["files"].items():
                (Path(tmp) / name).write_bytes(data)
            self.__init__(_load_fast(Path(tmp)), state["kind"])


def copy_fast(fast):
    """An independent copy of a ``PreTrainedTokenizerFast`` (its files written and read back)."""
    with tempfile.TemporaryDirectory() as tmp:
        fast.save_pretrained(tmp)
        return _load_fast(Path(tmp))


def _load_fast(directory: Path):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(str(directory))


def load_prepared_tokenizer(directory: str | Path) -> HFTokenizer:
    """The tokenizer of a prepared folder: ``directory`` is the folder's ``tokenizer/`` (or the
    prepared folder itself). TokenizerError, one line, when it is missing or damaged."""
    directory = Path(directory)
    if not (directory / FILE).is_file() and (directory / "tokenizer" / FILE).is_file():
        directory = directory / "tokenizer"
    if not (directory / FILE).is_file():
        raise TokenizerError(f"{directory / FILE} not found: not a prepared folder's tokenizer")
    try:
        fast = _load_fast(directory)
    except Exception as e:  # transformers / tokenizers raise several types for a damaged file
        raise TokenizerError(f"{directory} holds no readable tokenizer ({_one_line(e)}): damaged") from None
    return HFTokenizer(fast, fast.init_kwargs.get(KIND_KEY) or "pretrained")


def build_tokenizer(kind: str, train_text: str, bpe_vocab_size: int = 8192):
    if kind == "char":
        return CharTokenizer.train(train_text)
    if kind == "byte":
        return ByteTokenizer()
    if kind == "bpe":
        return BPETokenizer.train(train_text, bpe_vocab_size)
    raise ValueError(f"tokenizer must be char, byte or bpe, got {kind!r}")


# --- the files transformers reads -------------------------------------------------------------

def hf_files(tokenizer) -> dict[str, bytes]:
    """{file name: content} of ``tokenizer`` as a transformers fast tokenizer: what
    ``PreTrainedTokenizerFast.save_pretrained`` writes (``tokenizer.json``,
    ``tokenizer_config.json``). Decoding keeps spaces as they are (no clean-up)."""
    from transformers import PreTrainedTokenizerFast

    if isinstance(tokenizer, HFTokenizer):  # its special tokens and kind are part of it
        fast = tokenizer.fast
    else:  # no bos/eos/pad/unk: every id is a symbol of the text, as in training
        fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer.to_hf(), clean_up_tokenization_spaces=False)
    with tempfile.TemporaryDirectory() as tmp:
        fast.save_pretrained(tmp)
        return {p.name: p.read_bytes() for p in sorted(Path(tmp).iterdir()) if p.is_file()}


def save_hf(tokenizer, directory: Path) -> None:
    """Write ``tokenizer``'s files into ``directory``, each replaced atomically: a failed write
    (a full disk) leaves the previous file or none, never a partial one; TokenizerError then."""
    directory = Path(directory)
    files = hf_files(tokenizer)
    directory.mkdir(parents=True, exist_ok=True)
    # tokenizer.json last: it is what `load_tokenizer` reads, so it never pairs with a stale config
    for name in sorted(files, key=lambda n: n == FILE):
        try:
            write_atomic(directory / name, files[name])
        except OSError as e:
            raise TokenizerError(f"cannot write {directory / name}: {e.strerror or e}") from None
    stale = directory / "bpe.json"  # an earlier version's BPE file, now inside tokenizer.json
    stale.unlink(missing_ok=True)


def load_tokenizer(directory: str | Path):
    """The tokenizer saved in ``directory`` (either format); FileNotFoundError when there is
    none, TokenizerError when its file is damaged."""
    directory = Path(directory)
    path = directory / FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: not a training run directory?")
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise TokenizerError(f"{path} cannot be read ({_one_line(e)}): damaged") from None
    if not isinstance(spec, dict):
        raise TokenizerError(f"{path} holds no tokenizer: damaged")
    if "kind" in spec:
        return _load_old_format(directory, spec)
    return _from_hf(path, spec)


def _from_hf(path: Path, spec: dict):
    """The project's tokenizer equal to a ``tokenizer.json`` of the ``tokenizers`` format."""
    from tokenizers import Tokenizer

    try:
        tok = Tokenizer.from_str(json.dumps(spec))
    except Exception as e:  # tokenizers raises its own exception types
        raise TokenizerError(f"{path} is not a valid tokenizer ({_one_line(e)}): damaged") from None
    if spec.get("added_tokens"):  # special tokens (an end-of-text token) need transformers' tokenizer
        try:
            fast = _load_fast(path.parent)
        except Exception as e:  # transformers / tokenizers raise several types for a damaged file
            raise TokenizerError(f"{path.parent} holds no readable tokenizer ({_one_line(e)}): damaged") from None
        return HFTokenizer(fast, fast.init_kwargs.get(KIND_KEY) or "pretrained")
    model = spec.get("model") or {}
    vocab = model.get("vocab")
    if model.get("type") == "WordLevel" and isinstance(vocab, dict):
        chars = sorted(vocab, key=vocab.get)
        if [vocab[c] for c in chars] == list(range(len(chars))) and all(len(c) == 1 for c in chars):
            return CharTokenizer(chars)
    if model.get("type") == "BPE" and not model.get("merges") and isinstance(vocab, dict) \
            and vocab == {s: b for b, s in enumerate(byte_symbols())}:
        return ByteTokenizer()
    return BPETokenizer(tok)


def _load_old_format(directory: Path, spec: dict):
    path = directory / FILE
    kind = spec["kind"]
    if kind == "char" and isinstance(spec.get("chars"), list):
        return CharTokenizer(spec["chars"])
    if kind == "byte":
        return ByteTokenizer()
    if kind == "bpe" and isinstance(spec.get("file"), str):
        from tokenizers import Tokenizer

        try:
            return BPETokenizer(Tokenizer.from_file(str(directory / spec["file"])))
        except Exception as e:  # tokenizers raises its own exception types
            raise TokenizerError(f"{directory / spec['file']} cannot be read ({_one_line(e)})") from None
    raise TokenizerError(f"{path}: unknown tokenizer kind {kind!r}")


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:200]
