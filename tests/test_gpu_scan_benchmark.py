"""benchmarks/gpu_scan.py runs every code path in its --dry-run (tiny CPU sizes, stand-ins),
so a script meant for a rare GPU session is known to work before it gets one."""

import json

from .scripts import load_script


def _load():
    return load_script("benchmarks", "gpu_scan")


def test_dry_run_times_every_row_and_passes_its_checks(tmp_path, capsys):
    bench = _load()
    out = tmp_path / "dry.json"
    assert bench.main(["--dry-run", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["meta"]["dry_run"] is True and res["meta"]["gpu"] == "CPU (dry run)"
    # every check ran, fla's stand-in included, and passed
    assert len(res["checks"]) == 7 and all(c["ok"] is True for c in res["checks"]), res["checks"]
    s = res["meta"]
    n_ops = {"scan": 5, "layer": 4}
    assert len(res["rows"]) == sum(n_ops.values()) * len(s["Cs"]) * len(s["Ts"])
    # the layers (fused cells vs cuDNN) are timed first, so a short budget still gets them
    assert [r["table"] for r in res["rows"]] == sorted((r["table"] for r in res["rows"]), key=lambda t: t != "layer")
    for r in res["rows"]:
        assert r["ms"] is not None and r["ms"] > 0 and r["reps"] >= 2 and not r["note"], r
    printed = capsys.readouterr().out
    assert res["markdown"] in printed
    assert "| cuDNN nn.GRU / minrnn.MinGRU (chunked) |" in res["markdown"]


def test_without_a_gpu_it_refuses_clearly_unless_dry_run(capsys):
    import pytest
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(SystemExit):
        _load().main([])
    assert "--dry-run" in capsys.readouterr().err
