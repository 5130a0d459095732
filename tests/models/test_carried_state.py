"""A model's state as plain tensors (`MinRNNCache.to_tensors` / `from_tensors`), and the compare
harness's models that carry it between calls: two calls with the state handed over equal one call
over both halves, for every block kind, the expanded state and torch's LSTM / GRU."""

import pytest
import torch

pytest.importorskip("transformers")

from tests.models.conftest import ALL_BLOCKS, VOCAB, tiny_lm  # noqa: E402

CASES = {**ALL_BLOCKS, "expanded": dict(cell="mingru", state_expansion=2, use_conv=True)}


def _halves(model, ids, cut, **first_state):
    from minrnn.experiments.modules import LogitsOnly

    wrapped = LogitsOnly(model)
    a, state = wrapped(ids[:, :cut], return_state=True, **first_state)
    b, last = wrapped(ids[:, cut:], state=state, return_state=True)
    return torch.cat([a, b], 1), state, last


@pytest.mark.parametrize("name", sorted(CASES))
def test_state_handed_over_equals_one_pass(name):
    model = tiny_lm(dtype=torch.float64, **CASES[name])
    ids = torch.randint(1, VOCAB, (3, 11), generator=torch.Generator().manual_seed(0))
    full = model(input_ids=ids, use_cache=False).logits
    split, state, _ = _halves(model, ids, 5)
    torch.testing.assert_close(split, full, rtol=1e-10, atol=1e-10)
    assert all(t.shape[0] == 3 for t in state.values())  # batch first, as checkpoints slice them


def test_tensors_round_trip_and_errors():
    from minrnn.models import MinRNNCache

    model = tiny_lm(**CASES["mingru-conv"])
    out = model(input_ids=torch.randint(1, VOCAB, (2, 7)), use_cache=True)
    tensors = out.cache.to_tensors()
    assert sorted(tensors) == ["layers.0.conv", "layers.0.state", "layers.1.conv", "layers.1.state"]
    again = MinRNNCache.from_tensors(model.config, tensors).to_tensors()
    assert all(torch.equal(again[k], tensors[k]) for k in tensors)
    assert MinRNNCache(model.config).to_tensors() == {}  # nothing run: nothing to carry
    with pytest.raises(ValueError, match="unknown entries"):
        MinRNNCache.from_tensors(model.config, {"layers.9.state": tensors["layers.0.state"]})


def test_state_gradient_reaches_the_weights_through_the_carried_call():
    # truncated backpropagation: the second call's loss has gradients (the state itself detached)
    model = tiny_lm(**CASES["minlstm-conv"]).train()
    ids = torch.randint(1, VOCAB, (2, 9))
    _, state, _ = _halves(model, ids, 4)
    from minrnn.experiments.modules import LogitsOnly

    logits, _ = LogitsOnly(model)(ids[:, 4:], state={k: v.detach() for k, v in state.items()}, return_state=True)
    logits.sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_models_without_a_fixed_state_are_refused():
    from minrnn.experiments.modules import LogitsOnly

    hybrid = LogitsOnly(tiny_lm(cell="mingru", attention_layers=[1]))
    assert not hybrid.carries_state
    with pytest.raises(ValueError, match="attention blocks"):
        hybrid(torch.randint(1, VOCAB, (1, 4)), return_state=True)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_torch_rnn_state_handed_over_equals_one_pass(cell):
    from minrnn.experiments.modules import TorchRNNLM

    torch.manual_seed(0)
    model = TorchRNNLM(cell, VOCAB, 12, num_layers=2).double().eval()
    ids = torch.randint(0, VOCAB, (3, 10))
    full = model(ids)
    a, state = model(ids[:, :4], return_state=True)
    b, _ = model(ids[:, 4:], state=state, return_state=True)
    torch.testing.assert_close(torch.cat([a, b], 1), full, rtol=1e-10, atol=1e-10)
    assert state["h"].shape == (3, 2, 12) and (cell == "gru") == ("c" not in state)
