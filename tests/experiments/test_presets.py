"""Presets: every shipped preset loads, names only known models, tasks and corpora, and every
model it compares can be built to its budget."""

import warnings

import pytest
import torch

from minrnn.data.corpora import CORPORA
from minrnn.data.tasks import TASKS
from minrnn.experiments.baselines import BASELINES, build_model
from minrnn.experiments.presets import (
    EXPERIMENTS,
    PresetError,
    list_presets,
    load_preset,
    load_preset_file,
)

ALL = [(e, p) for e, names in list_presets().items() for p in names]


def vocab_of(preset):
    if preset.tasks:
        return max(TASKS[t].vocab_size for t in preset.tasks)
    return preset.data.get("bpe_vocab_size", 65)  # char-level tiny shakespeare: 65


def test_every_experiment_has_its_presets():
    presets = list_presets()
    assert set(presets) == set(EXPERIMENTS)
    for experiment in ("chomsky", "shakespeare_char"):
        assert set(presets[experiment]) == {"paper", "cpu"}
    assert set(presets["selective_copying"]) == {"paper", "cpu", "cpu_conv", "cpu_decay_init"}  # the last two: ablations
    assert set(presets["wikitext2"]) == {"full", "cpu", "cpu_tuned", "context256"}  # the paper has no WikiText experiment
    assert set(presets["text"]) == {"cpu"}  # a user's corpus: --data gives it


def test_wikitext2_context256_is_the_cpu_preset_at_twice_the_context():
    """The same data, budget and tokens per step as cpu, windows of 256, Llama's RoPE range to 4096."""
    cpu, long = load_preset("wikitext2", "cpu"), load_preset("wikitext2", "context256")
    assert long.data == cpu.data and long.target_params == cpu.target_params
    assert long.train["seq_len"] == 256 and long.train["steps"] == cpu.train["steps"]
    assert long.train["seq_len"] * long.train["batch_size"] == cpu.train["seq_len"] * cpu.train["batch_size"]
    assert long.common["max_length"] > 4096 and "gpt2" not in long.available_models


@pytest.mark.parametrize("experiment,name", ALL)
def test_preset_names_known_things_and_every_model_fits_its_budget(experiment, name):
    preset = load_preset(experiment, name)
    assert preset.description and preset.source
    assert set(preset.available_models) <= set(BASELINES)
    assert all(t in TASKS for t in preset.tasks)
    if "corpus" in preset.data:
        assert preset.data["corpus"] in CORPORA and not preset.tasks
    vocab = vocab_of(preset)
    for model in preset.available_models:  # the extra models are built to the same budget
        target, overrides = preset.model_settings(model, vocab)
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # mamba: no dropout
            built = build_model(model, vocab, target, **overrides)
        if target is not None:
            assert abs(built.baseline.params / target - 1) <= 0.10, (model, built.baseline)


def test_paper_presets_hold_the_papers_numbers():
    sc = load_preset("selective_copying", "paper")
    assert sc.data == {"task": "selective_copying", "length": 4096, "num_tokens": 16}
    assert sc.reference["hidden_size"] == 64 and sc.reference["expansion_factor"] == 6
    assert sc.reference["num_hidden_layers"] == 3
    assert sc.common["dropout"] == 0.1
    assert (sc.train["batch_size"], sc.train["grad_accum"], sc.train["lr"], sc.train["steps"]) == (64, 2, 3e-4, 400_000)
    ch = load_preset("chomsky", "paper")
    assert ch.data["train_lengths"] == [1, 40] and ch.eval_lengths() == list(range(40, 257))
    assert (ch.reference["hidden_size"], ch.reference["num_hidden_layers"], ch.train["batch_size"]) == (256, 2, 128)
    assert load_preset("chomsky", "cpu").eval_lengths()[-1] == 256
    sh = load_preset("shakespeare_char", "paper")
    assert (sh.train["seq_len"], sh.train["batch_size"], sh.train["steps"], sh.common["dropout"]) == (256, 64, 5000, 0.2)


