"""benchmarks/lm_training_step.py builds compare's models, times them and writes its table
(timings are never asserted; the GEMM replay and the parameter counts are)."""

import json

import pytest
import torch
from torch import nn

pytest.importorskip("transformers")

from .corpus import requires_corpus  # noqa: E402
from .scripts import load_script  # noqa: E402

# the benchmark reads the preset's corpus itself (checked against its checksum)
NEEDS_SHAKESPEARE = requires_corpus("tinyshakespeare", "input")


def _load():
    return load_script("benchmarks", "lm_training_step")


@NEEDS_SHAKESPEARE
def test_a_short_run_writes_a_row_per_model(tmp_path, capsys):
    bench = _load()
    out = tmp_path / "step.json"
    assert bench.main(["--models", "mingru,lstm", "--repeats", "1", "--steps", "1", "--threads", "1",
                       "--optimizer", "both", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    rows = {r["model"]: r for r in res["rows"]}
    assert set(rows) == {"mingru", "lstm", "mingru + AdamW loop", "lstm + AdamW loop"}
    assert rows["mingru"]["params"] == rows["mingru + AdamW loop"]["params"]
    assert res["meta"]["batch"] == 12 and res["meta"]["seq_len"] == 64  # the cpu preset's shape
    assert res["meta"]["optimizer"] == "both"
    # the same parameter budget as compare builds (within its 10%)
    assert abs(rows["mingru"]["params"] / rows["lstm"]["params"] - 1) < 0.1
    assert rows["mingru"]["gemm_ms"] > 0 and rows["lstm"]["gemm_ms"] is None  # nn.LSTM's products are its own
    assert res["markdown"] in capsys.readouterr().out


@NEEDS_SHAKESPEARE
def test_norm_both_adds_a_row_with_the_torch_norm_for_the_minrnn_models_only(tmp_path):
    bench = _load()
    out = tmp_path / "step.json"
    assert bench.main(["--models", "mingru,lstm", "--repeats", "1", "--steps", "1", "--threads", "1",
                       "--norm", "both", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert [r["model"] for r in res["rows"]] == ["mingru", "mingru + torch RMSNorm", "lstm"]
    assert res["meta"]["norm"] == "both"


def test_the_torch_norm_copy_computes_the_same_loss_through_the_reference():
    from minrnn.models import MinRNNConfig, MinRNNForCausalLM

    bench = _load()
    model = MinRNNForCausalLM(MinRNNConfig(vocab_size=11, hidden_size=8, num_hidden_layers=2)).train()
    ref = bench._with_norm_backend(model, "torch")
    ids = torch.randint(0, 11, (2, 5))
    y, y_ref = model(ids).logits, ref(ids).logits
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    assert type(model.model.norm(y[..., :8]).grad_fn).__name__ == "_RMSNormBackward"
    assert type(ref.model.norm(y[..., :8]).grad_fn).__name__ != "_RMSNormBackward"


def test_matmul_params_count_a_tied_head_once_and_no_lookup_table():
    bench = _load()
    emb, head = nn.Embedding(10, 4), nn.Linear(4, 10, bias=False)
    head.weight = emb.weight
    model = nn.Sequential(emb, nn.Linear(4, 6), head)
    assert bench._matmul_params(model) == 4 * 6 + 10 * 4
    untied = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 6))
    assert bench._matmul_params(untied) == 4 * 6


def test_the_gemm_replay_covers_every_linear_call_of_a_step():
    bench = _load()
    model = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2))
    x = torch.randn(7, 3)
    calls = bench._linear_calls(model, lambda: model(x).sum().backward())
    assert [(tuple(shape), mod.weight.shape) for shape, mod in calls] == [((7, 3), (5, 3)), ((7, 5), (2, 5))]
    bench._gemm_replay(calls)()  # runs on tensors of those shapes


@NEEDS_SHAKESPEARE
def test_a_variant_is_the_model_built_with_that_option_in_a_row_of_its_own(tmp_path):
    bench = _load()
    out = tmp_path / "step.json"
    assert bench.main(["--models", "mingru", "--variant", "mingru.width=120", "--repeats", "1", "--steps", "1",
                       "--threads", "1", "--out", str(out)]) == 0
    rows = {r["model"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"mingru", "mingru (width=120)"}
    # the preset's budget gives another width; 120 wide is another parameter count
    assert rows["mingru (width=120)"]["params"] != rows["mingru"]["params"]


@NEEDS_SHAKESPEARE
@pytest.mark.parametrize("bad", ["mingru", "mingru.width", "mingru.no_such_option=1", "mingru.width=64"])
def test_a_bad_variant_is_a_usage_error(bad, tmp_path):
    with pytest.raises(SystemExit) as e:
        _load().main(["--models", "mingru", "--variant", bad, "--repeats", "1", "--steps", "1",
                      "--out", str(tmp_path / "x.json")])
    assert e.value.code == 2


@NEEDS_SHAKESPEARE
def test_compile_both_adds_a_compiled_row_per_model(tmp_path):
    bench = _load()
    out = tmp_path / "step.json"
    # aot_eager: the compiled path (dynamo, AOTAutograd) without inductor's code generation, for speed
    assert bench.main(["--models", "lstm", "--repeats", "1", "--steps", "1", "--threads", "1", "--compile", "both",
                       "--compile-backend", "aot_eager", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    rows = {r["model"]: r for r in res["rows"]}
    assert set(rows) == {"lstm", "lstm (torch.compile)"}
    assert rows["lstm"]["params"] == rows["lstm (torch.compile)"]["params"]
    assert rows["lstm (torch.compile)"]["gemm_ms"] is None and rows["lstm (torch.compile)"]["step_ms"] > 0
    assert res["meta"]["compile"] == "both" and res["meta"]["compile_backend"] == "aot_eager"
