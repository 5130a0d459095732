"""`minrnn prepare`: tokenize a corpus once into token shards that training memory-maps.

    prepare(["corpus/*.txt"], "bpe", "data/corpus")             # the library call
    minrnn prepare corpus/*.txt --tokenizer bpe --out data/corpus   # the command

What it reads (all through the ``datasets`` library, streamed: nothing is copied into a
cache): text files (one document per file, or per line with ``document_per_line``), folders
(every file under them, hidden ones skipped), globs, ``.jsonl`` / ``.json`` / ``.parquet`` files
(one document per row, its ``text_field``), or a dataset (``load_from_disk`` for a folder saved
with ``save_to_disk``, else ``load_dataset``). Empty documents are skipped.

What it writes: the folder of `minrnn.data.shards` (manifest, tokenizer, shards). The
documents of a split are written in the order they are read, whatever ``workers`` is: the
same command gives the same bytes. The train/valid split by ``valid_fraction`` f is by
document: document i (counting from 0) validates when floor((i + 1) f) > floor(i f), i.e.
every (1/f)-th document, so validation spreads over the whole corpus and a stream needs no
count; a source of one single document is split by characters instead (its first 1 - f
train, the rest validate, as `minrnn.data.text.split_90_10` does).

Atomic and restartable: everything is written into ``out/.partial`` and moved into ``out``
only when complete; the manifest is written last (os.replace). A prepare killed at any point
leaves either the previous complete folder or no manifest; the same command then starts over.
A lock on ``out`` keeps a second prepare out while one runs.
"""

from __future__ import annotations

import collections
import contextlib
import datetime
import glob
import os
import re
import shutil
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import numpy as np

from .._files import fsync_dir
from .shards import (
    DEFAULT_SHARD_TOKENS,
    FORMAT,
    MANIFEST,
    SHARD_FILE,
    TOKENIZER_DIR,
    VERSION,
    ShardWriter,
    read_manifest,
    token_dtype,
    write_manifest,
)
from .text import DataError

__all__ = ["PARTIAL_DIR", "SourceGroup", "add_arguments", "prepare", "resolve_sources"]

PARTIAL_DIR = ".partial"
BUILTIN_TOKENIZERS = ("char", "byte", "bpe")
DEFAULT_BPE_VOCAB = 8192
DEFAULT_VALID_FRACTION = 0.1
_COMPRESSED = (".gz", ".bz2", ".xz", ".zst", ".zstd", ".lz4")
_FORMATS = {".jsonl": "json", ".json": "json", ".ndjson": "json", ".parquet": "parquet"}
_SPLIT_NAME = re.compile(r"[A-Za-z0-9_]+")
# documents handed to a worker at a time: enough text that one call's overhead does not matter
_BATCH_CHARS = 1 << 20
_BATCH_DOCS = 4096
# hidden test hook: seconds to sleep after each shard is closed, so that a test can kill a
# prepare half-way through its shards (tests/data/test_prepare.py); unset in normal use
_SLOW_ENV = "MINRNN_PREPARE_TEST_SHARD_SLEEP"


# --- sources ----------------------------------------------------------------------------------

@dataclass
class SourceGroup:
    """Documents from one place: files of one format (``text``, ``json``, ``parquet``) from one
    SOURCE argument, or one split of a dataset (``format`` "dataset"). ``target``: the output
    split they all go to, or None for the train/valid split by fraction."""

    label: str
    format: str
    files: list[Path] = field(default_factory=list)
    split: str | None = None
    target: str | None = None

    def describe(self) -> dict:
        """What the manifest records of it (paths as given, file count and bytes)."""
        out = {"source": self.label, "format": self.format}
        if self.files:
            out["files"] = len(self.files)
            out["bytes"] = sum(f.stat().st_size for f in self.files)
        if self.split is not None:
            out["split"] = self.split
        out["to"] = self.target or "by fraction"
        return out


def _format_of(path: Path) -> str:
    name = path.name.lower()
    for ext in _COMPRESSED:
        if name.endswith(ext):
            name = name[: -len(ext)]
    return _FORMATS.get(Path(name).suffix, "text")


