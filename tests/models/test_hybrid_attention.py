"""The attention mixer of hybrid models: scaled_dot_product_attention against the dense softmax
reference, RoPE, windows, grouped-query heads, padding; the config's attention fields."""

import math

import pytest
import torch

pytest.importorskip("transformers")

from minrnn.models import MinRNNForCausalLM  # noqa: E402
from minrnn.models.attention_minrnn import (  # noqa: E402
    AttentionWindow,
    MinRNNAttention,
    attention_fast,
    attention_reference,
    every_third_block,
    rope,
    visible_keys,
)

from .conftest import random_ids, tiny_config, tiny_lm  # noqa: E402
from .test_modeling import left_pad  # noqa: E402

HYBRIDS = {
    "full-mha": dict(attention_layers=[1]),
    "window3-gqa": dict(attention_layers=[1], attention_window=3, num_key_value_heads=2),
    "every2-mqa-noconv": dict(attention_every=1, num_hidden_layers=2, num_key_value_heads=1, use_conv=False,
                              attention_window=4, attention_head_dim=6),
    "minlstm-window5": dict(cell="minlstm", attention_layers=[0], attention_window=5, num_attention_heads=2),
}


def qkv(B=2, H=4, G=2, T=9, S=9, hd=6, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, T, hd, generator=gen, dtype=dtype)
    k = torch.randn(B, G, S, hd, generator=gen, dtype=dtype)
    v = torch.randn(B, G, S, hd, generator=gen, dtype=dtype)
    return q, k, v


def explicit_visibility(q_pos, q_valid, k_pos, k_valid, window):
    """visible_keys written as loops over queries and keys."""
    B, T = q_pos.shape
    S = k_pos.shape[1]
    out = torch.zeros(B, 1, T, S, dtype=torch.bool)
    for b in range(B):
        for i in range(T):
            for j in range(S):
                if not q_valid[b, i]:
                    out[b, 0, i, j] = j == S - T + i
                else:
                    d = int(q_pos[b, i] - k_pos[b, j])
                    out[b, 0, i, j] = bool(k_valid[b, j]) and d >= 0 and (window is None or d < window)
    return out


@pytest.mark.parametrize("window", [None, 1, 3, 20])
def test_visibility_matches_the_loops(window):
    gen = torch.Generator().manual_seed(3)
    k_valid = torch.rand(2, 12, generator=gen) > 0.3
    k_pos = k_valid.long().cumsum(1) - 1
    q_pos, q_valid = k_pos[:, -5:], k_valid[:, -5:]
    got = visible_keys(q_pos, q_valid, k_pos, k_valid, window)
    assert torch.equal(got, explicit_visibility(q_pos, q_valid, k_pos, k_valid, window))
    assert got.any(-1).all()  # no empty softmax row


def test_reference_is_the_softmax_formula():
    q, k, v = qkv(B=1, H=2, G=1, T=3, S=3, hd=4)
    visible = torch.tril(torch.ones(3, 3, dtype=torch.bool))[None, None]
    got = attention_reference(q, k, v, visible)
    for h in range(2):
        for i in range(3):
            w = torch.tensor([math.exp(q[0, h, i] @ k[0, 0, j] / 2.0) for j in range(i + 1)], dtype=torch.float64)
            want = (w[:, None] * v[0, 0, :i + 1]).sum(0) / w.sum()
            torch.testing.assert_close(got[0, h, i], want)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-6)])
