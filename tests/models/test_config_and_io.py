"""The config rejects bad values by name, in one line; weights round-trip through safetensors,
and weights that do not fit the config are refused; the Auto classes resolve to minrnn's;
importing minrnn does not import transformers."""

import json
import logging
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")

from safetensors import safe_open  # noqa: E402
from transformers import (  # noqa: E402
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
)

import minrnn  # noqa: E402
from minrnn.models import (  # noqa: E402
    MinRNNConfig,
    MinRNNForCausalLM,
    MinRNNForSequenceClassification,
    MinRNNModel,
)

from .conftest import random_ids, tiny_config, tiny_lm  # noqa: E402

BAD_VALUES = [
    ("hidden_size", -1), ("hidden_size", 0), ("hidden_size", "16"), ("hidden_size", True),
    ("vocab_size", -5), ("num_hidden_layers", 0), ("expansion_factor", -2.0), ("expansion_factor", 0),
    ("mlp_mult", 0), ("cell", "gru"), ("cell", "minGRU"), ("conv_kernel", 0), ("conv_kernel", -3),
    ("dropout", 1.0), ("dropout", -0.1), ("rms_norm_eps", 0.0), ("decay_bias", float("nan")),
    ("decay_bias", float("inf")), ("decay_bias", "3"), ("cell_options", ["normalize"]),
    ("initializer_range", -0.02), ("hidden_act", "nope"), ("scan_backend", "magic"),
]


def assert_one_line_naming(err, field):
    message = str(err.value)
    assert "\n" not in message and message.startswith("MinRNNConfig: ") and field in message, message
    assert "Validation error" not in message  # not the strict dataclass's wrapper text


@pytest.mark.parametrize("field,value", BAD_VALUES, ids=[f"{f}={v!r}" for f, v in BAD_VALUES])
def test_bad_config_values_fail_at_config_time_naming_the_field(field, value):
    with pytest.raises(ValueError) as info:
        MinRNNConfig(**{field: value})
    assert_one_line_naming(info, field)
    assert "expected" in str(info.value) or "must be" in str(info.value)  # and says what it wants
    cfg = MinRNNConfig()
    with pytest.raises(ValueError) as info:
        setattr(cfg, field, value)  # assigning later is checked as well
    assert_one_line_naming(info, field)
    assert getattr(cfg, field) == getattr(MinRNNConfig(), field)  # and the bad value was not kept


OLD_BAD_VALUES = [("forget_bias", float("nan")), ("mingru_forget_bias", float("inf")), ("minlstm_normalize", 1)]


@pytest.mark.parametrize("field,value", OLD_BAD_VALUES, ids=[f"{f}={v!r}" for f, v in OLD_BAD_VALUES])
@pytest.mark.parametrize("cell", ["mingru", "minlstm"])
def test_bad_values_of_old_keys_fail_naming_the_key(field, value, cell):
    """An old key is checked whether or not it applies to the cell (and then mapped or dropped);
    assigning one later is refused by name, since the model would never read it."""
    with pytest.raises(ValueError) as info:
        MinRNNConfig(cell=cell, **{field: value})
    assert_one_line_naming(info, field)
    assert "must be" in str(info.value)
    cfg = MinRNNConfig(cell=cell)
    with pytest.raises(ValueError) as info:
        setattr(cfg, field, value)
    assert_one_line_naming(info, field)
    assert field not in vars(cfg)


def test_derived_width_of_zero_fails():
    with pytest.raises(ValueError) as info:
        MinRNNConfig(hidden_size=2, expansion_factor=0.1)
    assert_one_line_naming(info, "expansion_factor")
    cfg = MinRNNConfig(hidden_size=2)
    cfg.expansion_factor = 0.1  # fields are checked one at a time; the pair when validated
    with pytest.raises(ValueError) as info:
        cfg.validate()
    assert_one_line_naming(info, "expansion_factor")


