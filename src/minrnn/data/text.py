"""Text splits for language-model training, and the windows a run reads from them.

`load_splits` turns the config's ``data`` into {"train": str, "valid": str[, "test": str]}:
  - a named corpus (a record of minrnn.data.corpora, e.g. tinyshakespeare, wikitext-2): one
    file split by its ``train_fraction`` (downloaded first, its checksum checked, when it is
    missing and a network is there), or a folder of that name in the data directories holding
    train/valid[/test] files (fetched from the record's source when no such folder exists;
    files whose SHA-256 is recorded are checked);
  - a text file: the first 90% of its characters train, the rest validate (nanoGPT's split);
  - a folder holding train/valid[/test] files (``train.txt``, ``valid.txt`` or ``val.txt``, ...).

Where a run reads is a pure function of (seed, step, micro-step): `train_offsets` draws the
offsets of a step's global batch from a generator seeded with those numbers, and each process
takes its own rows. A resumed run therefore reads exactly what an uninterrupted one would,
without any data-loader state in the checkpoint, and N processes together read what one
process reads.

The windows are read from a token source: anything with ``len()`` (its tokens) and
``gather(offsets, length)`` (rows of consecutive tokens). An in-memory split is a
`TensorTokens`; a split of a prepared folder (minrnn.data.shards) is a ``TokenStream``, read
through its memory map, which also knows where its documents start: `packed_windows` and
`document_positions` read those for training on packed documents.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .corpora import CORPORA, locate_corpus, search_dirs, sha256_of
from .download import download_from_hub, ensure_corpus

_SPLIT_NAMES = {
    "train": ("train.txt", "train", "wiki.train.tokens", "train.tokens"),
    "valid": ("valid.txt", "val.txt", "validation.txt", "valid", "wiki.valid.tokens", "valid.tokens"),
    "test": ("test.txt", "test", "wiki.test.tokens", "test.tokens"),
}
TRAIN_FRACTION = 0.9


class DataError(ValueError):
    """Data that cannot be used as asked (the message says what and where)."""


def split_90_10(text: str, fraction: float = TRAIN_FRACTION) -> dict[str, str]:
    """The first ``fraction`` of the characters train, the rest validate."""
    n = int(len(text) * fraction)
    return {"train": text[:n], "valid": text[n:]}


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text ({e})") from None


def load_splits(data: str, data_dir: str | None = None, splits: tuple[str, ...] | None = None) -> dict[str, str]:
    """The text of each split of ``data`` (see the module docstring). ``splits``: only these, and
    a named corpus whose files for them all have recorded checksums is read from those files
    alone (the other splits need not be on disk)."""
    corpus = CORPORA.get(data)
    if corpus is not None and splits and all(s in corpus.files for s in splits):
        try:
            return {s: _read(locate_corpus(data, s, data_dir)) for s in splits}
        except ValueError as e:  # a checksum that differs
            raise DataError(str(e)) from None
    if corpus is not None and corpus.layout == "file":
        try:
            out = split_90_10(_read(ensure_corpus(data, "input", data_dir)), corpus.train_fraction)
        except ValueError as e:  # a file or a download whose checksum is wrong
            raise DataError(str(e)) from None
    elif corpus is not None:
        out = _named_folder(data, data_dir)
    else:
        path = Path(data).expanduser()
        if path.is_file():
            out = split_90_10(_read(path))
        elif path.is_dir():
            out = {split: _read(f) for split, f in _folder_files(path).items()}
        else:
            raise DataError(f"data {data!r} is neither a named corpus ({', '.join(CORPORA)}) nor an "
                            f"existing file or folder (looked for {path.resolve()})")
    if splits is None:
        return out
    missing = [s for s in splits if s not in out]
    if missing:
        raise DataError(f"data {data!r} has no {missing[0]} split here (found {', '.join(sorted(out))})")
    return {s: out[s] for s in splits}


def _folder_files(path: Path) -> dict[str, Path]:
    out = {}
    for split, names in _SPLIT_NAMES.items():
        found = next((path / n for n in names if (path / n).is_file()), None)
        if found is not None:
            out[split] = found
    for split in ("train", "valid"):
        if split not in out:
            raise DataError(f"{path} has no {split} file; looked for {', '.join(_SPLIT_NAMES[split])}")
    return out


def _named_folder(corpus: str, data_dir: str | None, download: bool = True) -> dict[str, str]:
    tried = []
    for d in search_dirs(data_dir):
        folder = d / corpus
        tried.append(str(folder))
        if not folder.is_dir():
            continue
        try:
            files = _folder_files(folder)
        except DataError as e:
            tried[-1] += f" ({e})"
            continue
        for split, f in files.items():
            spec = CORPORA[corpus].files.get(split)
            if spec is not None and sha256_of(f) != spec.sha256:
                raise DataError(f"{f} is not the {corpus} {split} file: its sha256 differs from the "
                                f"published {spec.sha256}")
        return {split: _read(f) for split, f in files.items()}
    hub = CORPORA[corpus].hub
    if hub is None:
        raise FileNotFoundError(f"{corpus} not found; looked in: {'; '.join(tried)}. Put its train/valid[/test] "
                                "files in a folder of that name in one of these places")
    if not download:
        raise FileNotFoundError(f"{corpus} not found after downloading it; looked in: {'; '.join(tried)}")
    try:
        download_from_hub(corpus, data_dir)
    except ValueError as e:  # a download whose checksum is wrong
        raise DataError(str(e)) from None
    except Exception as e:  # no network, HTTP error, DNS failure
        raise FileNotFoundError(
            f"{corpus} not found; looked in: {'; '.join(tried)}; downloading {hub.url} failed "
            f"too ({e}). Put train.txt, valid.txt and test.txt (or wiki.*.tokens) in a folder {corpus}/ under "
            "MINRNN_DATA_DIR (or --data_dir), or pass --data FOLDER") from None
    return _named_folder(corpus, data_dir, download=False)


def encode_splits(tokenizer, splits: dict[str, str]) -> dict[str, torch.Tensor]:
    """Each split as a 1-D int64 tensor of token ids."""
    return {k: torch.tensor(tokenizer.encode(v), dtype=torch.long) for k, v in splits.items()}


class TensorTokens:
    """A 1-D int64 tensor of token ids as a token source (the in-memory form of a split)."""

    def __init__(self, tokens: torch.Tensor):
        self.tokens = tokens

    def __len__(self) -> int:
        return self.tokens.numel()

    def gather(self, offsets, length: int) -> torch.Tensor:
        """Rows ``tokens[o : o + length]`` for each offset: (len(offsets), length) int64."""
        return self.tokens[torch.as_tensor(offsets)[:, None] + torch.arange(length)]


def token_source(tokens):
    """``tokens`` as a token source: a tensor wrapped in `TensorTokens`, a source as it is."""
    return TensorTokens(tokens) if isinstance(tokens, torch.Tensor) else tokens


def check_long_enough(tokens, seq_len: int, split: str) -> None:
    """A DataError when ``tokens`` (a tensor or a token source) cannot hold one window."""
    n = len(token_source(tokens))
    if n < seq_len + 1:
        raise DataError(f"the {split} split has {n} tokens; one window of seq_len + 1 = "
                        f"{seq_len + 1} tokens does not fit (use a longer file or a smaller --seq_len)")


def _generator(*numbers: int) -> torch.Generator:
    # an odd-multiplier mix of the numbers: distinct (seed, step, micro) get distinct streams
    s = 0
    for n in numbers:
        s = (s * 6364136223846793005 + n + 1442695040888963407) % (1 << 63)
    return torch.Generator().manual_seed(s)


def train_offsets(n_tokens: int, seq_len: int, global_batch: int, seed: int, step: int, micro: int) -> torch.Tensor:
    """Start offsets (global_batch,) of the windows of one micro-step, the same in every process."""
    return torch.randint(0, n_tokens - seq_len, (global_batch,), generator=_generator(seed, step, micro))


def stream_offsets(n_tokens: int, seq_len: int, rows: int, index: int) -> tuple[torch.Tensor, bool]:
    """(offsets (rows,) int64, restart) of window ``index`` (0, 1, 2, ...) of a stateful run's
    contiguous streams: row r reads the r-th of ``rows`` equal parts of the ``n_tokens`` tokens,
    one window of ``seq_len`` (+1 target) after the other; after its last whole window every row
    starts its part again, and ``restart`` is True there (the carried state starts from zeros).
    A DataError when a part is too short for one window."""
    part = n_tokens // rows
    per_pass = (part - 1) // seq_len
    if per_pass < 1:
        raise DataError(f"stateful: {n_tokens:,} tokens cut into {rows} streams give {part:,} tokens each, "
                        f"fewer than one window of seq_len {seq_len} + 1; lower batch_size or seq_len")
    k = index % per_pass
    return torch.arange(rows, dtype=torch.long) * part + k * seq_len, k == 0


def windows(tokens, offsets: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-token targets, each (len(offsets), seq_len) int64, of ``tokens`` (a 1-D
    tensor or a token source) at ``offsets`` (N,) int64."""
    w = torch.as_tensor(token_source(tokens).gather(offsets.numpy(), seq_len + 1))
    return w[:, :-1], w[:, 1:]


