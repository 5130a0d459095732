"""The wheel, installed with its extras in a fresh virtual environment outside the checkout, does what the README says.

Marked ``wheel`` (``pytest -m wheel`` selects it, ``-m "not wheel"`` leaves it out): it builds the
wheel, creates a venv in a temporary folder and installs ``minrnn[train,hf]`` there, with the
versions the project tests (requirements-dev.txt, torch==2.13.0 among them) as pip constraints.
It needs an index (PyPI or a local one) for the build backend and the dependencies: minutes.
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
import venv
from pathlib import Path

import pytest

from .corpus import missing_corpus

pytestmark = pytest.mark.wheel

ROOT = Path(__file__).resolve().parents[1]
VERSION = re.search(r'^__version__ = "([^"]+)"', (ROOT / "src/minrnn/__init__.py").read_text(), re.M).group(1)


def _run(cmd: list, cwd: Path, env: dict, timeout: float = 600) -> subprocess.CompletedProcess:
    r = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{' '.join(map(str, cmd))} exited {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(venv python, a work folder outside the checkout, the environment to run in)."""
    tmp = tmp_path_factory.mktemp("wheel")
    assert ROOT not in tmp.parents
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    dist = tmp / "dist"
    _run([sys.executable, "-m", "build", "--wheel", "--outdir", dist, ROOT], tmp, env)
    (wheel,) = dist.glob("minrnn-*.whl")
    assert wheel.name.startswith(f"minrnn-{VERSION}-")

    pins = [line.strip() for line in (ROOT / "requirements-dev.txt").read_text().splitlines()
            if re.match(r"^[A-Za-z0-9_.\[\]-]+==", line.strip())]
    assert "torch==2.13.0" in pins
    constraints = tmp / "constraints.txt"
    constraints.write_text("".join(re.sub(r"\[.*\]", "", p) + "\n" for p in pins))

    venv.create(tmp / "venv", with_pip=True)
    python = tmp / "venv" / "bin" / "python"
    _run([python, "-m", "pip", "install", "--quiet", f"{wheel}[train,hf]", "-c", constraints], tmp, env, timeout=1200)
    work = tmp / "work"
    work.mkdir()
    env["PATH"] = f"{python.parent}{os.pathsep}{env.get('PATH', '')}"
    return python, work, env


def test_installed_from_the_wheel_not_the_checkout(installed):
    python, work, env = installed
    r = _run([python, "-c", "import minrnn, pathlib; p = pathlib.Path(minrnn.__file__).parent; "
              "print(p); print((p / 'py.typed').exists())"], work, env)
    where, typed = r.stdout.split()
    assert Path(where).is_relative_to(python.parent.parent) and typed == "True"


def test_readme_quick_start(installed):
    python, work, env = installed
    sys.path.insert(0, str(ROOT / "tests"))
    try:
        from test_docs import python_blocks
    finally:
        sys.path.pop(0)
    blocks = [code for _, code, runs in python_blocks((ROOT / "README.md").read_text()) if runs]
    assert len(blocks) >= 2
    script = work / "readme_quick_start.py"
    script.write_text("\n".join(blocks))
    _run([python, script], work, env)


def test_cpu_backend_is_available(installed):
    python, work, env = installed
    r = _run([python, "-c", "import minrnn; print(','.join(minrnn.available_backends()))"], work, env)
    assert "cpu" in r.stdout.strip().split(","), r.stdout


def test_version(installed):
    """`minrnn --version` (the CLI prints the installed version)."""
    python, work, env = installed
    r = _run([python.parent / "minrnn", "--version"], work, env)
    assert VERSION in r.stdout


@pytest.fixture(scope="module")
def trained_run(installed):
    python, work, env = installed
    reason = missing_corpus("tinyshakespeare", "input")  # the preset's corpus, which has no download here
    if reason:
        pytest.skip(reason)
    run = work / "runs" / "shakespeare_char"
    _run([python.parent / "minrnn", "train", "shakespeare_char", "--steps", 5, "--out_dir", run,
          "--progress", "never"], work, env)
    return run


def test_train_a_preset_by_name(trained_run):
    assert (trained_run / "metrics.jsonl").exists()
    steps = [json.loads(line).get("step") for line in (trained_run / "metrics.jsonl").read_text().splitlines()]
    assert max(s for s in steps if s is not None) == 5


def test_generate_on_the_run(installed, trained_run):
    python, work, env = installed
    r = _run([python.parent / "minrnn", "generate", "--run", trained_run, "--prompt", "ROMEO:", "--tokens", 20,
              "--seed", 0], work, env)
    assert r.stdout.startswith("ROMEO:") and len(r.stdout) >= len("ROMEO:") + 20


def test_the_checkpoint_is_a_transformers_model(installed, trained_run):
    """AutoModelForCausalLM / AutoTokenizer / pipeline("text-generation") on the run's checkpoint folder."""
    python, work, env = installed
    folders = sorted({p.parent for p in trained_run.rglob("config.json") if (p.parent / "model.safetensors").exists()})
    assert folders, f"no checkpoint folder with config.json and model.safetensors under {trained_run}"
    code = """
import sys
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline
import minrnn.models  # registers the model type with the Auto classes
model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
tokenizer = AutoTokenizer.from_pretrained(sys.argv[1])
assert type(model).__name__ == "MinRNNForCausalLM", type(model)
text = pipeline("text-generation", model=model, tokenizer=tokenizer)("ROMEO:", max_new_tokens=10, do_sample=False)
out = text[0]["generated_text"]
assert out.startswith("ROMEO:") and len(out) > len("ROMEO:"), out
print(out)
"""
    for folder in folders:
        _run([python, "-c", code, folder], work, env)


def test_compare_text_on_a_users_file(installed):
    """`minrnn compare text --data FILE`: minGRU beside a Transformer on a corpus of one's own."""
    python, work, env = installed
    words = ["the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "far", "away", "from", "home"]
    corpus = work / "corpus.txt"
    corpus.write_text(" ".join(words[(i * 7 + i // 13) % len(words)] for i in range(6000)))
    _run([python.parent / "minrnn", "compare", "text", "--data", corpus, "--models", "mingru,llama", "--steps", 5,
          "--out", work / "compare", "--no-progress"], work, env)
    results = json.loads((work / "compare" / "text-cpu" / "results.json").read_text())
    assert sorted(r["model"] for r in results) == ["llama", "mingru"]


def test_pipeline_on_the_runs_best_link(installed, trained_run):
    python, work, env = installed
    code = ("import sys, minrnn.models; from transformers import pipeline; "
            "print(repr(pipeline('text-generation', model=sys.argv[1])('ROMEO:', max_new_tokens=5, do_sample=False)"
            "[0]['generated_text']))")
    r = _run([python, "-c", code, trained_run / "best"], work, env)
    out = ast.literal_eval(r.stdout.strip().splitlines()[-1])  # the repr of the generated text (5 steps: often spaces)
    assert out.startswith("ROMEO:") and len(out) == len("ROMEO:") + 5, out
