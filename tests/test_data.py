import pytest

from minrnn.data import locate_corpus


def test_locate_shared_corpus_checks_checksum(tmp_path, monkeypatch):
    path = locate_corpus("tinyshakespeare", "input")  # the Makefile points MINRNN_DATA_DIR at ../shared/data
    assert path.stat().st_size == 1115394
    bad = tmp_path / "tinyshakespeare"
    bad.mkdir()
    (bad / "input.txt").write_text("not shakespeare")
    with pytest.raises(ValueError, match="sha256"):
        locate_corpus("tinyshakespeare", "input", data_dir=tmp_path)


def test_missing_corpus_says_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.setenv("MINRNN_DATA_DIR", str(tmp_path / "nowhere"))
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"tinyshakespeare/input.txt not found; looked in: .*nowhere"):
        locate_corpus("tinyshakespeare", "input")
    with pytest.raises(KeyError, match="unknown corpus"):
        locate_corpus("imagenet", "train")
