"""The CPU probing scripts under benchmarks/ run end to end on tiny sizes (they are tools for
working on the kernels, so they must not rot between the sessions that use them)."""

import importlib.util
import json
from pathlib import Path

import pytest

from minrnn.ops import cpu

ROOT = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.skipif(not cpu.available(), reason="numba is not installed")
@pytest.mark.parametrize("cell", ["mingru", "minlstm"])
def test_cell_breakdown_times_every_part(cell, tmp_path, capsys):
    out = tmp_path / "bd.json"
    assert _load("cpu_cell_breakdown").main(["--cell", cell, "--lengths", "5", "--batch", "2", "--width", "8",
                                             "--repeats", "2", "--json", str(out)]) == 0
    med = json.loads(out.read_text())["median_ms"]["5"]
    assert set(med) == {"projection", "matmuls alone", "layer", "kernel fwd", "kernel bwd", "kernel fwd, kept",
                        "kernel bwd, in place", "cell fwd+bwd", "cell, cache off",
                        "scan, cache on", "scan, cache off"}
    assert all(v > 0 for v in med.values())
    printed = capsys.readouterr().out
    assert "x projection" in printed and printed.startswith(f"{cell}, B=2")


@pytest.mark.skipif(not cpu.available(), reason="numba is not installed")
@pytest.mark.parametrize("between", ["flush", "idle"])
def test_cell_breakdown_can_time_each_part_after_a_flush_or_a_pause(between, capsys):
    mod = _load("cpu_cell_breakdown")
    assert mod.main(["--lengths", "5", "--batch", "2", "--width", "8", "--repeats", "1", "--between", between]) == 0
    assert f"{between} before each" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        mod.main(["--between", "sideways"])


def test_lm_step_profile_times_models_side_by_side_and_profiles_them(capsys):
    mod = _load("lm_step_profile")
    assert mod.parse_model("mingru:width=24,use_conv=False,cell_note=x") == (
        "mingru", {"width": 24, "use_conv": False, "cell_note": "x"})
    with pytest.raises(ValueError, match="not key=value"):
        mod.parse_model("mingru:width")
    assert mod.main(["lstm", "gru:width=12", "--target-params", "20000", "--batch", "2", "--seq-len", "8",
                     "--rounds", "2", "--per-round", "1", "--warmup", "1", "--top", "3"]) == 0
    text = capsys.readouterr().out
    rows = [line for line in text.splitlines() if line.startswith("| lstm") or line.startswith("| gru")]
    assert len(rows) == 2
    assert rows[0].endswith("| 1.000 |")
    assert rows[1].split("|")[2].strip() == "12"  # the width override was built
    assert text.count(", 20 steps:") == 2 and "Self CPU" in text  # one profile per model