def test_bad_value_in_a_saved_config_fails_on_load(tmp_path):
    tiny_config().save_pretrained(tmp_path)
    data = json.loads((tmp_path / "config.json").read_text())
    data["conv_kernel"] = 0
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.raises(ValueError) as info:
        AutoConfig.from_pretrained(tmp_path)
    assert_one_line_naming(info, "conv_kernel")


def test_good_values_are_accepted():
    cfg = MinRNNConfig(cell="minlstm", conv_kernel=1, dropout=0, expansion_factor=1, mlp_mult=1.5, decay_bias=-1,
                       cell_options={"normalize": False})
    assert cfg.rnn_hidden_size == cfg.hidden_size and cfg.mlp_hidden_size == round(1.5 * cfg.hidden_size)


def _fields(config):
    """The config's values, less the bookkeeping that saving and loading fill in."""
    return {k: v for k, v in config.to_dict().items() if k not in ("_name_or_path", "dtype", "architectures")}


@pytest.mark.parametrize("overrides", [dict(), dict(cell="minlstm", tie_word_embeddings=False, use_bias=True)],
                         ids=["tied", "minlstm-untied"])
def test_save_and_load_give_identical_logits(tmp_path, overrides):
    model = tiny_lm(**overrides)
    ids = random_ids(2, 9)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file() and (tmp_path / "config.json").is_file()
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert ("lm_head.weight" in keys) == (not model.config.tie_word_embeddings)
    with torch.no_grad():
        want = model(ids).logits
        for cls in (MinRNNForCausalLM, AutoModelForCausalLM):
            loaded = cls.from_pretrained(tmp_path).eval()
            assert type(loaded) is MinRNNForCausalLM
            assert _fields(loaded.config) == _fields(model.config)
            assert torch.equal(loaded(ids).logits, want)
        # the base model loads out of the LM checkpoint
        base = AutoModel.from_pretrained(tmp_path).eval()
        assert type(base) is MinRNNModel
        assert torch.equal(base(ids).last_hidden_state, model.model(ids).last_hidden_state)


def _edited_copy(src, dst, **changes):
    """dst: src's weights with its config.json changed."""
    dst.mkdir()
    (dst / "model.safetensors").write_bytes((src / "model.safetensors").read_bytes())
    data = json.loads((src / "config.json").read_text())
    data.update(changes)
    (dst / "config.json").write_text(json.dumps(data))
    return dst


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("layers,message", [
    (3, r"missing from the weights: (model\.)?layers\.2\..*the weights hold 2 layers but the config has num_hidden_layers=3"),
    (1, r"not used by the model: (model\.)?layers\.1\..*the weights hold 2 layers but the config has num_hidden_layers=1"),
], ids=["more-layers", "fewer-layers"])
def test_config_with_another_layer_count_is_refused(tmp_path, tied, layers, message):
    tiny_lm(tie_word_embeddings=tied).save_pretrained(tmp_path / "run")
    edited = _edited_copy(tmp_path / "run", tmp_path / "edited", num_hidden_layers=layers)
    for load in (MinRNNForCausalLM.from_pretrained, AutoModelForCausalLM.from_pretrained,
                 AutoModel.from_pretrained, MinRNNForSequenceClassification.from_pretrained):
        with pytest.raises(ValueError, match=message) as info:
            load(edited)
        assert "\n" not in str(info.value)