def _expand(spec: str) -> list[Path]:
    """The files a SOURCE names: itself, a folder's files (recursively, sorted, hidden ones
    skipped) or a glob's matches (sorted; ``**`` recurses)."""
    path = Path(spec).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(f for f in path.rglob("*") if f.is_file()
                       and not any(part.startswith(".") for part in f.relative_to(path).parts))
        if not files:
            raise DataError(f"SOURCE {spec!r} is a folder with no files in it")
        return files
    if glob.has_magic(spec):
        files = []
        for match in sorted(glob.glob(os.path.expanduser(spec), recursive=True)):
            files.extend(_expand(match) if Path(match).is_dir() else [Path(match)])
        if not files:
            raise DataError(f"SOURCE {spec!r} matches no file")
        return files
    raise DataError(f"SOURCE {spec!r} is no file, folder or glob that matches anything")


def resolve_sources(specs: list[str], target: str | None = None) -> list[SourceGroup]:
    """The file groups of SOURCE arguments: consecutive files of one format in one group, in
    the order given (a folder's and a glob's files sorted by name)."""
    groups: list[SourceGroup] = []
    for spec in specs:
        current = None
        for f in _expand(spec):
            fmt = _format_of(f)
            if current is None or current.format != fmt:
                current = SourceGroup(spec, fmt, target=target)
                groups.append(current)
            current.files.append(f)
    return groups


def _parse_pairs(items: list[str], option: str) -> list[tuple[str, str]]:
    """``SPLIT=VALUE`` items of an option, the split name checked."""
    pairs = []
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not _SPLIT_NAME.fullmatch(name) or not value:
            raise DataError(f"{option} takes SPLIT=VALUE items (e.g. train=... valid=...), got {item!r}")
        pairs.append((name, value))
    return pairs


def _dataset_groups(name: str, splits: list[str] | None) -> tuple[list[SourceGroup], bool]:
    """(groups, by_fraction) for ``--dataset NAME --split ...``: one split read whole (by
    fraction), or named ``OUT=SPLIT`` pairs."""
    splits = splits or ["train"]
    if len(splits) == 1 and "=" not in splits[0]:
        return [SourceGroup(name, "dataset", split=splits[0])], True
    return [SourceGroup(name, "dataset", split=s, target=t) for t, s in _parse_pairs(splits, "--split")], False


def _open_dataset(group: SourceGroup, streaming: bool):
    """The ``datasets`` dataset of a dataset group: load_from_disk for a save_to_disk folder,
    else load_dataset. DataError, one line, when it cannot be opened."""
    import datasets

    path = Path(group.label).expanduser()
    try:
        if path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file()):
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                if group.split not in ds:
                    raise DataError(f"--dataset {group.label}: no split {group.split!r}; it has {', '.join(ds)}")
                ds = ds[group.split]
            return ds
        return datasets.load_dataset(str(group.label), split=group.split, streaming=streaming)
    except DataError:
        raise
    except Exception as e:  # datasets raises many types (missing split, no network, unknown name)
        raise DataError(f"--dataset {group.label} --split {group.split}: cannot be opened ({_one_line(e)})") from None


def _open_files(group: SourceGroup, text_field: str, per_line: bool):
    import datasets

    files = [str(f) for f in group.files]
    if group.format == "text":
        return datasets.load_dataset("text", data_files=files, split="train", streaming=True,
                                     sample_by="line" if per_line else "document"), "text"
    ds = datasets.load_dataset(group.format, data_files=files, split="train", streaming=True)
    return ds, text_field


def _group_batches(group: SourceGroup, text_field: str, per_line: bool, streaming: bool) -> Iterator[list[str]]:
    """The documents of ``group`` as lists of strings (empty ones dropped)."""
    if group.format == "dataset":
        ds, column = _open_dataset(group, streaming), text_field
    else:
        ds, column = _open_files(group, text_field, per_line)
    names = getattr(ds, "column_names", None)
    if names is not None and column not in names:
        raise DataError(f"{group.label}: no field {column!r} (it has {', '.join(names)}); name the text with --text-field")
    it = ds.select_columns([column]).iter(batch_size=256) if names is not None else ds.iter(batch_size=256)
    while True:
        try:
            batch = next(it)
        except StopIteration:
            return
        except UnicodeDecodeError as e:
            raise DataError(f"{_culprit(group) or group.label} is not UTF-8 text ({e.reason} at byte {e.start}); "
                            "give text files only") from None
        except Exception as e:  # a malformed JSON line, an unreadable parquet file
            raise DataError(f"{group.label} cannot be read ({_one_line(e)})") from None
        texts = batch.get(column)
        if texts is None:
            raise DataError(f"{group.label}: no field {column!r}; name the text with --text-field")
        bad = next((t for t in texts if t is not None and not isinstance(t, str)), None)
        if bad is not None:
            raise DataError(f"{group.label}: field {column!r} holds {type(bad).__name__} values, not text; "
                            "name the text with --text-field")
        yield [t for t in texts if t]


