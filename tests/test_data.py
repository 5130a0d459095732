import pytest

from minrnn.data import locate_corpus

from .corpus import SHAKESPEARE_SAMPLE, requires_corpus, shakespeare


@requires_corpus("tinyshakespeare", "input")
def test_locate_shared_corpus():
    path = locate_corpus("tinyshakespeare", "input")
    assert path.stat().st_size == 1115394
    # the tests' shipped sample is the corpus's head, so tests that read it read the corpus
    assert path.read_text(encoding="utf-8").startswith(shakespeare())


def test_a_file_with_another_checksum_is_refused(tmp_path):
    bad = tmp_path / "tinyshakespeare"
    bad.mkdir()
    (bad / "input.txt").write_text("not shakespeare")
    with pytest.raises(ValueError, match="sha256"):
        locate_corpus("tinyshakespeare", "input", data_dir=tmp_path)


def test_the_shipped_sample_is_whole():
    assert SHAKESPEARE_SAMPLE.stat().st_size == 60_000 and shakespeare().startswith("First Citizen:\n")
    with pytest.raises(ValueError, match="n=60001"):
        shakespeare(60_001)


def test_missing_corpus_says_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.setenv("MINRNN_DATA_DIR", str(tmp_path / "nowhere"))
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"tinyshakespeare/input.txt not found; looked in: .*nowhere"):
        locate_corpus("tinyshakespeare", "input")
    with pytest.raises(KeyError, match="unknown corpus"):
        locate_corpus("imagenet", "train")
