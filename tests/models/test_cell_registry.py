"""The config's cells come from the registry (``minrnn.ops.cells.CELLS``): a cell registered
from this file, with no edit to the package, runs through MinRNNConfig, MinRNNForCausalLM's
forward, generate() and its one-token step. The cell's init bias (``decay_bias``) and options
(``cell_options``) have one name each, defaults from the cell's spec, and round-trip through
config.json; the old keys (forget_bias, mingru_forget_bias, minlstm_normalize) still build and
load, mapped to them."""

import json

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")

from minrnn.models import MinRNNCache, MinRNNConfig, MinRNNForCausalLM  # noqa: E402
from minrnn.models.decoding_minrnn import fast_step  # noqa: E402
from minrnn.ops.cells import CELLS, CellSpec, g, log_g, register_cell  # noqa: E402

from .conftest import random_ids, tiny_config, tiny_lm  # noqa: E402


def toy_gates(hidden, gate, power):
    """a = sigmoid(gate)^power, b = (1 - a) g(hidden)."""
    a = torch.sigmoid(gate) ** power
    return a, (1 - a) * g(hidden)


def toy_log_gates(hidden, gate, power):
    log_a = power * F.logsigmoid(gate)
    return log_a, torch.log(-torch.expm1(log_a)) + log_g(hidden)


TOY = CellSpec("toy_decay", ("hidden", "gate"), toy_gates, toy_log_gates, decay_slot=1, decay_bias_sign=1.0,
               option_names=("power",), option_defaults=(2.0,), default_decay_bias=1.5,
               doc="a = sigmoid(gate)^power, b = (1 - a) g(hidden)")


@pytest.fixture
def toy_cell():
    register_cell(TOY)
    yield TOY.name
    del CELLS[TOY.name]


def test_a_cell_unknown_to_the_registry_is_refused_by_name():
    with pytest.raises(ValueError, match="cell must be one of .*'mingru'.* got 'toy_decay'"):
        MinRNNConfig(cell="toy_decay")


def test_a_registered_cell_is_accepted_with_its_defaults(toy_cell):
    cfg = MinRNNConfig(cell=toy_cell)
    assert cfg.cell_spec is TOY
    assert cfg.resolved_decay_bias == 1.5 and cfg.resolved_cell_options == {"power": 2.0}
    cfg = MinRNNConfig(cell=toy_cell, decay_bias=-1.0, cell_options={"power": 3.0})
    assert cfg.resolved_decay_bias == -1.0 and cfg.resolved_cell_options == {"power": 3.0}
    with pytest.raises(ValueError, match="cell_options: cell 'toy_decay' has no option 'normalize'"):
        MinRNNConfig(cell=toy_cell, cell_options={"normalize": False})
    # old keys name the cells they were written for: on another cell they are dropped
    cfg = MinRNNConfig(cell=toy_cell, forget_bias=9.0, mingru_forget_bias=9.0, minlstm_normalize=False)
    assert cfg.decay_bias is None and cfg.cell_options is None