def _culprit(group: SourceGroup) -> str | None:
    """The first file of ``group`` that is not UTF-8 (for the error message)."""
    import codecs

    for f in group.files:
        decoder = codecs.getincrementaldecoder("utf-8")()
        try:
            with open(f, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):  # noqa: B023 -- read at once
                    decoder.decode(block)
                decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            return str(f)
    return None


@dataclass
class _Plan:
    """Where each document goes: ``groups`` in order; those without a target are split into
    train and valid by ``fraction`` (0: all train)."""

    groups: list[SourceGroup]
    fraction: float
    text_field: str
    per_line: bool
    streaming: bool

    @property
    def split_names(self) -> list[str]:
        names = [g.target for g in self.groups if g.target]
        if any(g.target is None for g in self.groups):
            names += ["train"] + (["valid"] if self.fraction > 0 else [])
        return sorted(set(names), key=lambda n: (n != "train", n != "valid", n))

    def known_count(self) -> int | None:
        """How many documents there are, when that is known without reading them."""
        if self.per_line or any(g.format != "text" for g in self.groups):
            return None
        return sum(len(g.files) for g in self.groups)

    def documents(self) -> Iterator[tuple[str, list[str]]]:
        """(split, texts) batches in reading order (see the module docstring for the rule)."""
        index = 0  # documents split by fraction so far
        held: str | None = None  # the first such document, until a second shows it is not the only one
        f = self.fraction
        # the fraction as the decimal it was written as (0.1 is 1/10), so that the rule is exact
        num, den = Fraction(repr(f)).limit_denominator(10**9).as_integer_ratio()
        for group in self.groups:
            for texts in _group_batches(group, self.text_field, self.per_line, self.streaming):
                if group.target is not None:
                    yield group.target, texts
                    continue
                if f > 0 and index == 0 and texts:
                    held, texts, index = texts[0], texts[1:], 1
                if held is not None and texts:
                    yield "train", [held]  # document 0 always trains
                    held = None
                labels = [(i + 1) * num // den > i * num // den for i in range(index, index + len(texts))]
                index += len(texts)
                for valid, run in _runs(labels, texts):
                    yield ("valid" if valid else "train"), run
        if held is not None:  # one single document: its last fraction of characters validates
            cut = int(len(held) * (1 - f))
            yield "train", [held[:cut]] if held[:cut] else []
            yield "valid", [held[cut:]] if held[cut:] else []


def _runs(labels: list, items: list) -> Iterator[tuple[object, list]]:
    """Consecutive items of equal label, as (label, items)."""
    start = 0
    for i in range(1, len(items) + 1):
        if i == len(items) or labels[i] != labels[start]:
            if i > start:
                yield labels[start], items[start:i]
            start = i


# --- tokenizers and encoding --------------------------------------------------------------------

def _build_tokenizer(spec: str, plan: _Plan, bpe_vocab_size: int, boundary: bool, progress, pretrained=None):
    """The HFTokenizer that will be saved: built from the text (char: the characters of every
    split; bpe: trained on the train split), or ``pretrained`` (loaded from an AutoTokenizer
    name or folder)."""
    from . import tokenizers as T

    if spec == "byte":
        base = T.ByteTokenizer()
    elif spec == "char":
        chars: set[str] = set()
        with progress("reading the characters", plan.known_count()) as bar:
            for _, texts in plan.documents():
                for t in texts:
                    chars.update(t)
                bar.update(len(texts))
        if not chars:
            raise DataError("the sources hold no text: no character to build the char tokenizer from")
        base = T.CharTokenizer(sorted(chars))
    elif spec == "bpe":
        def lines():
            with progress("training BPE", plan.known_count()) as bar:
                for split, texts in plan.documents():
                    if split == "train":
                        for t in texts:
                            yield from t.splitlines(keepends=True)
                    bar.update(len(texts))

        base = T.BPETokenizer.train_from_iterator(lines(), bpe_vocab_size)
    else:
        base = pretrained or T.HFTokenizer.from_pretrained(spec)
    return T.HFTokenizer.of(base, boundary=boundary)


def _encoder_spec(tokenizer, boundary_id: int | None, dtype: np.dtype) -> tuple:
    """What a worker needs to encode exactly as ``tokenizer`` does (picklable)."""
    if tokenizer.kind == "byte":
        payload = None
    elif tokenizer.kind == "char":
        vocab = tokenizer.fast.backend_tokenizer.get_vocab(with_added_tokens=False)
        payload = sorted(vocab.items(), key=lambda kv: kv[1])
    else:
        payload = tokenizer.fast.backend_tokenizer.to_str()
    return tokenizer.kind, payload, boundary_id, dtype.str


class _Encoder:
    """Encodes a batch of documents into (ids, lengths): ids (N,) of the shard dtype, each
    document's boundary token first when there is one; lengths (documents,) int64.

    byte and char encode with numpy (the same ids as their tokenizers, tested), the others
    with the ``tokenizers`` library on one thread (``workers`` processes give the parallelism)."""

    def __init__(self, spec: tuple):
        self.kind, payload, self.boundary, dtype = spec
        self.dtype = np.dtype(dtype)
        if self.kind == "char":
            codes = np.array([ord(c) for c, _ in payload], dtype=np.int64)
            ids = np.array([i for _, i in payload], dtype=np.int64)
            order = np.argsort(codes)
            self.codes, self.ids = codes[order], ids[order]
        elif self.kind != "byte":
            from tokenizers import Tokenizer

            self.tok = Tokenizer.from_str(payload)
            self.tok.encode_special_tokens = True  # text that spells a special token stays text
            self.tok.no_truncation()
            self.tok.no_padding()

    def __call__(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        if self.kind == "byte":
            raw = [t.encode("utf-8") for t in texts]
            ids = np.frombuffer(b"".join(raw), dtype=np.uint8)
            lengths = np.array([len(r) for r in raw], dtype=np.int64)
        elif self.kind == "char":
            codes = np.frombuffer("".join(texts).encode("utf-32-le"), dtype="<u4").astype(np.int64)
            where = np.minimum(np.searchsorted(self.codes, codes), len(self.codes) - 1)
            known = self.codes[where] == codes
            if not known.all():
                from .tokenizers import VocabularyError

                missing = sorted({chr(c) for c in codes[~known][:1000]})
                raise VocabularyError(f"character(s) not in the vocabulary: {', '.join(map(repr, missing[:20]))}")
            ids = self.ids[where]
            lengths = np.array([len(t) for t in texts], dtype=np.int64)
        else:
            # the batch call without offsets; on this process's one thread (see _one_thread)
            encode = getattr(self.tok, "encode_batch_fast", self.tok.encode_batch)
            try:
                with _one_thread():
                    encoded = [e.ids for e in encode(texts, add_special_tokens=False)]
            except Exception as e:  # tokenizers raises its own type, e.g. for a symbol it has no id for
                from .tokenizers import VocabularyError

                raise VocabularyError(f"a document cannot be encoded ({_one_line(e)})") from None
            lengths = np.array([len(e) for e in encoded], dtype=np.int64)
            ids = np.concatenate([np.array(e, dtype=np.int64) for e in encoded]) if encoded else lengths[:0]
        ids = ids.astype(self.dtype)
        if self.boundary is not None:
            starts = np.cumsum(lengths) - lengths
            ids = np.insert(ids, starts, self.boundary)
            lengths = lengths + 1
        return ids, lengths


_WORKER_ENCODER: _Encoder | None = None


def _worker_init(spec: tuple) -> None:
    global _WORKER_ENCODER
    _WORKER_ENCODER = _Encoder(spec)


def _worker_encode(item: tuple[str, list[str]]) -> tuple[str, np.ndarray, np.ndarray]:
    split, texts = item
    return (split, *_WORKER_ENCODER(texts))


def _batches(plan: _Plan) -> Iterator[tuple[str, list[str]]]:
    """The plan's documents regrouped into batches of about _BATCH_CHARS characters, one split
    each; each split's documents stay in reading order (the order across splits is immaterial)."""
    pending: dict[str, list[str]] = collections.defaultdict(list)
    size: dict[str, int] = collections.defaultdict(int)
    for split, texts in plan.documents():
        for t in texts:
            pending[split].append(t)
            size[split] += len(t)
            if size[split] >= _BATCH_CHARS or len(pending[split]) >= _BATCH_DOCS:
                yield split, pending.pop(split)
                size[split] = 0
    for split in sorted(pending):
        if pending[split]:
            yield split, pending[split]


def _pool(workers: int, spec: tuple):
    """A process pool whose workers hold an `_Encoder` of ``spec``.

    Forked where the platform can: a spawned worker would import the package, torch included,
    for seconds, while a forked one starts at once; the workers use nothing of the parent but
    numpy and the tokenizer they build from ``spec``. tokenizers disables its own threads in a
    forked child; saying so in the environment (only while forking) keeps it from warning."""
    import multiprocessing

    ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    with _one_thread():
        return ctx.Pool(workers, initializer=_worker_init, initargs=(spec,))


@contextlib.contextmanager
def _one_thread():
    """tokenizers' batch calls on the calling thread only, for the duration: ``workers``
    processes are the parallelism, so that N workers use N cores. tokenizers reads this
    variable at each call (and a forked child inherits it, which also keeps tokenizers from
    warning about the fork)."""
    saved = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = saved


def _encoded(plan: _Plan, spec: tuple, workers: int) -> Iterator[tuple[str, np.ndarray, np.ndarray, int]]:
    """(split, ids, lengths, documents) per batch, in reading order; ``workers`` > 1 encodes in
    that many processes with at most 2 batches each in flight (memory stays bounded)."""
    if workers == 1:
        encoder = _Encoder(spec)
        for split, texts in _batches(plan):
            yield (split, *encoder(texts), len(texts))
        return
    with _pool(workers, spec) as pool:
        inflight: collections.deque = collections.deque()
        for item in _batches(plan):
            inflight.append((pool.apply_async(_worker_encode, (item,)), len(item[1])))
            if len(inflight) >= 2 * workers:
                result, n = inflight.popleft()
                yield (*result.get(), n)
        while inflight:
            result, n = inflight.popleft()
            yield (*result.get(), n)


# --- the folder -------------------------------------------------------------------------------

def _ours(name: str) -> bool:
    """Whether a name in the output folder is one prepare writes (or left behind when killed)."""
    return (name in (MANIFEST, TOKENIZER_DIR, PARTIAL_DIR, ".lock") or bool(SHARD_FILE.match(name))
            or name.startswith(f".{MANIFEST}."))


def _commit(partial: Path, out: Path, manifest: dict) -> None:
    """Move the finished files of ``partial`` into ``out``, then write the manifest."""
    _remove_outputs(out)
    for p in sorted(partial.iterdir()):
        os.replace(p, out / p.name)
    fsync_dir(out)
    write_manifest(out, manifest)
    partial.rmdir()


def _remove_outputs(out: Path) -> None:
    """Remove what an earlier prepare wrote into ``out``, nothing else; the manifest goes first,
    so that until the new one exists the folder reads as incomplete."""
    (out / MANIFEST).unlink(missing_ok=True)
    fsync_dir(out)
    for p in out.iterdir():
        if p.name not in (".lock", PARTIAL_DIR) and _ours(p.name):
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()


def _check_out(out: Path, settings: dict, overwrite: bool) -> dict | None:
    """The existing manifest when ``out`` already holds this very preparation (nothing to do);
    None when prepare may write there; DataError when it must not."""
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out} is a file; give a folder")
    if not out.is_dir():
        return None
    foreign = sorted(p.name for p in out.iterdir() if not _ours(p.name))
    if foreign and not overwrite:
        shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
        raise DataError(f"--out {out} holds files minrnn prepare did not write ({shown}); give an empty or new "
                        "folder, or --overwrite to write beside them")
    if not (out / MANIFEST).is_file():
        return None  # empty, or an interrupted prepare's leftovers: start over
    try:
        existing = read_manifest(out)
    except DataError as e:
        if overwrite:
            return None
        raise DataError(f"{e}; --overwrite replaces it") from None
    if existing.get("settings") == settings and not overwrite:
        return existing
    if not overwrite:
        raise DataError(f"--out {out} already holds a prepared folder made differently "
                        f"({existing.get('command') or 'another command'}); --overwrite replaces it")
    return None


@dataclass
class _Progress:
    """tqdm bars on stderr, or nothing."""

    enabled: bool

    def __call__(self, desc: str, total: int | None):
        from contextlib import nullcontext

        if not self.enabled:
            return nullcontext(_NoBar())
        from tqdm.auto import tqdm

        return tqdm(desc=desc, total=total, unit="doc", file=sys.stderr, dynamic_ncols=True)


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, s: str, refresh: bool = True) -> None:
        pass


