"""state_expansion: n = 1 is today's model to the bit (a fixture written before the option
existed); n > 1 decodes from its cache what the full forward gives, keeps padding and packed
documents apart, runs both sequence methods alike, saves and loads, and is sized by the harness."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")

from minrnn.models import MinRNNCache, MinRNNConfig, MinRNNForCausalLM  # noqa: E402
from minrnn.ops.expanded import expanded_scan_reference  # noqa: E402

from .conftest import random_ids, tiny_config, tiny_lm  # noqa: E402

DATA = Path(__file__).parent / "data"
EXPANDED = {
    "mingru-n4": dict(cell="mingru", state_expansion=4),
    "minlstm-n2-d3": dict(cell="minlstm", state_expansion=2, state_head_dim=3),
    "minlstm-raw-n4": dict(cell="minlstm", state_expansion=4, cell_options={"normalize": False}),
    "mingru_signed-n4": dict(cell="mingru_signed", state_expansion=4, decay_bias=1.0),
    "minlstm_signed-n2-d3": dict(cell="minlstm_signed", state_expansion=2, state_head_dim=3),
    "mingru-n4-gated": dict(cell="mingru", state_expansion=4, state_output_gate=True),
}


@pytest.mark.parametrize("cell", ["mingru", "minlstm"])
def test_n1_reproduces_the_model_before_state_expansion(cell):
    """The fixture was written at commit f372ac0 (before the option): a seeded model's initial
    weights, its logits and loss, its packed-document logits and its token-by-token logits."""
    from safetensors.torch import load_file

    saved = load_file(DATA / f"state_expansion_n1_{cell}.safetensors")
    torch.manual_seed(0)
    config = MinRNNConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2, expansion_factor=1.5, mlp_mult=2,
                          conv_kernel=3, pad_token_id=0, initializer_range=0.2, cell=cell, state_expansion=1)
    model = MinRNNForCausalLM(config).eval()
    weights = {k.removeprefix("state."): v for k, v in saved.items() if k.startswith("state.")}
    for name, value in model.state_dict().items():
        if name in weights:
            assert torch.equal(value, weights[name]), name
    ids = saved["ids"]
    with torch.no_grad():
        out = model(input_ids=ids, labels=ids)
        packed = model(input_ids=ids, position_ids=saved["position_ids"]).logits
        cache = MinRNNCache(config)
        steps = torch.cat([model(input_ids=ids[:, t:t + 1], cache=cache, use_cache=True).logits
                           for t in range(ids.shape[1])], 1)
    assert torch.equal(out.logits, saved["logits"])
    assert torch.equal(out.loss.reshape(1), saved["loss"])
    assert torch.equal(packed, saved["logits_packed"])
    assert torch.equal(steps, saved["logits_steps"])


def expanded_lm(name, seed=0, **more):
    return tiny_lm(seed, **EXPANDED[name], **more)


@pytest.mark.parametrize("name", list(EXPANDED))
def test_cached_decoding_equals_the_full_forward(name):
    model = expanded_lm(name)
    ids = random_ids(2, 11)
    with torch.no_grad():
        full = model(input_ids=ids).logits
        cache = MinRNNCache(model.config)
        prefill = model(input_ids=ids[:, :4], cache=cache, use_cache=True).logits
        steps = [model(input_ids=ids[:, t:t + 1], cache=cache, use_cache=True).logits for t in range(4, 11)]
    torch.testing.assert_close(torch.cat([prefill, *steps], 1), full, rtol=1e-5, atol=1e-5)
    mixer = model.model.layers[0].mixer
    assert cache.layers[0].recurrent_states[0].shape == (2, mixer.heads, mixer.n, mixer.head_dim)


def test_generate_runs_from_the_cache_with_o1_state():
    model = expanded_lm("mingru-n4")
    ids = random_ids(1, 5)
    out = model.generate(ids, max_new_tokens=6, do_sample=False, return_dict_in_generate=True)
    assert out.sequences.shape == (1, 11)
    # greedy decoding from the cache picks what the full forward would pick at every position
    with torch.no_grad():
        logits = model(input_ids=out.sequences[:, :-1]).logits
    assert torch.equal(logits[0, 4:].argmax(-1), out.sequences[0, 5:])


@pytest.mark.parametrize("name", list(EXPANDED))
def test_left_padding_gives_what_the_row_gives_alone(name):
    model = expanded_lm(name)
    ids = random_ids(1, 7)
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], 1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 7, dtype=torch.long)], 1)
    with torch.no_grad():
        alone = model(input_ids=ids).logits
        both = model(input_ids=padded, attention_mask=mask).logits
    torch.testing.assert_close(both[:, 3:], alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["states", "chunked"])
def test_packed_documents_equal_documents_alone(method):
    torch.manual_seed(0)
    model = MinRNNForCausalLM(tiny_config(conv_kernel=4, **EXPANDED["minlstm-n2-d3"]))
    for layer in model.model.layers:
        layer.mixer.method = method
    docs = [random_ids(1, n, seed=s)[0] for s, n in ((1, 5), (2, 9), (3, 2))]
    ids = torch.cat(docs)[None]
    position_ids = torch.cat([torch.arange(len(d)) for d in docs])[None]
    logits = model(input_ids=ids, position_ids=position_ids).logits
    alone = torch.cat([model(input_ids=d[None]).logits for d in docs], 1)
    torch.testing.assert_close(logits, alone, rtol=1e-5, atol=1e-5)
    # and every parameter's gradient of a loss that reads every position
    weights = torch.randn(logits.shape, generator=torch.Generator().manual_seed(5))
    g_packed = torch.autograd.grad((logits * weights).sum(), list(model.parameters()))
    g_alone = torch.autograd.grad((alone * weights).sum(), list(model.parameters()))
    for (name, _), a, b in zip(model.named_parameters(), g_packed, g_alone):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=f"gradient of {name}")


def test_both_sequence_methods_give_the_same_logits_and_gradients():
    model = expanded_lm("mingru-n4").train()
    ids = random_ids(2, 19)
    results = []
    for method in ("states", "chunked"):
        for layer in model.model.layers:
            layer.mixer.method = method
        loss = F.cross_entropy(model(input_ids=ids).logits[:, :-1].reshape(-1, 50), ids[:, 1:].reshape(-1))
        results.append((loss, torch.autograd.grad(loss, list(model.parameters()))))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-6, atol=1e-6)
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_shapes_widths_and_init():
    config = tiny_config(state_expansion=4)  # hidden 16 x expansion 1.5 = 24: 6 heads of 4
    assert config.rnn_hidden_size == 24 and config.resolved_state_head_dim == 4
    assert tiny_config(state_expansion=5).rnn_hidden_size == 25  # 24 rounded to 5 heads of 5
    assert tiny_config(state_expansion=2, state_head_dim=7).rnn_hidden_size == 21
    model = MinRNNForCausalLM(tiny_config(state_expansion=4, decay_bias=2.0))
    proj = model.model.layers[0].mixer.in_proj
    assert proj.weight.shape == (24 + 2 * 24, 16)  # [hidden | gate | query]
    # minGRU's decay bias goes on the gate, a = 1 - sigmoid(gate): -decay_bias
    assert torch.equal(proj.bias[24:48], torch.full((24,), -2.0))
    assert torch.count_nonzero(proj.bias[:24]) == 0 and torch.count_nonzero(proj.bias[48:]) == 0


def test_bad_settings_are_one_line_errors():
    with pytest.raises(ValueError, match="state_expansion must be a positive integer"):
        tiny_config(state_expansion=0)
    with pytest.raises(ValueError, match="state_head_dim must be None or a positive integer"):
        tiny_config(state_expansion=2, state_head_dim=0)


def test_signed_expanded_model_runs_the_states_method_and_refuses_the_chunked_one():
    model = expanded_lm("mingru_signed-n4")
    ids = random_ids(2, 9)
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        a = model.model.layers[0].mixer._qkva(model.model.layers[0].mixer.in_proj(torch.randn(2, 9, 16)))[3]
    assert torch.isfinite(logits).all() and bool((a < 0).any()) and bool((a > 0).any())  # both signs in use
    for layer in model.model.layers:
        layer.mixer.method = "chunked"
    with pytest.raises(ValueError, match="signed decays \\(a=\\) need method='states'"):
        model(input_ids=ids)


def test_output_gate_multiplies_the_read_by_silu_of_its_projection():
    model = expanded_lm("mingru-n4-gated")
    mixer = model.model.layers[0].mixer
    assert mixer.gate_proj.weight.shape == (mixer.rnn_hidden_size, 16) and mixer.gate_proj.bias is None
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y, h = mixer(x)
        gate, mixer.gate_proj = mixer.gate_proj, None  # the same mixer, ungated
        q, k, v, log_a = mixer._qkva(mixer.in_proj(x))
        o, h_plain = expanded_scan_reference(q, k, v, log_a)
        want = mixer.out_proj(o.reshape(2, 5, -1) * F.silu(gate(x)))
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h, h_plain, rtol=1e-5, atol=1e-6)  # the gate does not touch the state
    with pytest.raises(ValueError, match="state_output_gate needs state_expansion > 1"):
        tiny_config(state_output_gate=True)


def test_save_and_load_keep_the_expanded_model(tmp_path):
    model = expanded_lm("minlstm-n2-d3")
    model.save_pretrained(tmp_path)
    loaded = MinRNNForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.state_expansion == 2 and loaded.config.state_head_dim == 3
    ids = random_ids(1, 6)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits)


def test_the_harness_builds_expanded_models_to_the_budget():
    from minrnn.experiments.baselines import build_model

    plain = build_model("mingru", 65, 200_000, max_length=64)
    for n in (4, 16):
        model = build_model("mingru", 65, 200_000, max_length=64, state_expansion=n)
        assert abs(model.baseline.params / 200_000 - 1) < 0.10
        assert model.model.config.state_expansion == n
        # the query projection costs width: the expanded model is narrower at the same budget
        assert model.baseline.width < plain.baseline.width