@pytest.mark.parametrize("window", [None, 4, 9, 20])  # 9, 20: as long as the sequence or longer
@pytest.mark.parametrize("G", [4, 2, 1])
@pytest.mark.parametrize("masked", [False, True])
def test_fast_path_matches_reference_forward_and_grads(dtype, tol, window, G, masked):
    q, k, v = (t.requires_grad_() for t in qkv(G=G, T=9, S=9, dtype=dtype))
    if masked:  # left padding of 3 in the second row
        valid = torch.ones(2, 9, dtype=torch.bool)
        valid[1, :3] = False
        pos = (valid.long().cumsum(1) - 1).clamp_min(0)
        visible = visible_keys(pos, valid, pos, valid, window)
    else:
        i = torch.arange(9)
        visible = ((i[None] <= i[:, None]) & (window is None or (i[None] > i[:, None] - (window or 0))))[None, None]
    fast = attention_fast(q, k, v, visible if masked else None, window)
    ref = attention_reference(q, k, v, visible.expand(2, 1, 9, 9))
    torch.testing.assert_close(fast, ref, rtol=tol, atol=tol)
    g = torch.randn_like(ref)
    grads_fast = torch.autograd.grad(fast, (q, k, v), g)
    grads_ref = torch.autograd.grad(ref, (q, k, v), g)
    for a, b in zip(grads_fast, grads_ref):
        torch.testing.assert_close(a, b, rtol=10 * tol, atol=10 * tol)


def test_fast_path_half_precision_error_is_the_references():
    """bf16: the fast path is no further from the float64 result than the reference run in bf16."""
    q, k, v = qkv(T=33, S=33, hd=16, dtype=torch.float64)
    exact = attention_fast(q, k, v, None, 8)
    i = torch.arange(33)
    visible = ((i[None] <= i[:, None]) & (i[None] > i[:, None] - 8))[None, None]
    half = [t.bfloat16() for t in (q, k, v)]
    err_fast = (attention_fast(*half, None, 8).double() - exact).abs().max()
    err_ref = (attention_reference(*half, visible).double() - exact).abs().max()
    assert err_fast <= 2 * err_ref + 1e-3


def test_rope_rotates_pairs_and_keeps_relative_positions():
    x = torch.randn(1, 1, 5, 8, dtype=torch.float64)
    pos = torch.arange(5)[None]
    rotated = rope(x, pos, 10000.0)
    torch.testing.assert_close(rotated.norm(dim=-1), x.norm(dim=-1))  # a rotation
    torch.testing.assert_close(rope(x, torch.zeros_like(pos), 10000.0), x)
    # pair i of 4 turns by pos * 10000^(-i/4) (the first half against the second half)
    angle = 3 * 10000.0 ** (-1 / 4)
    a, b = x[0, 0, 3, 1], x[0, 0, 3, 5]
    torch.testing.assert_close(rotated[0, 0, 3, 1], a * math.cos(angle) - b * math.sin(angle))
    torch.testing.assert_close(rotated[0, 0, 3, 5], b * math.cos(angle) + a * math.sin(angle))
    # scores depend on the distance only
    q, k = torch.randn(2, 8, dtype=torch.float64)
    def score(i, j):
        return (rope(q.view(1, 1, 1, 8), torch.tensor([[i]]), 1e4) * rope(k.view(1, 1, 1, 8), torch.tensor([[j]]), 1e4)).sum()
    torch.testing.assert_close(score(7, 3), score(104, 100))