def test_wikitext2_cpu_tuned_is_the_cpu_preset_but_for_the_tuned_settings():
    cpu, tuned = load_preset("wikitext2", "cpu"), load_preset("wikitext2", "cpu_tuned")
    assert (tuned.data, tuned.common, tuned.train, tuned.target_params) == (cpu.data, cpu.common, cpu.train,
                                                                           cpu.target_params)
    assert tuned.models == ("mingru", "llama") and tuned.extra_models == ("mingru-hybrid",)
    # the hybrid: minGRU's shape and optimiser settings, its second block attention
    shape = {"num_hidden_layers": 2, "expansion_factor": 4}
    assert tuned.per_model == {"mingru": shape, "mingru-hybrid": shape}
    assert tuned.train_settings("mingru-hybrid") == tuned.train_settings("mingru")
    assert {m: tuned.train_settings(m)["weight_decay"] for m in tuned.models} == {"mingru": 1.25, "llama": 0.75}
    for model in tuned.available_models:  # the floor at 1% of the peak
        settings = tuned.train_settings(model)
        assert settings["min_lr"] == pytest.approx(settings["lr"] / 100)


def test_budget_follows_the_reference_and_the_sweep():
    sc = load_preset("selective_copying", "cpu")
    assert sc.model_settings("mingru", 16) == (None, {**sc.common, **{k: v for k, v in sc.reference.items() if k != "name"}})
    full, _ = sc.model_settings("gru", 16)
    one, overrides = sc.model_settings("gru", 16, num_hidden_layers=1)
    assert one < full and overrides["num_hidden_layers"] == 1
    assert sc.model_settings("gru", 16, num_layers=1) == (one, overrides)  # the earlier name, read as the new
    with pytest.raises(KeyError, match="baseline\\), not 'rwkv'"):
        sc.model_settings("rwkv", 16)


def test_reference_with_options_is_held_to_the_reference_budget():
    # --set on the reference model (selective copying's minGRU) must not grow it past the budget
    # every other model is built to; options that keep its size keep its width.
    sc = load_preset("selective_copying", "cpu")
    with torch.device("meta"):
        target, overrides = sc.model_settings("mingru", 16)
        plain = build_model("mingru", 16, target, **overrides).baseline
        target, overrides = sc.model_settings("mingru", 16, {"state_expansion": 4})
        expanded = build_model("mingru", 16, target, **overrides).baseline
        as_given = build_model("mingru", 16, None, **{**overrides, "hidden_size": plain.width}).baseline
        signed_target, signed_overrides = sc.model_settings("mingru", 16, {"cell": "mingru_signed"})
        signed = build_model("mingru", 16, signed_target, **signed_overrides).baseline
        wide = sc.model_settings("mingru", 16, {"state_expansion": 4, "width": 96})
    assert target == plain.params and "hidden_size" not in overrides and overrides["state_expansion"] == 4
    assert as_given.params > 1.2 * plain.params  # what the reference's own width would have cost
    assert abs(expanded.params - plain.params) < 0.05 * plain.params and expanded.width != plain.width
    assert (signed.params, signed.width) == (plain.params, plain.width)
    assert wide == (None, {**sc.common, **{k: v for k, v in sc.reference.items() if k != "name"},
                           "state_expansion": 4, "hidden_size": 96})


GOOD = """
[p]
description = "d"
source = "s"
models = ["gru"]
target_params = 1000
[p.data]
task = "parity_check"
[p.train]
steps = 10
"""


