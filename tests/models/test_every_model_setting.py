"""Every field of MinRNNConfig changes what it should. Each case builds a reference model and a
model with one field set away from it; where the weights keep their shapes the second model gets
the reference's weights, so the only difference left is the field itself, and the check is on
what that field governs (the logits, a shape, the init against its formula, generation). The
cases are checked against the config's own field list, so a new field without a case fails here.
"""

import math

import pytest
import torch

pytest.importorskip("transformers")
from minrnn.models import MinRNNConfig, MinRNNForCausalLM, MinRNNForSequenceClassification  # noqa: E402
from minrnn.models.configuration_minrnn import OLD_KEYS  # noqa: E402
from minrnn.ops.cells import get_cell  # noqa: E402

from .conftest import random_ids, tiny_config  # noqa: E402

IDS = random_ids(2, 12)
HYBRID = dict(attention_layers=[1], num_attention_heads=2)


def build(seed=0, cls=MinRNNForCausalLM, **overrides):
    torch.manual_seed(seed)
    return cls(tiny_config(**overrides)).eval()


def with_weights_of(ref, model):
    model.load_state_dict(ref.state_dict())
    return model


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


def other_logits(ref, var):
    """Same weights, the field alone changed: the logits move."""
    return not torch.allclose(logits(ref), logits(with_weights_of(ref, var)), atol=1e-6)


def layer(model, i=0):
    return model.model.layers[i]


def every_norm_eps(model) -> set:
    """The eps of each RMSNorm of the model (two per block and the final one)."""
    norms = [m for m in model.modules() if type(m).__name__ == "MinRNNRMSNorm"]
    assert len(norms) == 2 * model.config.num_hidden_layers + 1
    return {m.eps for m in norms}


def expanded_state_shape(model) -> tuple:
    """The recurrent state a forward leaves in the cache of the first block."""
    with torch.no_grad():
        cache = model(IDS, use_cache=True).cache
    return tuple(cache.layers[0].recurrent_states[0].shape)


def decay_bias_on_its_slot(ref, var):
    """The init formula: sign * decay_bias on the decay slot of every mixer's input bias, 0 elsewhere."""
    spec, E = get_cell(var.config.cell), var.config.rnn_hidden_size
    bias = layer(var).mixer.in_proj.bias.detach().view(spec.n_pre, E)
    expected = torch.zeros_like(bias)
    expected[spec.decay_slot] = spec.decay_bias_sign * 1.75
    return torch.equal(bias, expected)


def embedding_std(value):
    def check(ref, var):
        return math.isclose(var.model.embed_tokens.weight.std().item(), value, rel_tol=0.1)
    return check


def attention_shapes(ref, var):
    return [p.shape for p in layer(ref, 1).mixer.parameters()] != [p.shape for p in layer(var, 1).mixer.parameters()]


def windowed(ref, var):
    long = random_ids(1, 40)
    a, b = logits(ref, long), logits(with_weights_of(ref, var), long)
    return torch.allclose(a[:, :4], b[:, :4], atol=1e-6) and not torch.allclose(a[:, 4:], b[:, 4:], atol=1e-6)


def stops_at_eos(ref, var):
    with torch.no_grad():
        first = ref.generate(IDS[:1], max_new_tokens=6, do_sample=False)[0, IDS.shape[1]].item()
        var = with_weights_of(ref, build(eos_token_id=first))
        out = var.generate(IDS[:1], max_new_tokens=6, do_sample=False)
    return out.shape[1] == IDS.shape[1] + 1


def starts_from_bos(ref, var):
    with torch.no_grad():
        out = with_weights_of(ref, var).generate(max_new_tokens=3, do_sample=False)
    return out[0, 0].item() == 7


def pools_before_the_pad(ref, var):
    ids = torch.cat([IDS[:, :8], torch.full((2, 4), 5)], dim=1)  # rows end in four tokens 5
    torch.manual_seed(0)
    a = build(cls=MinRNNForSequenceClassification)
    b = with_weights_of(a, build(cls=MinRNNForSequenceClassification, pad_token_id=5))
    with torch.no_grad():
        return not torch.allclose(a(ids).logits, b(ids).logits, atol=1e-6)


def dropout_in_training(ref, var):
    var = with_weights_of(ref, var).train()
    return not torch.equal(var(IDS).logits, var(IDS).logits) and torch.equal(logits(var.eval()), logits(ref))


def gated_read(ref, var):
    """The ungated model's weights plus a gate projection per block: the logits move."""
    missing, unexpected = var.load_state_dict(ref.state_dict(), strict=False)
    return (not unexpected and sorted(missing) == sorted(f"model.layers.{i}.mixer.gate_proj.weight"
                                                         for i in range(len(var.model.layers)))
            and not torch.allclose(logits(ref), logits(var), atol=1e-6))


