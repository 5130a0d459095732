"""The fast one-token step (minrnn.models.decoding_minrnn) against the block's general path:
logits and every cache tensor after each step, every block kind, float32/float64, batches
with padded rows; generate() gives the same tokens either way; and the step steps aside
whenever its shortcuts would change what the model computes (autograd, dropout, hooks,
replaced modules)."""

import pytest
import torch

pytest.importorskip("transformers")

from minrnn.models import MinRNNCache  # noqa: E402
from minrnn.models.decoding_minrnn import block_step, fast_step  # noqa: E402
from minrnn.ops import cpu  # noqa: E402

from .conftest import ALL_BLOCKS, random_ids, tiny_lm  # noqa: E402

# float32: the fast step sums the conv, the norm and the residual matmul in another order;
# float64: the model's RMSNorm runs in float32 on both paths, so their float64 results agree
# to float32's precision of the norm.
TOL = {torch.float32: 2e-5, torch.float64: 1e-6}


@pytest.fixture
def count_fast_steps(monkeypatch):
    """How many block steps took the fast path."""
    taken = []

    def counting(*args, **kwargs):
        out = block_step(*args, **kwargs)
        taken.append(out is not None)
        return out

    monkeypatch.setattr("minrnn.models.modeling_minrnn.block_step", counting)
    return taken


def step_through(model, ids, mask=None, fast=True):
    """Prefill all but the last 5 positions, then step one token at a time; returns the
    per-step logits and, after each step, a copy of every cache tensor."""
    cache = MinRNNCache(model.config)
    logits, states = [], []
    with torch.no_grad(), fast_step(fast):
        prefix = ids.shape[1] - 5
        model(ids[:, :prefix], attention_mask=None if mask is None else mask[:, :prefix], cache=cache)
        for t in range(prefix, ids.shape[1]):
            out = model(ids[:, t:t + 1], attention_mask=None if mask is None else mask[:, :t + 1], cache=cache)
            logits.append(out.logits)
            states.append([(layer.recurrent_states[0].clone(),
                            None if layer.conv_states[0] is None else layer.conv_states[0].clone())
                           for layer in cache.layers])
    return logits, states, cache


def assert_close(got, want, tol):
    assert got.shape == want.shape and got.dtype == want.dtype
    if want.numel() == 0:
        return
    assert (got - want).abs().max().item() <= tol * max(1.0, want.abs().max().item())