@pytest.mark.parametrize("name", list(HYBRIDS))
def test_model_fast_path_matches_reference_logits_and_grads(name):
    model = tiny_lm(dtype=torch.float64, **HYBRIDS[name]).train()
    prompts = [random_ids(1, n, seed=n)[0] for n in (9, 4, 7)]
    ids, mask = left_pad(prompts, pad=5)
    outs = []
    for reference in (False, True):
        for layer in model.model.layers:
            if isinstance(layer.mixer, MinRNNAttention):
                layer.mixer.reference = reference
        model.zero_grad()
        logits = model(ids, attention_mask=mask, use_cache=False).logits
        (logits * mask[..., None]).square().sum().backward()
        outs.append((logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=1e-10, atol=1e-10)
    assert outs[0][1].keys() == outs[1][1].keys() and any("q_proj" in n for n in outs[0][1])
    for n in outs[0][1]:
        torch.testing.assert_close(outs[0][1][n], outs[1][1][n], rtol=1e-9, atol=1e-9, msg=n)


def test_window_limits_what_the_attention_layer_sees():
    """Output t of an attention mixer depends on inputs t - window + 1 .. t, not earlier, not later."""
    config = tiny_config(attention_layers=[0], attention_window=3)
    torch.manual_seed(0)
    mixer = MinRNNAttention(config).double()
    x = torch.randn(1, 10, 16, dtype=torch.float64, requires_grad=True)
    y, _ = mixer(x)
    for t in range(10):
        (g,) = torch.autograd.grad(y[0, t].sum(), x, retain_graph=True)
        depends = g[0].abs().sum(-1) > 0
        assert depends.tolist() == [t - 3 < s <= t for s in range(10)], t


def test_every_third_block_places_attention_as_attention_every_3_or_last():
    for layers in (3, 4, 6, 9):
        assert every_third_block(layers) == list(tiny_config(num_hidden_layers=layers, attention_every=3)
                                                 .attention_layer_indices)
    assert every_third_block(1) == [0] and every_third_block(2) == [1]


def test_head_size_may_differ_from_the_width():
    mixer = MinRNNAttention(tiny_config(attention_layers=[0], num_attention_heads=3, attention_head_dim=6))
    assert mixer.q_proj.weight.shape == (18, 16) and mixer.out_proj.weight.shape == (16, 18)
    y, new = mixer(torch.randn(2, 5, 16))
    assert y.shape == (2, 5, 16) and new.keys.shape == (2, 3, 5, 6)


def test_mixer_returns_its_keys_positions_and_next_position():
    config = tiny_config(attention_layers=[0], num_key_value_heads=2)
    mixer = MinRNNAttention(config)
    mask = torch.tensor([[False, False, True, True], [True, True, True, True]])
    _, new = mixer(torch.randn(2, 4, 16), None, mask)
    assert isinstance(new, AttentionWindow) and new.keys.shape == (2, 2, 4, 4)
    assert new.positions[0, 2:].tolist() == [0, 1] and new.positions[1].tolist() == [0, 1, 2, 3]
    assert new.next_position.tolist() == [2, 4] and torch.equal(new.valid, mask)


def test_config_defaults_build_the_same_model_as_before():
    config = tiny_config()
    assert config.attention_layer_indices == ()
    model = MinRNNForCausalLM(config)
    assert not any("q_proj" in n for n, _ in model.named_parameters())
    hybrid = MinRNNForCausalLM(tiny_config(attention_every=2, num_hidden_layers=4))
    assert [type(b.mixer).__name__ for b in hybrid.model.layers] == ["MinRNNMixer", "MinRNNAttention"] * 2


@pytest.mark.parametrize("overrides,message", [
    (dict(attention_layers=[2]), r"attention_layers must be indices in \[0, 2\)"),
    (dict(attention_layers=[0, 0]), "attention_layers must be None or a list of distinct"),
    (dict(attention_layers=[-1]), "attention_layers must be None or a list of distinct"),
    (dict(attention_layers=[0], attention_every=2), "set at most one of attention_layers and attention_every"),
    (dict(attention_every=0), "attention_every must be None or a positive integer"),
    (dict(attention_layers=[0], num_attention_heads=3), "num_attention_heads=3 must divide hidden_size=16"),
    (dict(attention_layers=[0], num_attention_heads=16), "even head size"),
    (dict(attention_layers=[0], num_key_value_heads=3), "num_key_value_heads=3 must divide num_attention_heads=4"),
    (dict(attention_layers=[0], attention_head_dim=5), "attention_head_dim must be even"),
    (dict(attention_window=0), "attention_window must be None or a positive integer"),
    (dict(rope_theta=0), "rope_theta must be a positive finite number"),
])
def test_bad_attention_fields_raise_one_line(overrides, message):
    with pytest.raises(ValueError, match=message) as err:
        tiny_config(**overrides)
    assert "\n" not in str(err.value)


def test_attention_fields_round_trip(tmp_path):
    config = tiny_config(attention_layers=[1, 0], attention_window=7, num_key_value_heads=2, rope_theta=500.0)
    model = MinRNNForCausalLM(config).eval()
    model.save_pretrained(tmp_path)
    loaded = MinRNNForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.attention_layer_indices == (0, 1) and loaded.config.attention_window == 7
    ids = random_ids(2, 6)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits)
