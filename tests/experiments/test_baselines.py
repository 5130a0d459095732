"""Baselines: parameter budgets met, logits of the right shape, finite gradients, causality."""

import warnings

import pytest
import torch

from minrnn.experiments.baselines import BASELINES, build_model, mambapy_available, parameter_count

VOCAB = 65
TARGETS = [200_000, 1_000_000]


@pytest.fixture(scope="module")
def models():
    built = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers' notes about the reference (non-CUDA) kernels
        for target in TARGETS:
            for name in BASELINES:
                torch.manual_seed(0)
                built[name, target] = build_model(name, VOCAB, target, max_length=64)
    return built


def test_every_baseline_is_known():
    assert set(BASELINES) == {"mingru", "minlstm", "mingru-signed", "minlstm-signed", "mingru-hybrid", "minlstm-hybrid",
                              "llama", "gpt2", "mamba", "lstm",
                              "gru"}


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("name", BASELINES)
def test_budget_shape_and_gradients(models, name, target):
    model = models[name, target]
    params = parameter_count(model)
    assert abs(params / target - 1) <= 0.10, f"{name}: {params} parameters for a target of {target}"
    assert model.baseline.params == params and model.baseline.name == name
    model.train()
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))
    logits = model(ids)
    assert logits.shape == (2, 9, VOCAB) and torch.isfinite(logits).all()
    model.zero_grad()
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids.roll(-1, 1).flatten()).backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(g.abs().sum() for g in grads) > 0


@pytest.mark.parametrize("name", BASELINES)
def test_causal(models, name):
    model = models[name, TARGETS[0]].eval()
    ids = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(2))
    t = 4
    changed = ids.clone()
    changed[:, t + 1:] = (changed[:, t + 1:] + 1 + torch.arange(5)) % VOCAB
    with torch.no_grad():
        a, b = model(ids), model(changed)
    torch.testing.assert_close(a[:, : t + 1], b[:, : t + 1], rtol=0, atol=1e-6)
    assert (a[:, t + 1] - b[:, t + 1]).abs().max() > 1e-4  # and the later tokens are read


def test_embeddings_are_tied_and_counted_once(models):
    for name in BASELINES:
        model = models[name, TARGETS[0]]
        if name in ("lstm", "gru"):
            emb, head = model.embed.weight, model.head.weight
        else:
            emb, head = model.model.get_input_embeddings().weight, model.model.get_output_embeddings().weight
        assert emb is head, name
    untied = build_model("lstm", VOCAB, None, width=32, num_layers=1, tie_embeddings=False)
    assert parameter_count(untied) == 2 * VOCAB * 32 + 4 * (32 * 32 * 2 + 2 * 32)


def test_overrides_fix_shapes():
    m = build_model("llama", VOCAB, None, width=48, intermediate_size=100, num_layers=2, num_attention_heads=3)
    cfg = m.model.config
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.num_attention_heads) == (48, 100, 2, 3)
    m = build_model("mingru", VOCAB, 150_000, num_layers=3, expansion_factor=6, use_conv=False, use_mlp=False)
    cfg = m.model.config
    assert (cfg.num_hidden_layers, cfg.expansion_factor, cfg.use_conv, cfg.use_mlp) == (3, 6, False, False)
    assert abs(m.baseline.relative_error) <= 0.10
    assert build_model("gpt2", VOCAB, None, width=32, max_length=300).model.config.n_positions == 300
    # the configs' own names for width and depth mean the same as width / num_layers
    m = build_model("gpt2", VOCAB, None, n_embd=32, n_layer=2)
    assert (m.model.config.n_embd, m.model.config.n_layer, m.baseline.num_layers) == (32, 2, 2)


def test_clear_errors():
    with pytest.raises(KeyError, match="unknown model 'rwkv'"):
        build_model("rwkv", VOCAB, 10_000)
    with pytest.raises(ValueError, match="more than 10% away"):
        build_model("gpt2", 50_000, 20_000)  # the embedding alone is over budget
    with pytest.raises(ValueError, match="multiple of 8"):
        build_model("llama", VOCAB, None, width=36)
    with pytest.raises(ValueError, match="give target_params or a width"):
        build_model("gru", VOCAB, None)
    with pytest.raises(TypeError, match="unknown options"):
        build_model("lstm", VOCAB, 100_000, expansion_factor=2)


def test_mamba_scan_choice():
    if mambapy_available():
        assert build_model("mamba", VOCAB, None, width=16, mamba_scan="mambapy").model.config.use_mambapy
    else:
        with pytest.raises(ImportError, match="mambapy"):
            build_model("mamba", VOCAB, None, width=16, mamba_scan="mambapy")
    assert not build_model("mamba", VOCAB, None, width=16, mamba_scan="sequential").model.config.use_mambapy


def test_minrnn_models_are_the_families_built_as_this_packages_model():
    from minrnn.experiments.baselines import MINRNN_MODELS
    from minrnn.models import MinRNNForCausalLM

    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        built = {name: build_model(name, 16, 20_000) for name in BASELINES}
    ours = {name for name, m in built.items() if isinstance(getattr(m, "model", None), MinRNNForCausalLM)}
    assert ours == set(MINRNN_MODELS)