# field: (reference overrides, variant overrides, check(reference, variant))
CASES = {
    "vocab_size": ({}, dict(vocab_size=61), lambda r, v: logits(v).shape[-1] == 61),
    "hidden_size": ({}, dict(hidden_size=24), lambda r, v: v.model.embed_tokens.weight.shape[1] == 24),
    "num_hidden_layers": ({}, dict(num_hidden_layers=3), lambda r, v: len(v.model.layers) == 3),
    "cell": ({}, dict(cell="minlstm"), lambda r, v: layer(v).mixer.in_proj.weight.shape[0] == 3 * 24),
    "expansion_factor": ({}, dict(expansion_factor=2.0), lambda r, v: layer(v).mixer.in_proj.weight.shape[0] == 2 * 32),
    "decay_bias": ({}, dict(cell="minlstm", decay_bias=1.75), decay_bias_on_its_slot),
    "cell_options": (dict(cell="minlstm"), dict(cell="minlstm", cell_options={"normalize": False}), other_logits),
    # 24 recurrent channels: 6 heads of an n x d = 4 x 4 state, then 8 heads of 2 x 3
    "state_expansion": ({}, dict(state_expansion=4), lambda r, v: expanded_state_shape(v) == (2, 6, 4, 4)),
    "state_head_dim": (dict(state_expansion=2), dict(state_expansion=2, state_head_dim=3),
                       lambda r, v: expanded_state_shape(v) == (2, 8, 2, 3)),
    "state_output_gate": (dict(state_expansion=4), dict(state_expansion=4, state_output_gate=True),
                          lambda r, v: layer(r).mixer.gate_proj is None and gated_read(r, v)),
    "use_conv": ({}, dict(use_conv=False), lambda r, v: layer(v).conv is None and layer(r).conv is not None),
    "conv_kernel": ({}, dict(conv_kernel=5), lambda r, v: layer(v).conv.weight.shape[-1] == 5),
    "use_mlp": ({}, dict(use_mlp=False), lambda r, v: layer(v).mlp is None and layer(r).mlp is not None),
    "mlp_mult": ({}, dict(mlp_mult=3), lambda r, v: layer(v).mlp.up_proj.weight.shape[0] == 48),
    "hidden_act": ({}, dict(hidden_act="relu"), other_logits),
    "use_bias": ({}, dict(use_bias=True), lambda r, v: layer(v).mixer.out_proj.bias is not None
                 and layer(r).mixer.out_proj.bias is None),
    "rms_norm_eps": ({}, dict(rms_norm_eps=1.0), lambda r, v: other_logits(r, v) and every_norm_eps(v) == {1.0}),
    "dropout": ({}, dict(dropout=0.5), dropout_in_training),
    "initializer_range": ({}, dict(initializer_range=0.05), embedding_std(0.05)),
    "scan_backend": ({}, dict(scan_backend="sequential"),
                     lambda r, v: {b.mixer.backend for b in v.model.layers} == {"sequential"}),
    "tie_word_embeddings": ({}, dict(tie_word_embeddings=False),
                            lambda r, v: v.lm_head.weight is not v.model.embed_tokens.weight
                            and r.lm_head.weight is r.model.embed_tokens.weight),
    "use_cache": ({}, dict(use_cache=False), lambda r, v: v(IDS).cache is None and r(IDS).cache is not None),
    "pad_token_id": ({}, {}, pools_before_the_pad),
    "bos_token_id": ({}, dict(bos_token_id=7), starts_from_bos),
    "eos_token_id": ({}, {}, stops_at_eos),
    "attention_layers": ({}, dict(attention_layers=[0]), lambda r, v: type(layer(v).mixer) is not type(layer(r).mixer)),
    "attention_every": ({}, dict(attention_every=2, num_attention_heads=2),
                        lambda r, v: type(layer(v, 1).mixer) is not type(layer(r, 1).mixer)),
    # the same projections' shapes (heads x head size = hidden size), split into other heads
    "num_attention_heads": (HYBRID, dict(HYBRID, num_attention_heads=4), other_logits),
    "attention_head_dim": (HYBRID, dict(HYBRID, attention_head_dim=4), attention_shapes),
    "num_key_value_heads": (dict(HYBRID, num_attention_heads=4), dict(HYBRID, num_attention_heads=4,
                                                                      num_key_value_heads=2), attention_shapes),
    "attention_window": (HYBRID, dict(HYBRID, attention_window=5), windowed),
    "rope_theta": (HYBRID, dict(HYBRID, rope_theta=50.0), other_logits),
    # the earlier names, mapped onto decay_bias and cell_options for the cells they applied to
    "forget_bias": ({}, dict(cell="minlstm", forget_bias=1.75), decay_bias_on_its_slot),
    "mingru_forget_bias": ({}, dict(mingru_forget_bias=1.75), decay_bias_on_its_slot),
    "minlstm_normalize": (dict(cell="minlstm"), dict(cell="minlstm", minlstm_normalize=False), other_logits),
}


def own_fields() -> set[str]:
    """The config's fields and the earlier names it maps."""
    return set(MinRNNConfig.__annotations__) | set(OLD_KEYS)


def test_every_field_of_the_model_config_has_a_case():
    assert set(CASES) == own_fields()


@pytest.mark.parametrize("field", sorted(CASES))
def test_a_non_default_value_changes_what_it_should(field):
    base, variant, check = CASES[field]
    # pad_token_id: the shared tiny config sets one; the reference here has none
    base = {"pad_token_id": None, **base}
    variant = {"pad_token_id": None, **variant}
    ref, var = build(**base), build(**variant)
    assert check(ref, var), field