def test_schema_errors_name_the_file_and_key(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text(GOOD)
    assert load_preset_file(path, "p").target_params == 1000
    for bad, message in [
        (GOOD.replace('["gru"]', '["gru", "rwkv"]'), r"mine.toml \[p\]: models .*rwkv"),
        (GOOD.replace('"parity_check"', '"parity"'), r"\[p\].data: unknown task 'parity'"),
        (GOOD.replace("steps = 10", "stepz = 10"), r"\[p\].train: unknown key 'stepz'"),
        (GOOD.replace("steps = 10", "steps = 1.5"), "steps must be int"),
        (GOOD.replace("target_params = 1000", ""), "exactly one of reference"),
    ]:
        path.write_text(bad)
        with pytest.raises(PresetError, match=message):
            load_preset_file(path, "p")
    with pytest.raises(KeyError, match="no preset 'q'"):
        load_preset_file(tmp_path / "mine.toml", "q")
    with pytest.raises(KeyError, match="unknown experiment"):
        load_preset("imagenet", "cpu")


def test_per_model_train_settings_are_optimiser_only(tmp_path):
    base = """[p]
description = "d"
source = "s"
models = ["mingru", "llama"]
target_params = 100000
[p.data]
corpus = "tinyshakespeare"
tokenizer = "char"
[p.train]
steps = 10
lr = 1e-3
"""
    good = tmp_path / "good.toml"
    good.write_text(base + "[p.per_model_train.mingru]\nlr = 3e-3\n")
    preset = load_preset_file(good, "p")
    assert preset.train_settings("mingru")["lr"] == 3e-3 and preset.train_settings("llama")["lr"] == 1e-3
    assert preset.train_settings("mingru")["steps"] == 10
    bad = tmp_path / "bad.toml"
    bad.write_text(base + "[p.per_model_train.mingru]\nsteps = 20\n")
    with pytest.raises(PresetError, match="unknown key 'steps'"):
        load_preset_file(bad, "p")
    other = tmp_path / "other.toml"
    other.write_text(base + "[p.per_model_train.gru]\nlr = 3e-3\n")
    with pytest.raises(PresetError, match="not among the preset's models"):
        load_preset_file(other, "p")


def test_extra_models_run_only_when_named(tmp_path):
    from minrnn.experiments.plan import CompareConfig, CompareError, plan_runs

    compared = {r.model for r in plan_runs(CompareConfig("chomsky", "cpu", tasks=["parity_check"]))}
    assert compared == {"mingru", "minlstm", "llama", "gpt2", "lstm", "gru"}
    runs = plan_runs(CompareConfig("chomsky", "cpu", models=["mingru-signed"], tasks=["parity_check"],
                                   options={"mingru-signed": {"decay_bias": 2.0}}))
    assert [(r.model, r.options) for r in runs] == [("mingru-signed", {"decay_bias": 2.0})]
    # the extra model is the reference's block with the signed cell, at the same budget
    preset = load_preset("chomsky", "cpu")
    target, overrides = preset.model_settings("mingru-signed", 8)
    built = build_model("mingru-signed", 8, target, **overrides)
    assert built.model.config.cell == "mingru_signed" and not built.model.config.use_conv
    target, overrides = preset.model_settings("mingru", 8)
    assert built.baseline.params == build_model("mingru", 8, target, **overrides).baseline.params
    with pytest.raises(CompareError, match="mingru-signed has no option 'no_such_key'"):
        plan_runs(CompareConfig("chomsky", "cpu", models=["mingru-signed"],
                                options={"mingru-signed": {"no_such_key": 1}}))
    with pytest.raises(CompareError, match=r"--models: \['mamda'\] not in the chomsky/cpu preset's .* nor a "
                                           "registered baseline"):
        plan_runs(CompareConfig("chomsky", "cpu", models=["mamda"]))
    # a registered family the preset leaves out: run when named, to the budget with the common settings
    (run,) = plan_runs(CompareConfig("chomsky", "cpu", models=["mamba"], tasks=["parity_check"]))
    target, overrides = preset.model_settings("mamba", 8)
    assert run.model == "mamba" and overrides == preset.common and target == preset.model_settings("llama", 8)[0]
    path = tmp_path / "mine.toml"
    path.write_text(GOOD.replace('models = ["gru"]', 'models = ["gru"]\nextra_models = ["gru"]'))
    with pytest.raises(PresetError, match="extra_models must name baselines not in models"):
        load_preset_file(path, "p")


def test_earlier_names_are_read_as_the_current_ones(tmp_path):
    """width / num_layers / tie_embeddings and a text preset's eval_batches (x batch_size windows) still load,
    as the preset written with MinRNNConfig's and TrainConfig's names."""
    text = """[p]
description = "d"
source = "s"
models = ["gru", "mingru"]
[p.data]
corpus = "tinyshakespeare"
tokenizer = "char"
[p.reference]
name = "gru"
{ref}
[p.per_model.mingru]
{mingru}
[p.sweep]
{sweep}
[p.train]
batch_size = 3
{evaluation}
"""
    old, new = tmp_path / "old" / "mine.toml", tmp_path / "new" / "mine.toml"
    for path, names in ((old, ("width", "num_layers", "tie_embeddings", "eval_batches = 4")),
                        (new, ("hidden_size", "num_hidden_layers", "tie_word_embeddings", "eval_windows = 12"))):
        path.parent.mkdir()
        width, layers, tie, evaluation = names
        path.write_text(text.format(ref=f"{width} = 32\n{layers} = 1", mingru=f"{tie} = false",
                                    sweep=f"{layers} = [1, 2]", evaluation=evaluation))
    assert load_preset_file(old, "p") == load_preset_file(new, "p")
    assert load_preset_file(new, "p").train["eval_windows"] == 12
    path = tmp_path / "both.toml"
    path.write_text(text.format(ref="width = 32\nhidden_size = 32", mingru="", sweep="", evaluation=""))
    with pytest.raises(PresetError, match=r"both.toml \[p\].reference: 'width' and 'hidden_size' are one option"):
        load_preset_file(path, "p")
