"""Each module of the block owns a one-token ``step`` beside its ``forward``: the step equals
the forward on one position, with random parameters (no norm weight left at 1, no bias at 0,
so that a step reading another module's weights would show), in float64 (the norms compute in
float32 on both sides) and float32 (the CPU step kernels), with padded rows."""

import pytest
import torch

pytest.importorskip("transformers")

from minrnn.models import MinRNNCache  # noqa: E402
from minrnn.models.attention_minrnn import MinRNNAttention  # noqa: E402
from minrnn.models.decoding_minrnn import fast_step  # noqa: E402
from minrnn.models.modules_minrnn import (  # noqa: E402
    MinRNNCausalConv,
    MinRNNMixer,
    MinRNNMLP,
    MinRNNRMSNorm,
)

from .conftest import ALL_BLOCKS, random_ids, tiny_config, tiny_lm  # noqa: E402

TOL = {torch.float32: 2e-5, torch.float64: 1e-6}
DTYPES = [torch.float32, torch.float64]
B, D = 3, 16


def randomised(module, dtype, seed=0):
    """``module`` in ``dtype`` with every parameter drawn afresh, N(0.3, 0.5) (no 1s, no 0s)."""
    gen = torch.Generator().manual_seed(seed)
    module = module.to(dtype)
    with torch.no_grad():
        for i, p in enumerate(module.parameters()):
            p.copy_(0.3 + 0.5 * torch.randn(p.shape, generator=gen, dtype=dtype) * (1 + i % 3))
    return module.eval()


def data(*shape, dtype, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def mask(seed=2):
    m = torch.ones(B, dtype=torch.bool)
    m[seed % B] = False
    return m


def close(got, want, dtype):
    torch.testing.assert_close(got, want, rtol=TOL[dtype], atol=TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_the_norms_step_is_its_forward_on_one_position(dtype):
    norm = randomised(MinRNNRMSNorm(D), dtype)
    x = data(B, D, dtype=dtype)
    with torch.no_grad():
        close(norm.step(x), norm(x.unsqueeze(1))[:, 0], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", [1, 3, 5])
@pytest.mark.parametrize("masked", [False, True])
def test_the_convs_step_is_its_forward_on_the_next_position(dtype, k, masked):
    """From a window of past inputs: the step's output is the forward's last position over the
    past and the new input, and the new window the last k - 1 inputs (a padded row's a zero)."""
    conv = randomised(MinRNNCausalConv(D, k), dtype)
    past = data(B, D, k - 1, dtype=dtype)
    x = data(B, D, dtype=dtype, seed=3)
    keep = mask() if masked else None
    xin = x if keep is None else x * keep.unsqueeze(-1).to(dtype)
    with torch.no_grad():
        y, window = conv.step(x, past, keep)
        close(y, conv(xin.unsqueeze(1), past)[:, 0], dtype)
        close(window, torch.cat([past, xin.unsqueeze(-1)], -1)[..., 1:], dtype)
        # the forward with a past is the forward over the whole sequence, less the past's positions
        seq = data(B, 6, D, dtype=dtype, seed=4)
        whole = conv(torch.cat([past.transpose(1, 2), seq], 1))
        close(conv(seq, past), whole[:, k - 1:] if k > 1 else whole, dtype)
        # fused with the residual and the next norm: the same as the three apart
        norm = randomised(MinRNNRMSNorm(D), dtype, seed=5)
        out, normed, window2 = conv.add_norm_step(x, past, keep, norm)
        close(out, x + y, dtype)
        close(normed, norm.step(x + y), dtype)
        close(window2, window, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cell", ["mingru", "minlstm", "minlstm-raw", "mingru_signed", "minlstm_signed"])
@pytest.mark.parametrize("masked", [False, True])
def test_the_mixers_step_is_its_forward_on_one_position(dtype, cell, masked):
    options = {"cell_options": {"normalize": False}} if cell == "minlstm-raw" else {}
    mixer = randomised(MinRNNMixer(tiny_config(cell=cell.replace("-raw", ""), use_bias=True, **options)), dtype)
    E = mixer.rnn_hidden_size
    x, h = data(B, D, dtype=dtype), data(B, E, dtype=dtype, seed=3)
    keep = mask() if masked else None
    with torch.no_grad():
        y, state = mixer.step(x, h, keep)
        want_y, want_state = mixer(x.unsqueeze(1), h, None if keep is None else keep.unsqueeze(1))
        close(y, want_y[:, 0], dtype)
        close(state, want_state, dtype)
        if keep is not None:  # a padded row keeps its state
            close(state[~keep], h[~keep].to(state.dtype), dtype)
        # and from no state (zeros): the sequence path over one position
        y0, state0 = mixer.step(x, None)
        close(y0, mixer(torch.cat([x.unsqueeze(1)] * 2, 1), None)[0][:, 0], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_the_mlps_step_is_its_forward_on_one_position(dtype):
    mlp = randomised(MinRNNMLP(tiny_config(use_bias=True)), dtype)
    x = data(B, D, dtype=dtype)
    with torch.no_grad():
        close(mlp.step(x), mlp(x.unsqueeze(1))[:, 0], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("window", [None, 3])
def test_the_attentions_step_is_its_forward_on_the_next_position(dtype, window):
    attn = randomised(MinRNNAttention(tiny_config(attention_layers=[0], num_attention_heads=2, num_key_value_heads=1,
                                                  attention_window=window)), dtype)
    seq = data(B, 5, D, dtype=dtype)
    with torch.no_grad():
        whole, _ = attn(seq)
        _, past = attn(seq[:, :4])
        y, new = attn.step(seq[:, 4], past)
        close(y, whole[:, 4], dtype)
        assert new.keys.shape == (B, 1, 1, 8) and torch.equal(new.next_position, torch.full((B,), 5))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block", ["mingru-conv", "minlstm-conv", "mingru-untied-bias", "minlstm-raw-conv1",
                                   "hybrid"])
def test_a_model_with_random_parameters_steps_as_it_reads_a_sequence(dtype, block):
    """Every parameter random (norm weights, conv and gate biases, ...): a step that read one
    module's weights for another's would not give the sequence path's logits."""
    kw = dict(cell="mingru", attention_layers=[1], num_attention_heads=2) if block == "hybrid" else ALL_BLOCKS[block]
    model = randomised(tiny_lm(**kw), dtype)
    with torch.no_grad():  # the model's own norms differ from one another
        norms = [b.rnn_norm.weight for b in model.model.layers] + [b.mlp_norm.weight for b in model.model.layers
                                                                   if b.mlp_norm is not None]
        assert all(not torch.equal(a, b) for i, a in enumerate(norms) for b in norms[i + 1:])
        for p in model.parameters():
            p.mul_(0.3)  # keep the logits moderate: tolerances are relative to their size
    ids = random_ids(2, 10)
    attention_mask = torch.ones_like(ids)
    attention_mask[0, :3] = 0
    with torch.no_grad():
        whole = model(ids, attention_mask=attention_mask).logits
        for fast in (True, False):
            cache = MinRNNCache(model.config)
            with fast_step(fast):
                model(ids[:, :4], attention_mask=attention_mask[:, :4], cache=cache)
                stepped = [model(ids[:, t:t + 1], attention_mask=attention_mask[:, :t + 1], cache=cache).logits
                           for t in range(4, 10)]
            close(torch.cat(stepped, 1), whole[:, 4:], dtype)
