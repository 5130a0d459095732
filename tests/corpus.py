"""Text for the tests, so that a fresh clone with no data folder runs them: a sample of tiny
shakespeare shipped beside this file, and a skip for the few tests that need a whole corpus
(CI has the corpora in ../shared/data, so there they all run)."""

from pathlib import Path

import pytest

SAMPLES = Path(__file__).resolve().parent / "samples"
SHAKESPEARE_SAMPLE = SAMPLES / "tinyshakespeare_head.txt"  # the corpus's first 60,000 characters


def shakespeare(n: int = 60_000) -> str:
    """The first ``n`` (at most 60,000) characters of tiny shakespeare, read from the shipped sample."""
    text = SHAKESPEARE_SAMPLE.read_text(encoding="utf-8")
    if n > len(text):
        raise ValueError(f"n={n} is more than the {len(text)} characters of {SHAKESPEARE_SAMPLE.name}")
    return text[:n]


def missing_corpus(corpus: str, *splits: str) -> str | None:
    """Why ``corpus`` (these splits) cannot be used here, or None when every split is found."""
    from minrnn.data import locate_corpus

    for split in splits:
        try:
            locate_corpus(corpus, split)
        except FileNotFoundError as e:
            return f"needs the {corpus} corpus ({split} split), not found: {str(e).split('. ')[0]}"
    return None


def requires_corpus(corpus: str, *splits: str):
    """Marks a test that reads a whole corpus: skipped, saying which one, where it is absent.
    Decided when the test module is imported, after tests/conftest.py has pointed
    MINRNN_DATA_DIR at ../shared/data (where it exists)."""
    reason = missing_corpus(corpus, *splits)
    return pytest.mark.skipif(reason is not None, reason=reason or "")