def _pack(stream, offsets: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(starts (N,), begins (N, seq_len) bool: True where a document starts in the window) of
    the packed windows of ``offsets``; see `packed_starts`. One index lookup per row."""
    last = len(stream) - seq_len - 1
    starts = offsets.clone()
    begins = torch.zeros(len(offsets), seq_len, dtype=torch.bool)
    for i, o in enumerate(offsets.tolist()):
        # every start a window moved from o can begin at or hold: up to o + seq_len, then seq_len on
        found = stream.document_starts(o, o + 2 * seq_len)
        reach = found[found <= min(o + seq_len, last)]
        s = int(reach[0]) if len(reach) else o  # none within reach: a piece of one long document
        starts[i] = s
        begins[i, torch.from_numpy(found[(found > s) & (found < s + seq_len)] - s)] = True
    return starts, begins


def _restart(begins: torch.Tensor) -> torch.Tensor:
    """position_ids (N, T) int64: each position's distance from the latest True of ``begins``
    (N, T) at or before it, or from the row's first position."""
    begins = begins.clone()
    begins[:, 0] = True
    index = torch.arange(begins.shape[1]).expand_as(begins)
    return index - torch.where(begins, index, 0).cummax(dim=1).values


def packed_starts(stream, offsets: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Where the packed windows of ``offsets`` (N,) int64 start: each offset moved to the first
    document start of ``stream`` at or after it, looked for up to ``seq_len`` tokens on (and no
    later than the last offset a whole window fits at); an offset with none there lies in a
    document longer than a window, and its window starts at the offset itself (a window-long
    piece of that document). A pure function of the offsets and the document index."""
    return _pack(stream, offsets, seq_len)[0]


def document_positions(stream, starts: torch.Tensor, seq_len: int) -> torch.Tensor:
    """position_ids (N, seq_len) int64 of the windows of ``stream`` at ``starts`` (N,): each
    position's distance from the latest document start in its window, or from the window's
    first token (transformers' padding-free convention: 0 where a document, or the window, begins)."""
    begins = torch.zeros(len(starts), seq_len, dtype=torch.bool)
    for i, s in enumerate(starts.tolist()):
        begins[i, torch.from_numpy(stream.document_starts(s + 1, s + seq_len) - s)] = True
    return _restart(begins)


def packed_windows(stream, offsets: torch.Tensor, seq_len: int
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inputs, targets and position_ids, each (len(offsets), seq_len) int64, of the windows of
    packed documents at ``offsets`` (see `packed_starts` and `document_positions`)."""
    starts, begins = _pack(stream, offsets, seq_len)
    x, y = windows(stream, starts, seq_len)
    return x, y, _restart(begins)


def eval_offsets(n_tokens: int, seq_len: int, count: int) -> torch.Tensor:
    """``count`` window offsets spread evenly over a split (no randomness: every evaluation,
    and `minrnn eval`, scores the same windows). Fewer when the split is short."""
    last = n_tokens - seq_len - 1
    count = max(1, min(count, last // seq_len + 1))
    return torch.linspace(0, last, count).round().long().unique()