def prepare(sources: list[str], tokenizer: str, out: str | os.PathLike, *, text_field: str = "text",
            dataset: str | None = None, dataset_splits: list[str] | None = None, streaming: bool = False,
            valid_fraction: float | None = None, split_files: list[str] | None = None,
            document_per_line: bool = False, workers: int = 1, shard_tokens: int = DEFAULT_SHARD_TOKENS,
            boundary_token: str = "eos", bpe_vocab_size: int | None = None, overwrite: bool = False,
            progress: bool | None = None, command: str | None = None,
            log: Callable[[str], None] | None = None) -> dict:
    """Tokenize ``sources`` with ``tokenizer`` into the prepared folder ``out``; returns its manifest.

    ``sources``: SOURCE arguments (files, folders, globs), split train/valid by
    ``valid_fraction`` (default 0.1; 0: train only). Instead: ``split_files`` (``SPLIT=SOURCE``
    items, any number per split), or ``dataset`` (a ``datasets`` name or folder) with
    ``dataset_splits`` (one split, split by fraction, or ``OUT=SPLIT`` items). ``tokenizer``:
    char, byte, bpe (trained on the train split, ``bpe_vocab_size`` ids, default 8192) or an
    AutoTokenizer name or folder. ``boundary_token``: "eos" (each document starts with the
    end-of-text token, added when the tokenizer has none) or "none". ``progress``: bars on
    stderr (None: when stderr is a terminal). DataError (one line) for unusable arguments.
    """
    log = log or (lambda line: print(line, file=sys.stderr))
    out = Path(out).expanduser()
    plan, settings = _plan(sources, tokenizer, text_field, dataset, dataset_splits, streaming, valid_fraction,
                           split_files, document_per_line, workers, shard_tokens, boundary_token, bpe_vocab_size,
                           out)
    # a tokenizer that cannot be loaded is refused before anything is written
    pretrained = None
    if tokenizer not in BUILTIN_TOKENIZERS:
        from .tokenizers import HFTokenizer

        pretrained = HFTokenizer.from_pretrained(tokenizer)
    existing = _check_out(out, settings, overwrite)
    if existing is not None:
        log(f"{out} already holds this preparation (its manifest); nothing to do (--overwrite prepares it again)")
        return existing
    # one writer per folder: a flock, dropped by the kernel however its holder dies
    from .._files import FolderInUseError, FolderLock

    try:
        lock = FolderLock(out)
    except FolderInUseError as e:
        raise DataError(f"--out {out} is in use by another minrnn prepare ({f'pid {e.holder}' if e.holder else 'another process'}); "
                        "wait for it to end or give another --out") from None
    except OSError as e:
        raise DataError(f"cannot lock {out}: {e.strerror or e}") from None
    with lock:
        existing = _check_out(out, settings, overwrite)  # again, now that no one else writes
        if existing is not None:
            log(f"{out} already holds this preparation (its manifest); nothing to do")
            return existing
        partial = out / PARTIAL_DIR
        if partial.exists():  # an interrupted prepare's: start over
            shutil.rmtree(partial)
        partial.mkdir()
        try:
            manifest = _write(plan, settings, tokenizer, partial, workers, shard_tokens, boundary_token,
                              bpe_vocab_size or DEFAULT_BPE_VOCAB,
                              _Progress(sys.stderr.isatty() if progress is None else progress), command,
                              pretrained)
            _commit(partial, out, manifest)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
    splits = "; ".join(f"{name} {s['tokens']:,} tokens in {s['documents']:,} documents "
                       f"({len(s['shards'])} shard{'s' * (len(s['shards']) != 1)})"
                       for name, s in manifest["splits"].items())
    log(f"prepared {out}: {splits}; vocab_size {manifest['vocab_size']}, {manifest['dtype']}")
    return manifest


