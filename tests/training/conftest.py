import os
import subprocess
from pathlib import Path

import pytest

from ..corpus import shakespeare

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "src" / "minrnn" / "training" / "presets" / "tiny_test.toml"


@pytest.fixture(scope="session")
def small_text(tmp_path_factory) -> Path:
    """The first 60,000 characters of tiny shakespeare: enough for the tests' windows, quick to tokenize."""
    text = shakespeare(60_000)
    path = tmp_path_factory.mktemp("data") / "shakespeare_small.txt"
    path.write_text(text)
    return path


def cli_env() -> dict:
    """The environment of a `python -m minrnn` subprocess: this checkout's sources, one thread."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", "")
    env.update(OMP_NUM_THREADS="1", NUMBA_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return env


def minrnn(*args) -> subprocess.CompletedProcess:
    """`minrnn ARGS` run in this process (a subprocess would import transformers again, ~5 s):
    its exit status, stdout, and stderr with the warnings it raised appended as lines."""
    import contextlib
    import io
    import warnings

    from minrnn.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), \
            warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            code = main([str(a) for a in args])
        except SystemExit as e:  # argparse's own usage errors
            code = e.code
    stderr = err.getvalue() + "".join(f"{w.category.__name__}: {w.message}\n" for w in caught)
    return subprocess.CompletedProcess(args, code, out.getvalue(), stderr)


@pytest.fixture(scope="session")
def trained_run(small_text, tmp_path_factory):
    """A short char-level run: 100 steps of 16 x 64 characters from 54k characters of Shakespeare."""
    out = tmp_path_factory.mktemp("run") / "shakespeare"
    r = minrnn("train", TINY, "--data", small_text, "--out_dir", out, "--steps", 100, "--batch_size", 16,
               "--seq_len", 64, "--eval_every", 50, "--checkpoint_every", 25, "--sample_tokens", 40,
               "--plot", "true")
    assert r.returncode == 0, r.stderr
    return out, r


def assert_one_line_error(result, *fragments) -> str:
    """A CLI user error: exit code 2, no traceback, one 'error:' line holding every fragment."""
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(lines) == 1, result.stderr
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    return lines[0]
