"""MinGRU / MinLSTM with ``signed=True`` (the cells with transitions in (-1, 1)): the layers,
their step, their init, and the language model built on the signed cells."""

import pytest
import torch

import minrnn
import minrnn.functional as MF
from minrnn.ops.cells import get_cell

from .conftest import SIGNED_BACKENDS, assert_close_scaled, step_through

LAYERS = [(minrnn.MinGRU, "mingru_signed", {}), (minrnn.MinLSTM, "minlstm_signed", {"normalize": True}),
          (minrnn.MinLSTM, "minlstm_signed", {"normalize": False})]
IDS = ["mingru", "minlstm", "minlstm-unnormalized"]


@pytest.mark.parametrize("cls,cell,options", LAYERS, ids=IDS)
@pytest.mark.parametrize("backend", ["auto"] + SIGNED_BACKENDS)
def test_signed_layer_is_its_cell_on_the_projection(cls, cell, options, backend):
    torch.manual_seed(0)
    layer = cls(6, 5, num_layers=2, signed=True, backend=backend, dtype=torch.float64, **options)
    assert layer.signed and layer.spec.name == cell and "signed=True" in repr(layer)
    x = torch.randn(3, 29, 6, dtype=torch.float64)
    h0 = torch.randn(2, 3, 5, dtype=torch.float64)
    out, h_n = layer(x, h0)
    # by hand: each layer's projection, then the cell's reference loop
    inp, finals = x, []
    for k, proj in enumerate(layer.proj):
        pre = proj(inp).chunk(get_cell(cell).n_pre, -1)
        inp, last = MF.run_cell(cell, pre, h0[k], mode="sequential", **options)
        finals.append(last)
    assert_close_scaled(out, inp, 1e-12, "output")
    assert_close_scaled(h_n, torch.stack(finals), 1e-12, "h_n")
    # one step at a time gives the same
    ys, h = step_through(layer, x, h0)
    assert_close_scaled(ys, out, 1e-12, "steps")
    assert_close_scaled(h, h_n, 1e-12, "step state")


@pytest.mark.parametrize("cls,cell,options", LAYERS, ids=IDS)
def test_signed_layer_has_the_unsigned_parameters_and_its_forget_bias_starts_a_near_one(cls, cell, options):
    plain, signed = cls(8, 16, num_layers=2, **options), cls(8, 16, num_layers=2, signed=True, **options)
    assert [p.shape for p in plain.parameters()] == [p.shape for p in signed.parameters()]
    assert not plain.signed and plain.spec.name == cell.removesuffix("_signed")
    torch.manual_seed(0)
    base = cls(8, 16, signed=True, forget_bias=0.0, dtype=torch.float64, **options)
    torch.manual_seed(0)
    warm = cls(8, 16, signed=True, forget_bias=3.0, dtype=torch.float64, **options)
    spec, H = warm.spec, 16
    offset = torch.zeros(spec.n_pre * H, dtype=torch.float64)
    offset[spec.decay_slot * H:(spec.decay_slot + 1) * H] = spec.decay_bias_sign * 3.0
    torch.testing.assert_close(warm.proj[0].bias - base.proj[0].bias, offset)
    # that offset alone (zero input, zero other biases): a = 2 a_unsigned - 1 > 0, the cell
    # starts remembering (a positive transition) rather than flipping
    pre = offset.view(1, 1, -1).chunk(spec.n_pre, -1)
    a, _ = spec.gates(*pre, *spec.options(**options))
    a_unsigned, _ = get_cell(plain.spec.name).gates(*pre, *spec.options(**options))
    torch.testing.assert_close(a, 2 * a_unsigned - 1)
    assert (a > 0.3).all()
    if cls is minrnn.MinGRU or not options["normalize"]:
        torch.testing.assert_close(a, torch.full_like(a, 2 * torch.sigmoid(torch.tensor(3.0, dtype=torch.float64)) - 1))


def test_signed_layer_refuses_the_log_backend_when_built_and_bad_flags():
    with pytest.raises(ValueError, match=r"cell 'mingru_signed' .* backend 'log' .*'chunked'"):
        minrnn.MinGRU(4, 4, signed=True, backend="log")
    with pytest.raises(ValueError, match=r"cell 'minlstm_signed'"):
        minrnn.MinLSTM(4, 4, signed=True, backend="log")
    minrnn.MinGRU(4, 4, backend="log")  # the unsigned cells still take it
    with pytest.raises(TypeError, match="signed must be True or False"):
        minrnn.MinGRU(4, 4, signed="yes")


def test_language_model_on_a_signed_cell_generates_the_same_with_and_without_cache():
    from minrnn.models import MinRNNConfig, MinRNNForCausalLM

    for cell in ("mingru_signed", "minlstm_signed"):
        torch.manual_seed(0)
        config = MinRNNConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2, cell=cell, initializer_range=0.5,
                              tie_word_embeddings=False, decay_bias=3.0)
        model = MinRNNForCausalLM(config).eval()
        gates = model.model.layers[0].mixer.spec
        assert gates.name == cell and gates.signed
        ids = torch.randint(1, 40, (2, 9))
        with torch.no_grad():
            cached = model.generate(ids, max_new_tokens=8, do_sample=False, use_cache=True)
            plain = model.generate(ids, max_new_tokens=8, do_sample=False, use_cache=False)
        assert torch.equal(cached, plain)
    with pytest.raises(ValueError, match="cell must be one of .*'mingru_signed'"):
        MinRNNConfig(cell="mingru-signed")


def test_signed_baselines_have_the_unsigned_budget():
    from minrnn.experiments.baselines import build_model

    for name in ("mingru", "minlstm"):
        plain = build_model(name, 20, 60_000)
        signed = build_model(f"{name}-signed", 20, 60_000)
        assert signed.baseline.params == plain.baseline.params and signed.baseline.width == plain.baseline.width
        assert signed.model.config.cell == f"{name}_signed"
        # the cell override takes the family's signed variant, nothing else
        assert build_model(name, 20, 60_000, cell=f"{name}_signed").model.config.cell == f"{name}_signed"
        other = "minlstm" if name == "mingru" else "mingru"
        with pytest.raises(ValueError, match="cell must be"):
            build_model(name, 20, 60_000, cell=other)
