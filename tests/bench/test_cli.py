"""`minrnn bench --quick` end to end, in a subprocess, as a user runs it.

Timings are never asserted: only that every candidate and length has a row with the
fields the README promises, that the files are written and the tables printed.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import minrnn
from minrnn.cli import _SUBCOMMANDS, build_parser, main

SRC = Path(__file__).resolve().parents[2] / "src"


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(SRC)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return env


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    # one thread: on a shared machine, extra OpenMP threads only spin
    proc = subprocess.run([sys.executable, "-m", "minrnn", "bench", "--quick", "--threads", "1", "--out", str(out)],
                          capture_output=True, text=True, env=_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr
    return out, proc.stdout


def _load(out, suite):
    return json.loads((out / f"{suite}.json").read_text())


def test_quick_writes_json_png_and_prints_tables(quick_run):
    out, stdout = quick_run
    for suite in ("layers", "scan", "decode"):
        doc = _load(out, suite)
        assert doc["meta"]["command"].startswith("minrnn bench --quick")
        assert doc["meta"]["threads"] == 1 and doc["meta"]["quick"] is True
        assert doc["meta"]["malloc"].startswith("retain")  # glibc here (the default policy)
        assert (out / f"{suite}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for heading in ("### Layers, B=", "malloc retain", "### Scan alone", "### Decoding", "### Targets", "| candidate "):
        assert heading in stdout


def test_layer_rows_cover_every_candidate_and_length(quick_run):
    out, _ = quick_run
    doc = _load(out, "layers")
    rows, configs = doc["result"]["rows"], doc["result"]["configs"]
    names = {c["name"] for c in doc["result"]["candidates"]}
    for be in minrnn.available_backends():
        assert {f"minGRU[{be}]", f"minLSTM[{be}]"} <= names
    assert {"paper-minGRU", "nn.GRU", "nn.LSTM", "Linear(D,2D)", "Linear(D,3D)"} <= names
    assert len(configs) == 3  # the main configuration, one more width, one more batch
    expected = {(c["batch"], c["width"], T, n) for c in configs for T in c["lengths"] for n in names}
    assert {(r["batch"], r["width"], r["T"], r["candidate"]) for r in rows} == expected
    for r in rows:
        for key in ("ms", "times_ms", "ratio_floor", "ratio_rnn", "peak_bytes", "saved_bytes", "max_abs_err", "note"):
            assert key in r
        assert r["ms"] is not None and r["ms"] > 0, r  # tiny sizes: nothing is skipped
        assert r["peak_bytes"] > 0 and r["saved_bytes"] > 0
        if r["role"] == "floor":
            assert r["ratio_floor"] == 1.0
        if r["role"] in ("minrnn", "paper"):
            assert r["max_abs_err"] < 1e-5  # float32 vs the float64 loop, at T <= 64
        else:
            assert r["max_abs_err"] is None
    assert sum(r["default"] for r in rows if r["T"] == 16 and r["batch"] == configs[0]["batch"]
               and r["width"] == configs[0]["width"]) == 2  # one auto backend per family


def test_scan_and_decode_rows(quick_run):
    out, _ = quick_run
    scan = _load(out, "scan")["result"]
    assert scan["copy"]["bytes_moved"] == 2 * scan["copy"]["buffer_bytes"]
    for r in scan["rows"]:
        assert r["bytes"] == 8 * r["elements"] * 4
        assert r["gbps"] == pytest.approx(r["bytes"] / (r["ms"] / 1e3) / 1e9)
        assert r["pct_copy"] == pytest.approx(100 * r["gbps"] / scan["copy"]["gbps"])
        assert r["max_abs_err"] < 1e-5 and r["grad_rel_err"] < 1e-5
    decode = _load(out, "decode")["result"]
    # minGRU-bf16 / -int8: the minGRU model with low-precision weights for decoding
    models = ("minGRU", "minLSTM", "minGRU-hybrid", "Llama", "LSTM", "minGRU-bf16", "minGRU-int8")
    expected = {(m, mode, b, c) for m in models for mode in ("generate", "step") for b in (1, 3) for c in (8, 16)
                if (m, mode) != ("LSTM", "generate")}
    expected |= {("minGRU", "matmul", b, c) for b in (1, 3) for c in (8, 16)}
    expected |= {(m, "general", b, c) for m in ("minGRU", "minLSTM") for b in (1, 3) for c in (8, 16)}
    assert {(r["model"], r["mode"], r["batch"], r["context"]) for r in decode["rows"]} == expected
    kv = {(r["batch"], r["context"]): r["state_bytes"] for r in decode["rows"]
          if r["model"] == "Llama" and r["mode"] == "step"}
    assert kv[(1, 16)] == 2 * kv[(1, 8)] and kv[(3, 8)] == 3 * kv[(1, 8)]  # the KV cache grows
    for m in ("minGRU", "minLSTM", "LSTM"):  # a recurrent state does not
        assert len({r["state_bytes"] for r in decode["rows"]
                    if r["model"] == m and r["mode"] == "step" and r["batch"] == 1}) == 1


def test_import_minrnn_does_not_import_bench_or_matplotlib():
    code = ("import sys, minrnn, minrnn.cli; "
            "bad = [m for m in ('minrnn.bench', 'matplotlib') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, env=_env(), timeout=120)


def test_cli_rejects_bad_arguments(capsys):
    for argv in (["bench", "--suite", "nope"], ["bench", "--repeats", "0"], ["bench", "--threads", "-1"],
                 ["bench", "--device", "tpu"], []):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
    assert "--repeats" in capsys.readouterr().err


def test_every_subcommand_has_help(capsys):
    parser = build_parser()
    for name in _SUBCOMMANDS:
        with pytest.raises(SystemExit) as e:
            parser.parse_args([name, "--help"])
        assert e.value.code == 0
        assert f"usage: minrnn {name}" in capsys.readouterr().out


def test_bench_runs_without_the_minrnn_command():
    """`python -m minrnn.bench` is bench's own entry point: it never imports minrnn.cli."""
    code = ("import sys, minrnn.bench.command as c, minrnn.bench.suites; "
            "assert 'minrnn.cli' not in sys.modules; "
            "c.main(['--help'])")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "usage: python -m minrnn.bench" in proc.stdout and "--quick" in proc.stdout