def _plan(sources, tokenizer, text_field, dataset, dataset_splits, streaming, valid_fraction, split_files,
          document_per_line, workers, shard_tokens, boundary_token, bpe_vocab_size, out: Path) -> tuple[_Plan, dict]:
    """The arguments checked (DataError naming the argument) and turned into a plan, and the
    settings that decide the output (what a rerun compares). Files inside ``out`` (a folder
    prepared inside its own source folder) are not sources."""
    if not isinstance(tokenizer, str) or not tokenizer:
        raise DataError("--tokenizer is required: char, byte, bpe, or an AutoTokenizer name or folder")
    if workers < 1:
        raise DataError(f"--workers must be a positive integer, got {workers}")
    if shard_tokens < 1:
        raise DataError(f"--shard-tokens must be a positive integer, got {shard_tokens}")
    if boundary_token not in ("eos", "none"):
        raise DataError(f"--boundary-token must be eos or none, got {boundary_token!r}")
    if bpe_vocab_size is not None and tokenizer != "bpe":
        raise DataError(f"--bpe-vocab-size is for --tokenizer bpe only, not {tokenizer}")
    if bpe_vocab_size is not None and bpe_vocab_size <= 256:
        raise DataError(f"--bpe-vocab-size must exceed the 256 byte symbols, got {bpe_vocab_size}")
    given = [name for name, v in (("SOURCE", sources), ("--dataset", dataset), ("--split-files", split_files)) if v]
    if len(given) != 1:
        raise DataError("give what to read: SOURCE..., --split-files SPLIT=SOURCE... or --dataset NAME" if not given
                        else f"give one of SOURCE..., --split-files or --dataset, not {' and '.join(given)}")
    if dataset_splits and not dataset:
        raise DataError("--split is for --dataset only (files: --split-files SPLIT=SOURCE)")
    if streaming and not dataset:
        raise DataError("--streaming is for --dataset only (files are always streamed)")
    by_fraction = True
    if dataset:
        groups, by_fraction = _dataset_groups(dataset, dataset_splits)
    elif split_files:
        by_fraction = False
        groups = [g for target, spec in _parse_pairs(split_files, "--split-files")
                  for g in resolve_sources([spec], target=target)]
    else:
        groups = resolve_sources(list(sources))
    inside = out.resolve()
    for g in groups:
        g.files = [f for f in g.files if inside not in f.resolve().parents]
    groups = [g for g in groups if g.files or g.format == "dataset"]
    if not groups:
        raise DataError(f"the SOURCEs name no file outside --out {out}")
    if not by_fraction:
        if valid_fraction is not None:
            raise DataError("--valid-fraction is for a source split by fraction, not for named splits")
        if "train" not in {g.target for g in groups}:
            raise DataError("named splits need a train split (train=...)")
        fraction = 0.0
    else:
        fraction = DEFAULT_VALID_FRACTION if valid_fraction is None else float(valid_fraction)
        if not 0 <= fraction < 1:
            raise DataError(f"--valid-fraction must lie in [0, 1), got {valid_fraction}")
    plan = _Plan(groups, fraction, text_field, document_per_line, streaming)
    settings = {"sources": [g.describe() for g in groups], "tokenizer": tokenizer, "text_field": text_field,
                "document_per_line": document_per_line, "valid_fraction": fraction if by_fraction else None,
                "shard_tokens": shard_tokens, "boundary_token": boundary_token,
                "bpe_vocab_size": (bpe_vocab_size or DEFAULT_BPE_VOCAB) if tokenizer == "bpe" else None}
    return plan, settings


