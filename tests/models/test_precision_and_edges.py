"""Half-precision decoding carries its state in float32 over thousands of steps; empty
batches and inputs with no positions give empty outputs."""

import pytest
import torch

pytest.importorskip("transformers")

from minrnn.models import MinRNNCache, MinRNNForSequenceClassification  # noqa: E402
from minrnn.models.cache_minrnn import MinRNNCacheLayer  # noqa: E402

from .conftest import random_ids, tiny_config, tiny_lm  # noqa: E402

# The decode state after 2000 bf16 steps against the state of one parallel pass over the same
# tokens (its scan accumulates in float32), relative to the state's size: with the state kept
# in float32 the two differ by 1.1e-7 .. 4.4e-7 (both cells, with and without the conv, long
# memory too); a state rounded to bf16 at every step is off by 2e-3 .. 2e-2.
STATE_RTOL = 1e-6
STEPS = 2000


@pytest.fixture
def one_thread():
    """The steps are tiny matmuls: threads only add synchronisation (and on a busy machine,
    a lot of it)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def decode_and_prefill_states(model, ids):
    """The recurrent state of every layer after decoding ids one token per call, and after one
    parallel pass over all of them."""
    stepped, whole = MinRNNCache(model.config), MinRNNCache(model.config)
    with torch.no_grad():
        model(ids, cache=whole)
        for t in range(ids.shape[1]):
            model(ids[:, t:t + 1], cache=stepped)
    return [(model_layer.recurrent_states[0], ref_layer.recurrent_states[0])
            for model_layer, ref_layer in zip(stepped.layers, whole.layers)]


def relative_error(got, want):
    return ((got - want).abs().max() / want.abs().max()).item()


@pytest.mark.parametrize("overrides", [dict(cell="mingru"), dict(cell="minlstm", use_conv=False)],
                         ids=["mingru-conv", "minlstm"])
def test_bf16_decoding_keeps_the_state_in_float32_over_thousands_of_steps(one_thread, overrides):
    model = tiny_lm(dtype=torch.bfloat16, **overrides)
    for got, want in decode_and_prefill_states(model, random_ids(1, STEPS)):
        assert got.dtype == want.dtype == torch.float32
        assert relative_error(got, want) < STATE_RTOL


def test_the_long_decode_check_catches_a_state_rounded_to_bf16(one_thread, monkeypatch):
    """The check above fails for a decode step that rounds its carried state to bf16 (and
    keeps it in a float32 tensor, so a dtype check alone cannot tell)."""
    model = tiny_lm(dtype=torch.bfloat16)
    keep = MinRNNCacheLayer.update_recurrent_state

    def rounding(self, state, *args, **kwargs):
        return keep(self, state.to(torch.bfloat16).float() if kwargs.get("num_tokens") == 1 else state,
                    *args, **kwargs)

    monkeypatch.setattr(MinRNNCacheLayer, "update_recurrent_state", rounding)
    errors = [relative_error(got, want) for got, want in decode_and_prefill_states(model, random_ids(1, 200))]
    assert min(errors) > 100 * STATE_RTOL, errors


@pytest.mark.parametrize("use_conv", [True, False], ids=["conv", "no-conv"])
def test_no_positions_give_empty_logits_and_leave_the_cache_alone(use_conv):
    model = tiny_lm(use_conv=use_conv)
    ids = random_ids(2, 5)
    cache = MinRNNCache(model.config)
    with torch.no_grad():
        model(ids, cache=cache)
        before = [(layer.recurrent_states[0].clone(), layer.conv_states[0]) for layer in cache.layers]
        out = model(ids[:, :0], cache=cache, output_hidden_states=True)
        assert out.logits.shape == (2, 0, model.config.vocab_size)
        assert len(out.hidden_states) == model.config.num_hidden_layers + 1
        assert all(h.shape == (2, 0, model.config.hidden_size) for h in out.hidden_states)
        assert cache.get_seq_length() == 5
        for layer, (state, conv) in zip(cache.layers, before):
            assert torch.equal(layer.recurrent_states[0], state)
            assert conv is None or torch.equal(layer.conv_states[0], conv)
        # and the next token continues as if the empty call had not happened
        nxt = model(ids[:, 4:5] * 0 + 7, cache=cache).logits
        ref = model(torch.cat([ids, ids[:, :1] * 0 + 7], 1), use_cache=False).logits[:, -1:]
    torch.testing.assert_close(nxt, ref, rtol=1e-5, atol=1e-5)
    assert model(ids[:, :0], use_cache=False).logits.shape == (2, 0, model.config.vocab_size)


def test_a_classifier_needs_a_position():
    clf = MinRNNForSequenceClassification(tiny_config(num_labels=3)).eval()
    with pytest.raises(ValueError, match="no positions"):
        clf(random_ids(2, 5)[:, :0])


@pytest.mark.parametrize("use_conv", [True, False], ids=["conv", "no-conv"])
def test_an_empty_batch_gives_empty_logits(use_conv):
    model = tiny_lm(use_conv=use_conv)
    ids = random_ids(2, 5)
    with torch.no_grad():
        assert model(ids[:0], use_cache=False).logits.shape == (0, 5, model.config.vocab_size)
        cache = MinRNNCache(model.config)
        assert model(ids[:0], cache=cache).logits.shape == (0, 5, model.config.vocab_size)
        assert cache.get_seq_length() == 5 and cache.layers[0].recurrent_states[0].shape[0] == 0
        assert model(ids[:0, :1], cache=cache).logits.shape == (0, 1, model.config.vocab_size)
    clf = MinRNNForSequenceClassification(tiny_config(num_labels=3, use_conv=use_conv)).eval()
    with torch.no_grad():
        assert clf(ids[:0], attention_mask=torch.ones(0, 5, dtype=torch.long)).logits.shape == (0, 3)
