"""The one-token step (``MinRNNBlock.step``, composed from its modules' steps) against the
block's general path: logits and every cache tensor after each step, every block kind (a
hybrid's attention blocks too), float32/float64, batches with padded rows; generate() gives
the same tokens either way; and the step computes what the model computes under autograd,
dropout, hooks and replaced projections (which it calls as modules)."""

import pytest
import torch

pytest.importorskip("transformers")

from minrnn.models import MinRNNCache  # noqa: E402
from minrnn.models.decoding_minrnn import fast_step  # noqa: E402
from minrnn.models.modeling_minrnn import MinRNNBlock  # noqa: E402
from minrnn.ops import cpu  # noqa: E402

from .conftest import ALL_BLOCKS, random_ids, tiny_lm  # noqa: E402

# float32: the fast step sums the conv, the norm and the residual matmul in another order;
# float64: the model's RMSNorm runs in float32 on both paths, so their float64 results agree
# to float32's precision of the norm.
TOL = {torch.float32: 2e-5, torch.float64: 1e-6}


@pytest.fixture
def count_fast_steps(monkeypatch):
    """For each one-position call of a block with a cache: whether it ran the block's step."""
    taken = []
    step, forward = MinRNNBlock.step, MinRNNBlock.forward

    def counting_step(*args, **kwargs):
        taken[-1] = True
        return step(*args, **kwargs)

    def counting_forward(self, hidden_states, mask=None, cache=None, reset=None):
        if cache is not None and hidden_states.shape[1] == 1:
            taken.append(False)
        return forward(self, hidden_states, mask, cache, reset)

    monkeypatch.setattr(MinRNNBlock, "step", counting_step)
    monkeypatch.setattr(MinRNNBlock, "forward", counting_forward)
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
            states.append([(_copy(layer.recurrent_states[0]),
                            None if layer.conv_states[0] is None else layer.conv_states[0].clone())
                           for layer in cache.layers])
    return logits, states, cache


def _copy(state):
    """A copy of a cached state: a tensor, or an attention block's keys, values, positions, ..."""
    return state.clone() if isinstance(state, torch.Tensor) else tuple(t.clone() for t in state)


def assert_close(got, want, tol):
    if isinstance(want, tuple):  # an attention block's window: every field
        assert isinstance(got, tuple) and len(got) == len(want)
        for a, b in zip(got, want):
            if b.is_floating_point():
                assert_close(a, b, tol)
            else:  # positions, valid: exactly
                assert torch.equal(a, b)
        return
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


# a hybrid: attention in block 1, whose step is the attention's
STEPPED_BLOCKS = {**ALL_BLOCKS, "hybrid-mingru-conv": dict(cell="mingru", attention_layers=[1], num_attention_heads=2)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("block", list(STEPPED_BLOCKS))
def test_fast_step_equals_the_general_path(block, dtype, count_fast_steps):
    model = tiny_lm(dtype=dtype, **STEPPED_BLOCKS[block])
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


def one_step(model, fast, seed=None):
    """Logits of one stepped position after a 4-token prefill (with autograd where enabled)."""
    if seed is not None:
        torch.manual_seed(seed)
    cache = MinRNNCache(model.config)
    with torch.no_grad():
        model(random_ids(2, 4), cache=cache)
    with fast_step(fast):
        return model(random_ids(2, 1, seed=2), cache=cache).logits


def test_autograd_through_the_step_gives_the_general_paths_gradients(count_fast_steps):
    model = tiny_lm()
    grads = []
    for fast in (True, False):
        model.zero_grad()
        logits = one_step(model, fast)  # grad enabled, parameters that want it
        logits.square().sum().backward()
        assert model.model.layers[0].mixer.in_proj.weight.grad is not None
        grads.append((logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    assert count_fast_steps == [True, True, False, False]  # the step's blocks, then the general path's
    (fast_logits, fast_grads), (ref_logits, ref_grads) = grads
    assert_close(fast_logits, ref_logits, TOL[torch.float32])
    assert fast_grads.keys() == ref_grads.keys() and len(fast_grads) == len(list(model.parameters()))
    for name, g in fast_grads.items():
        assert_close(g, ref_grads[name], TOL[torch.float32])


def test_active_dropout_acts_in_the_step_as_in_the_general_path(count_fast_steps):
    """In training mode the step draws the same dropout masks, in the same order, as the
    sequence path; and they act (the logits differ from evaluation mode's)."""
    model = tiny_lm(dropout=0.5).train()
    with torch.no_grad():
        fast, ref = one_step(model, True, seed=5), one_step(model, False, seed=5)
        plain = one_step(model.eval(), True)
    assert count_fast_steps == [True, True, False, False, True, True]
    assert_close(fast, ref, TOL[torch.float32])
    assert not torch.allclose(fast, plain)


@pytest.mark.parametrize("where", ["in_proj", "out_proj", "up_proj", "down_proj"])
def test_a_hooked_projection_is_called_by_the_step(where, count_fast_steps):
    model = tiny_lm()
    block = model.model.layers[0]
    module = {"in_proj": block.mixer.in_proj, "out_proj": block.mixer.out_proj, "up_proj": block.mlp.up_proj,
              "down_proj": block.mlp.down_proj}[where]
    calls = []
    module.register_forward_hook(lambda *args: calls.append(1))
    with torch.no_grad():
        run_one_step(model)
    assert calls == [1, 1]  # the prefill and the step both called it
    assert count_fast_steps == [True, True]  # both blocks stepped


def test_a_norms_forward_hook_sees_the_general_path_only(count_fast_steps):
    """The norms (and the conv) compute a step from their weights in ``step``, not through
    forward, so a forward hook on them sees a decoding step only under fast_step(False)."""
    model = tiny_lm()
    calls = []
    model.model.layers[0].rnn_norm.register_forward_hook(lambda *args: calls.append(1))
    with torch.no_grad():
        run_one_step(model)
        assert calls == [1]
        with fast_step(False):
            run_one_step(model)
    assert calls == [1, 1, 1]
    assert count_fast_steps == [True, True, False, False]


def test_a_replaced_projection_is_called_by_the_step(count_fast_steps):
    """A wrapper around a projection (an adapter) is called by the step, not bypassed."""
    model = tiny_lm()
    block = model.model.layers[1]
    inner = block.mixer.out_proj

    class Doubled(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return 2 * self.inner(x)

    ids = random_ids(2, 6)
    plain, _ = _stepped_and_whole(model, ids)
    block.mixer.out_proj = Doubled()
    stepped, whole = _stepped_and_whole(model, ids)
    assert count_fast_steps == [True] * 24  # 6 positions x 2 blocks, twice
    assert_close(stepped, whole, TOL[torch.float32])
    assert not torch.allclose(stepped, plain)


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
