"""The hybrid baselines (mingru-hybrid, minlstm-hybrid): built to the budget, attention where the
rule puts it, trained a few steps by `minrnn compare`; and `minrnn train` reads the attention
fields from a TOML [model] table and from the command line."""

import json
import warnings

import pytest
import torch

from minrnn.experiments.baselines import build_model, parameter_count
from minrnn.experiments.compare import CompareConfig
from minrnn.experiments.compare import compare as run_compare

HYBRIDS = ("mingru-hybrid", "minlstm-hybrid")


@pytest.mark.parametrize("name", HYBRIDS)
@pytest.mark.parametrize("target,overrides", [
    (809_856, {}),  # the shakespeare cpu preset's budget
    (240_000, dict(num_layers=3, expansion_factor=6, use_conv=False, use_mlp=False)),  # selective copying's block
    (3_000_000, dict(num_layers=6)),
])
def test_hybrids_meet_the_budget_as_closely_as_the_pure_models(name, target, overrides):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = build_model(name, 65, target, **overrides)
    params = parameter_count(model)
    assert abs(params / target - 1) <= 0.02, f"{name}: {params} for {target}"
    config = model.model.config
    layers = overrides.get("num_layers", 4)
    assert config.attention_layer_indices == tuple(range(2, layers, 3))
    assert config.num_attention_heads == 4 and config.head_dim % 2 == 0
    assert abs(config.num_attention_heads * config.head_dim - config.hidden_size) <= 4
    assert config.attention_window == 128 and config.cell == name.split("-")[0]
    attention = [b for b in model.model.model.layers if type(b.mixer).__name__ == "MinRNNAttention"]
    assert len(attention) == len(config.attention_layer_indices)


def test_hybrid_placement_for_shallow_models_and_overrides():
    assert build_model("mingru-hybrid", 65, None, width=32, num_layers=1).model.config.attention_layer_indices == (0,)
    assert build_model("mingru-hybrid", 65, None, width=32, num_layers=2).model.config.attention_layer_indices == (1,)
    m = build_model("minlstm-hybrid", 65, None, width=48, num_layers=4, attention_every=2, attention_window=16,
                    num_attention_heads=2, num_key_value_heads=1)
    c = m.model.config
    assert (c.attention_layer_indices, c.attention_window, c.num_attention_heads, c.kv_heads, c.head_dim) == (
        (1, 3), 16, 2, 1, 24)
    m = build_model("mingru-hybrid", 65, None, width=40, num_layers=3, attention_layers=[0])
    assert m.model.config.attention_layer_indices == (0,)


@pytest.mark.parametrize("name", HYBRIDS)
def test_hybrid_trains_a_few_steps_in_compare(tmp_path, name):
    md = run_compare(CompareConfig("selective_copying", "cpu", models=["mingru", name], out=str(tmp_path), steps=4,
                                   eval_every=2, sweep=False, isolate=False, progress=False), log=lambda s: None)
    pure, hybrid = json.loads((md.parent / "results.json").read_text())
    assert hybrid["params"] == pytest.approx(pure["params"], rel=0.03)
    history = [h for h in hybrid["history"] if "val_loss" in h]
    assert len(history) == 2 and all(torch.isfinite(torch.tensor(h["val_loss"])) for h in history)
    assert 0.0 <= hybrid["final_split"]["accuracy"] <= 1.0
    assert name in md.read_text()


def test_minrnn_train_reads_attention_fields_from_toml_and_command_line(tmp_path):
    from minrnn.training.config import ConfigError, TrainConfig, check_model_config

    from ..corpus import shakespeare
    from ..training.conftest import TINY, minrnn

    config = tmp_path / "hybrid.toml"
    config.write_text(TINY.read_text().replace(
        "[model]\n", "[model]\nattention_layers = [1]\nattention_window = 8\nnum_key_value_heads = 2\n"))
    cfg = TrainConfig.from_file(config)
    assert cfg.model["attention_layers"] == [1] and cfg.model["attention_window"] == 8
    assert TrainConfig.from_file(config, {"model.attention_layers": "[0, 1]"}).model["attention_layers"] == [0, 1]
    (tmp_path / "round.toml").write_text(cfg.to_toml())
    assert TrainConfig.from_file(tmp_path / "round.toml") == cfg
    with pytest.raises(ConfigError, match=r"attention_layers must be indices in \[0, 2\)"):
        check_model_config(TrainConfig.from_file(config, {"model.attention_layers": "[5]"}).model)
    out = tmp_path / "run"
    data = tmp_path / "text.txt"
    data.write_text(shakespeare(20_000))
    r = minrnn("train", config, "--data", data, "--out_dir", out, "--steps", 4, "--eval_every", 2,
               "--checkpoint_every", 2)
    assert r.returncode == 0, r.stderr
    from minrnn.models import MinRNNForCausalLM

    saved = json.loads(next(out.rglob("config.json")).read_text())
    assert saved["attention_layers"] == [1] and saved["attention_window"] == 8
    model = MinRNNForCausalLM.from_pretrained(next(out.rglob("config.json")).parent)
    assert type(model.model.layers[1].mixer).__name__ == "MinRNNAttention"
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()
