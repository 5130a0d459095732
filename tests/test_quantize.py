"""minrnn.quantize.for_decoding: bf16 and int8 weights for generation, the state kept float32."""

import pytest
import torch

pytest.importorskip("transformers")

from minrnn.models import MinRNNCache, MinRNNConfig, MinRNNForCausalLM  # noqa: E402
from minrnn.quantize import DTYPES, for_decoding  # noqa: E402

DynamicLinear = torch.ao.nn.quantized.dynamic.Linear


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return MinRNNForCausalLM(MinRNNConfig(vocab_size=40, hidden_size=64, num_hidden_layers=2)).eval()


def _decode(model, ids, steps=6):
    """Logits (steps, B, V) of a cached step loop over given tokens, and the final cache."""
    cache = MinRNNCache(model.config)
    out = []
    with torch.no_grad():
        model(input_ids=ids[:, :4], cache=cache, use_cache=True)
        for t in range(4, 4 + steps):
            out.append(model(input_ids=ids[:, t:t + 1], cache=cache, use_cache=True).logits[:, -1].float())
    return torch.stack(out), cache


@pytest.mark.parametrize("dtype,tol", [("bf16", 0.1), ("int8", 0.1)])
def test_low_precision_decoding_stays_near_float32(model, dtype, tol):
    ids = torch.randint(0, 40, (2, 10), generator=torch.Generator().manual_seed(1))
    before = [p.detach().clone() for p in model.parameters()]
    converted = for_decoding(model, dtype)
    assert converted is not model and all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    want, _ = _decode(model, ids)
    got, cache = _decode(converted, ids)
    # relative to the logits' spread: rounding the weights moves them a little, not a lot
    err = (got - want).abs().max() / want.std()
    assert 0 < err < tol
    for layer in cache.layers:
        assert layer.recurrent_states[0].dtype == torch.float32  # the state is never rounded
    if dtype == "int8":
        # every projection is quantized, the blocks' own Linear subclasses too
        linears = sum(isinstance(m, torch.nn.Linear) for m in model.modules())
        assert not any(isinstance(m, torch.nn.Linear) for m in converted.modules())
        assert sum(type(m) is DynamicLinear for m in converted.modules()) == linears
    else:
        assert all(p.dtype == torch.bfloat16 for p in converted.parameters())


def test_float32_is_the_model_itself(model):
    assert for_decoding(model, "float32") is model
    assert DTYPES == ("float32", "bf16", "int8")


def test_unknown_dtype_is_refused(model):
    with pytest.raises(ValueError, match="dtype must be one of"):
        for_decoding(model, "int4")


def test_int8_keeps_an_expanded_model_near_float32():
    torch.manual_seed(0)
    model = MinRNNForCausalLM(MinRNNConfig(vocab_size=40, hidden_size=64, num_hidden_layers=2, state_expansion=2,
                                           state_head_dim=16)).eval()
    ids = torch.randint(0, 40, (2, 10), generator=torch.Generator().manual_seed(1))
    converted = for_decoding(model, "int8")
    assert not any(isinstance(m, torch.nn.Linear) for m in converted.modules())
    want, _ = _decode(model, ids)
    got, _ = _decode(converted, ids)
    assert 0 < (got - want).abs().max() / want.std() < 0.1