@pytest.mark.parametrize("saved_tied", [True, False], ids=["saved-tied", "saved-untied"])
def test_config_with_tie_word_embeddings_flipped_is_refused(tmp_path, saved_tied):
    tiny_lm(tie_word_embeddings=saved_tied).save_pretrained(tmp_path / "run")
    edited = _edited_copy(tmp_path / "run", tmp_path / "edited", tie_word_embeddings=not saved_tied)
    message = "no lm_head.weight" if saved_tied else "separate lm_head.weight"
    for load in (MinRNNForCausalLM.from_pretrained, AutoModelForCausalLM.from_pretrained):
        with pytest.raises(ValueError, match=f"{message}.*tie_word_embeddings") as info:
            load(edited)
        assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="no lm_head.weight" if saved_tied else "separate lm_head.weight"):
        MinRNNForCausalLM.from_pretrained(tmp_path / "run", tie_word_embeddings=not saved_tied)
    # the unedited folder loads, and output_loading_info still works
    model, info = MinRNNForCausalLM.from_pretrained(tmp_path / "run", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == saved_tied


def test_a_new_task_head_on_language_model_weights_is_created(tmp_path):
    """Fine-tuning a classifier from a language model: its head is new, the body loads."""
    lm = tiny_lm(tie_word_embeddings=False)
    lm.save_pretrained(tmp_path)
    clf, info = MinRNNForSequenceClassification.from_pretrained(tmp_path, num_labels=3, output_loading_info=True)
    assert info["missing_keys"] == {"score.weight"} and info["unexpected_keys"] == {"lm_head.weight"}
    assert all(torch.equal(a, b) for a, b in zip(clf.model.state_dict().values(), lm.model.state_dict().values()))


class _Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_a_refused_load_is_one_line_without_transformers_weight_table(tmp_path):
    """transformers logs its table of missing/unexpected weights; it is passed on only for a load
    that is accepted (a new task head), not before the one-line refusal."""
    lm = tiny_lm(tie_word_embeddings=False)
    lm.save_pretrained(tmp_path / "run")
    edited = _edited_copy(tmp_path / "run", tmp_path / "edited", num_hidden_layers=3)
    logger, records = logging.getLogger("transformers.modeling_utils"), _Records()
    logger.addHandler(records)
    try:
        with pytest.raises(ValueError, match="do not fit the config"):
            MinRNNForCausalLM.from_pretrained(edited)
        assert records.messages == []
        MinRNNForSequenceClassification.from_pretrained(tmp_path / "run", num_labels=3)
        assert any("score.weight" in m for m in records.messages), records.messages
    finally:
        logger.removeHandler(records)
    assert not logger.filters, "the filter that holds the report back is removed after the load"


def test_sequence_classifier_round_trip(tmp_path):
    torch.manual_seed(0)
    clf = MinRNNForSequenceClassification(tiny_config(num_labels=3)).eval()
    clf.save_pretrained(tmp_path)
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    assert type(loaded) is MinRNNForSequenceClassification
    ids = random_ids(2, 6)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, clf(ids).logits)


def test_auto_classes_resolve_to_minrnn():
    cfg = tiny_config()
    assert type(AutoConfig.for_model("minrnn")) is MinRNNConfig
    assert type(AutoModelForCausalLM.from_config(cfg)) is MinRNNForCausalLM
    assert type(AutoModel.from_config(cfg)) is MinRNNModel
    assert type(AutoModelForSequenceClassification.from_config(cfg)) is MinRNNForSequenceClassification
    # and through minrnn's top level, resolved lazily
    assert minrnn.MinRNNForCausalLM is MinRNNForCausalLM and minrnn.MinRNNConfig is MinRNNConfig
    with pytest.raises(AttributeError):
        _ = minrnn.NoSuchThing


def test_import_minrnn_does_not_import_transformers():
    # (that minrnn.MinRNNConfig then imports it is checked in-process, above)
    code = ("import sys, minrnn, minrnn.functional, minrnn.layers; "
            "heavy = [m for m in ('transformers', 'safetensors', 'huggingface_hub') if m in sys.modules]; "
            "assert not heavy, heavy")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def test_a_signed_cell_with_the_log_backend_is_refused_when_the_config_is_built():
    with pytest.raises(ValueError, match="cell 'mingru_signed' has transitions in \\(-1, 1\\).*backend 'log'") as e:
        MinRNNConfig(cell="mingru_signed", scan_backend="log")
    assert "\n" not in str(e.value)
    assert MinRNNConfig(cell="mingru", scan_backend="log").scan_backend == "log"
    assert MinRNNConfig(cell="minlstm_signed", scan_backend="chunked").cell == "minlstm_signed"