def _write(plan: _Plan, settings: dict, tokenizer_spec: str, partial: Path, workers: int, shard_tokens: int,
           boundary_token: str, bpe_vocab_size: int, progress: _Progress, command: str | None,
           pretrained=None) -> dict:
    """Build the tokenizer, write it and every shard into ``partial``; the manifest to write."""
    tok = _build_tokenizer(tokenizer_spec, plan, bpe_vocab_size, boundary_token == "eos", progress, pretrained)
    boundary_id = tok.eos_token_id if boundary_token == "eos" else None
    dtype = token_dtype(tok.vocab_size)
    tok.save(partial / TOKENIZER_DIR)
    writers = {name: ShardWriter(partial, name, dtype, shard_tokens) for name in plan.split_names}
    sleep = float(os.environ.get(_SLOW_ENV, "0") or 0)
    closed = 0
    with progress("tokenizing", plan.known_count()) as bar:
        tokens = 0
        for split, ids, lengths, n_docs in _encoded(plan, _encoder_spec(tok, boundary_id, dtype), workers):
            writers[split].add_many(ids, lengths)
            tokens += ids.size
            bar.update(n_docs)
            bar.set_postfix_str(f"{tokens:,} tokens", refresh=False)
            if sleep and sum(len(w.shards) for w in writers.values()) > closed:
                import time

                closed = sum(len(w.shards) for w in writers.values())
                time.sleep(sleep)
    entries = {name: w.finish() for name, w in writers.items()}
    for name, entry in entries.items():
        if entry["documents"] == 0:
            hint = (f" at --valid-fraction {plan.fraction} (every {1 / plan.fraction:.3g}th document validates); "
                    "give more documents, a larger --valid-fraction or --split-files" if plan.fraction and name == "valid"
                    else "")
            raise DataError(f"the {name} split got no document{hint}")
    return {
        "format": FORMAT, "version": VERSION, "dtype": dtype.name, "vocab_size": tok.vocab_size,
        "boundary_token_id": boundary_id,
        "tokenizer": {"source": tokenizer_spec, "kind": tok.kind, "dir": TOKENIZER_DIR},
        "splits": entries,
        "sources": settings["sources"],
        "command": command or "prepare(...) (library call)",
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "settings": settings,
    }


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:300]


