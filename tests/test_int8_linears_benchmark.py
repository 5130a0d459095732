"""benchmarks/int8_linears.py on a tiny model: a row per way (torchao's only when it is
installed), every way computing what float32 computes to int8's rounding, the weights' floors."""

import json

import pytest
import torch

pytest.importorskip("transformers")

from .scripts import load_script  # noqa: E402


def test_every_way_times_the_decode_models_matrices(tmp_path, capsys):
    bench = load_script("benchmarks", "int8_linears")
    out = tmp_path / "int8.json"
    result = bench.main(["--width", "16", "--layers", "1", "--vocab", "32", "--repeats", "1", "--passes", "1",
                         "--out", str(out)])
    shapes = bench.decode_shapes(16, 1, 32)
    assert result["matrices"] == len(shapes) and result["weights"] == sum(i * o for i, o in shapes)
    assert {"float32", "torch dynamic int8", "int8pack weight-only"} <= set(result["ms"])
    assert all(ms > 0 for ms in result["ms"].values())
    assert result["floor_ms"]["float32"] == pytest.approx(4 * result["floor_ms"]["int8"])
    assert json.loads(out.read_text())["ms"] == result["ms"]
    assert "| torch dynamic int8 |" in capsys.readouterr().out


def test_each_int8_way_computes_the_float32_products():
    bench = load_script("benchmarks", "int8_linears")
    torch.manual_seed(0)
    stack = torch.nn.ModuleList([torch.nn.Linear(32, 48, bias=False), torch.nn.Linear(48, 32, bias=False)]).eval()
    x = torch.randn(1, 32)
    with torch.inference_mode():
        for name, model in bench.variants(stack).items():
            want, got = stack[0](x), model[0](x)
            assert (got - want).abs().max() <= 0.05 * want.abs().max(), name