def assert_paths_agree(model, ids, mask=None):
    dtype = model.dtype
    fast_logits, fast_states, fast_cache = step_through(model, ids, mask, fast=True)
    ref_logits, ref_states, ref_cache = step_through(model, ids, mask, fast=False)
    for a, b in zip(fast_logits, ref_logits):
        assert_close(a, b, TOL[dtype])
    for step_a, step_b in zip(fast_states, ref_states):
        for (h_a, w_a), (h_b, w_b) in zip(step_a, step_b):
            assert_close(h_a, h_b, TOL[dtype])
            assert (w_a is None) == (w_b is None)
            if w_a is not None:
                assert_close(w_a, w_b, TOL[dtype])
    assert fast_cache.get_seq_length() == ref_cache.get_seq_length() == ids.shape[1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("block", list(ALL_BLOCKS))
def test_fast_step_equals_the_general_path(block, dtype, count_fast_steps):
    model = tiny_lm(dtype=dtype, **ALL_BLOCKS[block])
    assert_paths_agree(model, random_ids(3, 12))
    n = model.config.num_hidden_layers
    assert count_fast_steps.count(True) == 5 * n  # the fast run: every block of every step
    assert count_fast_steps.count(False) == 5 * n  # the general run: every one declined


@pytest.mark.parametrize("block", ["mingru-conv", "minlstm-conv", "minlstm"])
def test_fast_step_with_padded_rows_equals_the_general_path(block):
    """Left padding and a row padded at the positions being stepped (its state must pass)."""
    model = tiny_lm(hidden_size=13, expansion_factor=1.0, **ALL_BLOCKS[block])  # odd widths
    ids = random_ids(4, 12)
    mask = torch.ones(4, 12, dtype=torch.long)
    mask[0, :4] = 0
    mask[1, :9] = 0
    mask[2, 8:10] = 0  # padding inside the stepped positions
    ids = ids * mask
    assert_paths_agree(model, ids, mask)


@pytest.mark.parametrize("block", ["mingru-conv", "minlstm-conv"])
@pytest.mark.parametrize("mode", ["greedy", "sample", "beam"])
def test_generate_gives_the_same_tokens_either_way(block, mode):
    model = tiny_lm(**ALL_BLOCKS[block])
    ids = random_ids(2, 7)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    kwargs = dict(greedy=dict(do_sample=False), sample=dict(do_sample=True, top_k=10),
                  beam=dict(do_sample=False, num_beams=3))[mode]
    outs = []
    for fast in (True, False):
        torch.manual_seed(0)
        with fast_step(fast):
            outs.append(model.generate(ids * mask, attention_mask=mask, max_new_tokens=12, min_new_tokens=12,
                                       **kwargs))
    assert torch.equal(outs[0], outs[1])


def _stepped_and_whole(model, ids):
    """(logits of ``ids`` read one token at a time from an empty cache, of one forward pass)."""
    with torch.no_grad():
        cache = MinRNNCache(model.config)
        stepped = torch.cat([model(ids[:, t:t + 1], cache=cache).logits for t in range(ids.shape[1])], dim=1)
        return stepped, model(ids).logits


def test_a_one_token_prompt_starts_from_an_empty_cache(count_fast_steps):
    model = tiny_lm()
    ids = random_ids(2, 6)
    stepped, whole = _stepped_and_whole(model, ids)
    assert all(count_fast_steps)
    assert_close(stepped, whole, TOL[torch.float32])


def test_the_step_refuses_a_cache_of_another_batch():
    model = tiny_lm()
    cache = MinRNNCache(model.config)
    with torch.no_grad():
        model(random_ids(2, 4), cache=cache)
        with pytest.raises(ValueError, match="batch 2, but the input has batch 3"):
            model(random_ids(3, 1), cache=cache)


def run_one_step(model):
    cache = MinRNNCache(model.config)
    with torch.no_grad():
        model(random_ids(1, 4), cache=cache)
    return model(random_ids(1, 1), cache=cache)


def test_autograd_takes_the_general_path(count_fast_steps):
    model = tiny_lm()
    out = run_one_step(model)  # grad enabled, parameters that want it
    out.logits.sum().backward()
    assert model.model.layers[0].mixer.in_proj.weight.grad is not None
    assert not any(count_fast_steps)


def test_active_dropout_takes_the_general_path(count_fast_steps):
    model = tiny_lm(dropout=0.5).train()
    with torch.no_grad():
        run_one_step(model)
    assert not any(count_fast_steps)


@pytest.mark.parametrize("where", ["in_proj", "down_proj", "rnn_norm"])
def test_a_hooked_module_takes_the_general_path(where, count_fast_steps):
    model = tiny_lm()
    block = model.model.layers[0]
    module = {"in_proj": block.mixer.in_proj, "down_proj": block.mlp.down_proj, "rnn_norm": block.rnn_norm}[where]
    calls = []
    module.register_forward_hook(lambda *args: calls.append(1))
    with torch.no_grad():
        run_one_step(model)
    assert calls == [1, 1]  # the prefill and the step both called it
    assert count_fast_steps == [False, True]  # block 0 general, block 1 fast


def test_a_replaced_projection_takes_the_general_path(count_fast_steps):
    """A wrapper around a projection (an adapter) must be called, not bypassed."""
    model = tiny_lm()
    block = model.model.layers[1]
    inner = block.mixer.out_proj

    class Doubled(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return 2 * self.inner(x)

    block.mixer.out_proj = Doubled()
    ids = random_ids(2, 6)
    stepped, whole = _stepped_and_whole(model, ids)
    assert count_fast_steps.count(False) == 6
    assert_close(stepped, whole, TOL[torch.float32])


def test_the_state_a_caller_kept_is_not_overwritten():
    model = tiny_lm()
    cache = MinRNNCache(model.config)
    with torch.no_grad():
        model(random_ids(1, 4), cache=cache)
        kept = cache.layers[0].recurrent_states[0]
        window = cache.layers[0].conv_states[0]
        copies = kept.clone(), window.clone()
        model(random_ids(1, 1), cache=cache)
    assert torch.equal(kept, copies[0]) and torch.equal(window, copies[1])
    assert not torch.equal(cache.layers[0].recurrent_states[0], kept)


@pytest.mark.skipif(not cpu.available(), reason="the fused kernels need numba")
def test_the_fused_kernels_run_in_a_float32_step(monkeypatch):
    from minrnn.ops import step as S

    used = []
    kernels = S._kernels

    class Spy:
        def __getattr__(self, name):
            used.append(name)
            return getattr(kernels, name)

    def spied(kernel):
        def call(*args):
            used.append(kernel.__name__)
            return kernel(*args)
        return call

    monkeypatch.setattr(S, "_kernels", Spy())
    monkeypatch.setattr(S, "_STEP_KERNELS", {cell: spied(k) for cell, k in S._STEP_KERNELS.items()})
    run_one_step(tiny_lm(cell="minlstm").requires_grad_(False))
    assert {"conv_norm_step", "norm_step", "minlstm_step"} <= set(used)