def test_a_registered_cell_runs_forward_generate_and_steps(toy_cell):
    model = tiny_lm(cell=toy_cell, cell_options={"power": 3.0}, decay_bias=0.5)
    E = model.config.rnn_hidden_size
    proj = MinRNNForCausalLM(model.config).model.layers[0].mixer.in_proj  # fresh init: the decay bias
    assert torch.all(proj.bias[E:] == 0.5) and torch.all(proj.bias[:E] == 0)
    mixer = model.model.layers[0].mixer
    assert mixer.spec is TOY and mixer.options == {"power": 3.0}

    ids = random_ids(2, 9)
    with torch.no_grad():
        whole = model(ids).logits
        # the layer's recurrence is the toy cell's: a loop written out here gives the same states
        x = model.model.layers[0].rnn_norm(model.model.layers[0].conv(model.model.embed_tokens(ids))
                                           + model.model.embed_tokens(ids))
        hidden, gate = mixer.in_proj(x).chunk(2, -1)
        a, b = toy_gates(hidden, gate, 3.0)
        h, states = torch.zeros_like(a[:, 0]), []
        for t in range(ids.shape[1]):
            h = a[:, t] * h + b[:, t]
            states.append(h)
        cache = MinRNNCache(model.config)
        model(ids, cache=cache)
        torch.testing.assert_close(cache.layers[0].recurrent_states[0], states[-1])

        for fast in (True, False):  # the step, and the general path, against one forward
            cache = MinRNNCache(model.config)
            with fast_step(fast):
                stepped = torch.cat([model(ids[:, t:t + 1], cache=cache).logits for t in range(ids.shape[1])], 1)
            torch.testing.assert_close(stepped, whole, rtol=0, atol=2e-5)

    out = model.generate(ids, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert out.shape == (2, 14) and torch.equal(out[:, :9], ids)
    with torch.no_grad():  # greedy: each new token is the argmax of the whole sequence's logits
        logits = model(out[:, :-1]).logits
    assert torch.equal(logits[:, 8:].argmax(-1), out[:, 9:])


def test_a_registered_cells_config_round_trips(toy_cell, tmp_path):
    model = tiny_lm(cell=toy_cell, cell_options={"power": 1.5}, decay_bias=-0.25)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["cell"] == toy_cell and saved["decay_bias"] == -0.25 and saved["cell_options"] == {"power": 1.5}
    loaded = MinRNNForCausalLM.from_pretrained(tmp_path).eval()
    ids = random_ids(2, 6)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


@pytest.mark.parametrize("cell,decay,options", [
    ("mingru", 0.0, {}), ("mingru_signed", 0.0, {}),
    ("minlstm", 3.0, {"normalize": True}), ("minlstm_signed", 3.0, {"normalize": True}),
])
def test_the_builtin_cells_defaults(cell, decay, options):
    cfg = MinRNNConfig(cell=cell)
    assert cfg.decay_bias is None and cfg.cell_options is None
    assert cfg.resolved_decay_bias == decay and cfg.resolved_cell_options == options


@pytest.mark.parametrize("cell", ["mingru", "minlstm"])
def test_decay_bias_and_cell_options_round_trip(cell, tmp_path):
    options = {"normalize": False} if cell == "minlstm" else {}
    cfg = tiny_config(cell=cell, decay_bias=1.25, cell_options=options)
    cfg.save_pretrained(tmp_path)
    for loaded in (MinRNNConfig.from_pretrained(tmp_path), MinRNNConfig.from_dict(cfg.to_dict())):
        assert loaded.decay_bias == 1.25 and loaded.cell_options == options
        assert loaded.resolved_cell_options == {**MinRNNConfig(cell=cell).resolved_cell_options, **options}


# (cell, old keys given) -> (decay_bias, cell_options) they map to: the key for the cell wins
OLD = [
    ("mingru", dict(forget_bias=2.0, mingru_forget_bias=1.0, minlstm_normalize=False), 1.0, None),
    ("mingru_signed", dict(forget_bias=2.0, mingru_forget_bias=-1.0), -1.0, None),
    ("minlstm", dict(forget_bias=2.0, mingru_forget_bias=1.0, minlstm_normalize=False), 2.0, {"normalize": False}),
    ("minlstm_signed", dict(mingru_forget_bias=1.0, minlstm_normalize=True), None, {"normalize": True}),
    ("minlstm", dict(mingru_forget_bias=1.0), None, None),
]


@pytest.mark.parametrize("cell,old,decay,options", OLD)
def test_old_keys_map_to_the_new_fields(cell, old, decay, options, tmp_path):
    cfg = MinRNNConfig(cell=cell, **old)
    assert cfg.decay_bias == decay and cfg.cell_options == options
    assert not set(old) & set(cfg.to_dict())  # saved under the new names only
    # a config.json written with the old keys (as earlier versions wrote every one of them)
    data = MinRNNConfig(cell=cell).to_dict()
    del data["decay_bias"], data["cell_options"]
    (tmp_path / "config.json").write_text(json.dumps({**data, **old}))
    loaded = MinRNNConfig.from_pretrained(tmp_path)
    assert loaded.decay_bias == decay and loaded.cell_options == options


def test_an_old_key_and_its_new_name_together_are_refused():
    with pytest.raises(ValueError, match="forget_bias is the old name of decay_bias"):
        MinRNNConfig(cell="minlstm", forget_bias=1.0, decay_bias=2.0)
    with pytest.raises(ValueError, match=r"minlstm_normalize is the old name of cell_options\['normalize'\]"):
        MinRNNConfig(cell="minlstm", minlstm_normalize=False, cell_options={"normalize": True})
    # the other cell's old key is dropped, so it does not clash
    assert MinRNNConfig(cell="mingru", forget_bias=1.0, decay_bias=2.0).decay_bias == 2.0


def test_old_keys_build_the_same_model_as_the_new_ones():
    old = tiny_config(cell="minlstm", forget_bias=1.0, minlstm_normalize=False)
    new = tiny_config(cell="minlstm", decay_bias=1.0, cell_options={"normalize": False})
    assert old.to_dict() == new.to_dict()
    torch.manual_seed(0)
    a = MinRNNForCausalLM(old)
    torch.manual_seed(0)
    b = MinRNNForCausalLM(new)
    assert a.model.layers[0].mixer.options == {"normalize": False}
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