def test_results_go_to_an_untracked_runs_folder_by_default(monkeypatch):
    from minrnn.bench import command, suites

    seen = {}
    monkeypatch.setattr(suites, "run", lambda names, settings, command: seen.update(
        names=names, out=settings.out, command=command))
    assert command.main(["--quick", "--suite", "scan"]) == 0
    assert seen == {"names": ["scan"], "out": Path("runs/bench/quick"),
                    "command": "python -m minrnn.bench --quick --suite scan"}
    assert main(["bench", "--suite", "layers", "--out", "elsewhere"]) == 0
    assert seen["out"] == Path("elsewhere") and seen["command"] == "minrnn bench --suite layers --out elsewhere"
    assert main(["bench"]) == 0 and seen["out"] == Path("runs/bench")


def test_bench_imports_nothing_above_the_models():
    """Data flows one way (ops -> functional -> layers -> models -> training -> experiments ->
    bench -> cli): the bench measures the library, builds its decode models with the
    experiments' factory (minrnn.experiments.baselines), and imports neither the command line
    nor the training engine itself."""
    import ast

    above = {"cli", "training"}
    for path in (SRC / "minrnn" / "bench").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""] + [a.name for a in node.names if node.module is None or node.level]
                parts = {p for n in names for p in n.split(".")}
                if node.level >= 2 or (node.module or "").startswith("minrnn"):
                    assert not parts & above, f"{path.name}:{node.lineno} imports {names}"
            elif isinstance(node, ast.Import):
                for a in node.names:
                    assert not set(a.name.split(".")[1:2]) & above, f"{path.name}:{node.lineno} imports {a.name}"