# --- the command -------------------------------------------------------------------------------

def add_arguments(p) -> Callable:
    """Add `minrnn prepare`'s options to the argparse parser ``p``; returns run(args) -> exit status."""
    import argparse

    from .. import argtypes

    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = (
        "examples:\n"
        "  minrnn prepare corpus/ --tokenizer bpe --out data/corpus\n"
        "  minrnn prepare 'books/**/*.txt' --tokenizer ./gpt2-tokenizer --out data/books --workers 4\n"
        "  minrnn prepare --split-files train=wiki.train.txt valid=wiki.valid.txt --document-per-line \\\n"
        "      --tokenizer byte --out data/wiki\n"
        "  minrnn prepare --dataset ./saved_dataset --split train=train valid=validation --tokenizer char --out data/ds\n"
        "A text file is one document (--document-per-line: each non-empty line is one); a .jsonl/.json or .parquet\n"
        "row is one (its --text-field). The folder holds manifest.json, tokenizer/ and <split>-NNNNN.bin shards\n"
        "(docs: the data page).")
    p.add_argument("sources", nargs="*", metavar="SOURCE",
                   help="text files, folders (every file under them), globs, .jsonl/.json/.parquet files")
    p.add_argument("--tokenizer", required=True, metavar="TOKENIZER",
                   help="char, byte, bpe (trained on the train split), or an AutoTokenizer name or local folder")
    p.add_argument("--out", required=True, type=Path, metavar="DIR", help="the prepared folder to write")
    p.add_argument("--text-field", default="text", metavar="NAME", help="the text column of json/parquet/dataset rows "
                                                                        "(default text)")
    p.add_argument("--document-per-line", action="store_true",
                   help="text files: each non-empty line is a document (default: each file is one)")
    p.add_argument("--dataset", default=None, metavar="NAME_OR_PATH",
                   help="read a datasets dataset: a folder saved with save_to_disk, a local dataset folder or a hub name")
    p.add_argument("--split", nargs="+", default=None, metavar="S", dest="dataset_splits",
                   help="--dataset's split to read (default train; split by --valid-fraction), or OUT=SPLIT "
                        "items (train=train valid=validation)")
    p.add_argument("--streaming", action="store_true", help="--dataset: stream it instead of downloading it first")
    p.add_argument("--valid-fraction", type=float, default=None, metavar="F",
                   help=f"this fraction of the documents validates (default {DEFAULT_VALID_FRACTION}; 0: no valid split)")
    p.add_argument("--split-files", nargs="+", default=None, metavar="SPLIT=SOURCE",
                   help="named splits instead: train=SOURCE valid=SOURCE ... (repeat a split for more sources)")
    p.add_argument("--workers", type=argtypes.positive_int, default=1, metavar="N",
                   help="processes that tokenize (default 1); the output is the same for any N")
    p.add_argument("--shard-tokens", type=argtypes.positive_int, default=DEFAULT_SHARD_TOKENS, metavar="N",
                   help="close a shard after the document that brings it to N tokens (default 2**27)")
    p.add_argument("--boundary-token", choices=["eos", "none"], default="eos",
                   help="eos (default): each document starts with the end-of-text token (<|endoftext|> added "
                        "when the tokenizer has none); none: documents only in the index")
    p.add_argument("--bpe-vocab-size", type=argtypes.positive_int, default=None, metavar="N",
                   help=f"--tokenizer bpe: ids to learn (default {DEFAULT_BPE_VOCAB})")
    p.add_argument("--overwrite", action="store_true", help="replace a prepared folder made differently")
    p.add_argument("--progress", choices=["auto", "always", "never"], default="auto",
                   help="progress bars on stderr: auto (default: when it is a terminal), always, never")

    def run(args) -> int:
        prepare(args.sources, args.tokenizer, args.out, text_field=args.text_field, dataset=args.dataset,
                dataset_splits=args.dataset_splits, streaming=args.streaming, valid_fraction=args.valid_fraction,
                split_files=args.split_files, document_per_line=args.document_per_line, workers=args.workers,
                shard_tokens=args.shard_tokens, boundary_token=args.boundary_token,
                bpe_vocab_size=args.bpe_vocab_size, overwrite=args.overwrite,
                progress={"auto": None, "always": True, "never": False}[args.progress],
                command=getattr(args, "command_line", None))
        return 0

    return run

