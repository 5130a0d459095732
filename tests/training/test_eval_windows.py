"""Whole-split evaluation (minrnn.training.evaluation): the sliding-window recipe scores every
token once and, with stride == context, gives the windowed evaluation of the same windows; the
stateful pass equals one full-sequence forward; the refusals and the `minrnn eval` options."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")

from minrnn.training import TrainConfig  # noqa: E402
from minrnn.training.evaluation import (  # noqa: E402
    position_buckets,
    position_losses,
    sliding_window_loss,
    stateful_loss,
    stateful_refusal,
    window_offsets,
)
from minrnn.training.loop import evaluate, lm_logits  # noqa: E402

from ..models.conftest import VOCAB, random_ids, tiny_lm  # noqa: E402
from .conftest import TINY, assert_one_line_error, minrnn  # noqa: E402


def full_nll(model, tokens: torch.Tensor, **extras) -> torch.Tensor:
    """Per-target loss (n - 1,) float64 of one forward over the whole split."""
    with torch.no_grad():
        logits = model(input_ids=tokens[None, :-1], **extras).logits[0]
    return F.cross_entropy(logits.double(), tokens[1:], reduction="none")


@pytest.mark.parametrize("n,context,stride", [(101, 16, 16), (101, 16, 5), (100, 16, 7), (10, 16, 4), (17, 16, 1)])
def test_every_target_is_scored_once_with_at_most_context_before_it(n, context, stride):
    offsets, first = window_offsets(n, context, stride)
    length = min(context, n - 1)
    scored = torch.cat([torch.arange(o + f, o + length) for o, f in zip(offsets.tolist(), first.tolist())])
    assert scored.tolist() == list(range(n - 1))  # target t + 1 is predicted at input position t
    assert int(offsets[-1]) + length == n - 1 and (offsets.diff() <= stride).all()
    # every scored position but the first window's has at least context - stride tokens before it
    assert all(f >= length - stride for f in first[1:].tolist())


def test_sliding_windows_equal_the_per_token_losses_with_their_context():
    """Each scored target's loss is the model's loss on exactly its window: compared with one
    forward per target over its own window."""
    model = tiny_lm()
    tokens = random_ids(1, 60, seed=3)[0]
    context, stride = 12, 5
    got = sliding_window_loss(lambda x: lm_logits(model, x), tokens, context, stride, "cpu", batch_size=3)
    offsets, first = window_offsets(len(tokens), context, stride)
    want = []
    for o, f in zip(offsets.tolist(), first.tolist()):
        want += full_nll(model, tokens[o:o + context + 1])[f:].tolist()
    assert got["tokens"] == len(tokens) - 1 == len(want)
    assert got["loss"] == pytest.approx(sum(want) / len(want), rel=1e-6)
    assert got["tokens_per_second"] > 0


def test_stride_equal_to_context_is_the_windowed_evaluation_of_the_same_windows():
    """`loop.evaluate` (what training logs as val_loss, and `minrnn eval` without --context) on
    a split of count * seq_len + 1 tokens with eval_windows = count scores windows seq_len apart:
    exactly the sliding windows with stride == context."""
    model = tiny_lm(seed=1)
    seq_len, count = 16, 6
    tokens = random_ids(1, count * seq_len + 1, seed=4)[0]
    config = TrainConfig.from_file(TINY, {"seq_len": seq_len, "eval_windows": count, "batch_size": 4})
    windowed = evaluate(model, tokens, config, "cpu")
    sliding = sliding_window_loss(lambda x: lm_logits(model, x), tokens, seq_len, seq_len, "cpu", batch_size=4)
    assert sliding["tokens"] == count * seq_len
    assert sliding["loss"] == pytest.approx(windowed, abs=1e-6)
    shorter = sliding_window_loss(lambda x: lm_logits(model, x), tokens, seq_len, 4, "cpu")
    assert shorter["tokens"] == count * seq_len and shorter["loss"] != pytest.approx(windowed, abs=1e-6)


@pytest.mark.parametrize("chunk", [1, 7, 32, 200])
@pytest.mark.parametrize("block", [dict(), dict(cell="minlstm", use_conv=False)])
def test_stateful_pass_equals_one_forward_over_the_split(chunk, block):
    model = tiny_lm(seed=2, **block)
    tokens = random_ids(1, 150, seed=5)[0]
    got = stateful_loss(model, tokens, chunk, "cpu")
    want = full_nll(model, tokens)
    assert got["tokens"] == len(tokens) - 1
    assert got["loss"] == pytest.approx(want.mean().item(), rel=1e-5)


class DocumentTokens:
    """A 1-D tensor of ids with document starts, the interface of a prepared split."""

    def __init__(self, tokens: torch.Tensor, starts: list[int]):
        self.tokens, self.starts = tokens, np.array(starts, dtype=np.int64)

    def __len__(self) -> int:
        return self.tokens.numel()

    def gather(self, offsets, length: int) -> np.ndarray:
        return self.tokens[torch.as_tensor(offsets)[:, None] + torch.arange(length)].numpy()

    def document_starts(self, start: int, stop: int) -> np.ndarray:
        return self.starts[(self.starts >= start) & (self.starts < stop)]


def test_stateful_pass_resets_at_document_starts_only():
    """Packed documents: the chunked pass equals one forward whose position_ids are 0 exactly at
    the document starts, whatever the chunk size (a chunk boundary inside a document keeps the state)."""
    model = tiny_lm(seed=6)
    tokens = random_ids(1, 90, seed=7)[0]
    stream = DocumentTokens(tokens, [0, 23, 24, 61])
    positions = torch.arange(89)
    for s in (23, 24, 61):
        positions[s:] = torch.arange(89 - s)
    want = full_nll(model, tokens, position_ids=positions[None]).mean().item()
    no_reset = full_nll(model, tokens).mean().item()
    assert want != pytest.approx(no_reset, rel=1e-4)
    for chunk in (5, 23, 90):
        got = stateful_loss(model, stream, chunk, "cpu", pack_documents=True)
        assert got["loss"] == pytest.approx(want, rel=1e-5)


def test_stateful_memory_is_one_chunk_and_a_fixed_cache():
    """Memory stays flat: every forward sees at most ``chunk`` tokens, and the cache it hands on
    has the same tensors, of the same sizes, after the first chunk and after the last."""
    model = tiny_lm(seed=8)
    calls, sizes = [], []
    forward = model.forward

    def spy(*args, **kwargs):
        out = forward(*args, **kwargs)
        calls.append(kwargs["input_ids"].shape[1])
        sizes.append(sum(t.numel() for layer in out.cache.layers for t in (*layer.conv_states.values(), *layer.recurrent_states.values())
                         if isinstance(t, torch.Tensor)))
        return out

    model.forward = spy
    stateful_loss(model, random_ids(1, 400, seed=9)[0], 16, "cpu")
    assert max(calls) == 16 and len(calls) == math.ceil(399 / 16)
    assert sizes[0] > 0 and len(set(sizes)) == 1


def test_stateful_is_refused_for_models_without_a_fixed_state():
    from transformers import LlamaConfig, LlamaForCausalLM

    llama = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
    assert "LlamaForCausalLM carries no recurrent state" in stateful_refusal(llama)
    hybrid = tiny_lm(attention_layers=[1], attention_head_dim=8)
    assert "attention layers" in stateful_refusal(hybrid)
    assert stateful_refusal(tiny_lm()) is None
    with pytest.raises(ValueError, match="--stateful needs"):
        stateful_loss(llama, torch.arange(10) % VOCAB, 4, "cpu")


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_stateful_pass_carries_the_state_protocol_of_torch_rnns(cell):
    """The compare harness's nn.LSTM / nn.GRU (state in and out as a dict): read in chunks, the
    same loss as one forward over the split; restarting every chunk instead gives another."""
    from minrnn.experiments.modules import TorchRNNLM

    torch.manual_seed(0)
    model = TorchRNNLM(cell, VOCAB, 16, num_layers=2).double().eval()
    tokens = random_ids(1, 90, seed=4)[0]
    got = stateful_loss(model, tokens, 16, "cpu")
    with torch.no_grad():
        want = F.cross_entropy(model(tokens[None, :-1])[0], tokens[1:]).item()
    assert got["tokens"] == 89 and got["loss"] == pytest.approx(want, rel=1e-5)
    restarted = sliding_window_loss(model, tokens, 16, 16, "cpu")
    assert abs(restarted["loss"] - want) > 1e-3
    with pytest.raises(ValueError, match="TorchRNNLM cannot reset its state at a document start"):
        stateful_loss(model, tokens, 16, "cpu", pack_documents=True)


def test_stateful_pass_through_the_harness_wrapper_of_a_minrnn_model():
    """LogitsOnly (how compare builds minGRU/minLSTM) carries the cache as a state dict: the same
    loss as one forward; wrapping a hybrid or Llama is refused, naming the wrapped model."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from minrnn.experiments.modules import LogitsOnly

    inner = tiny_lm(seed=5, dtype=torch.float64)
    tokens = random_ids(1, 70, seed=6)[0]
    got = stateful_loss(LogitsOnly(inner), tokens, 16, "cpu")
    assert got["loss"] == pytest.approx(full_nll(inner, tokens).mean().item(), rel=1e-5)
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
    assert "LlamaForCausalLM carries no recurrent state" in stateful_refusal(LogitsOnly(llama))
    hybrid = LogitsOnly(tiny_lm(attention_layers=[1], attention_head_dim=8))
    assert "attention layers" in stateful_refusal(hybrid)


def test_position_losses_are_the_mean_loss_at_each_position_of_the_windows():
    from minrnn.data.text import eval_offsets

    model = tiny_lm(seed=10)
    tokens = random_ids(1, 300, seed=11)[0]
    got = position_losses(lambda x: lm_logits(model, x), tokens, 40, 5, "cpu", batch_size=2)
    rows = torch.stack([full_nll(model, tokens[o:o + 41]) for o in eval_offsets(300, 40, 5).tolist()])
    assert got["windows"] == 5 and got["tokens"] == 200
    assert [(b["from"], b["to"]) for b in got["buckets"]] == [(0, 1), (1, 2), (2, 4), (4, 8), (8, 16), (16, 32),
                                                                (32, 40)]
    for b in got["buckets"]:
        assert b["loss"] == pytest.approx(rows[:, b["from"]:b["to"]].mean().item(), rel=1e-6)
    assert got["loss"] == pytest.approx(rows.mean().item(), rel=1e-6)
    assert position_buckets(1) == [(0, 1)] and position_buckets(4) == [(0, 1), (1, 2), (2, 4)]
    with pytest.raises(ValueError, match="a window of 300 needs 301"):
        position_losses(lambda x: lm_logits(model, x), tokens, 300, 5, "cpu")


def test_bad_windows_are_one_line_errors():
    with pytest.raises(ValueError, match=r"stride \(9\) must not exceed context \(8\)"):
        window_offsets(100, 8, 9)
    with pytest.raises(ValueError, match="context and stride must be positive"):
        window_offsets(100, 0, 1)
    with pytest.raises(ValueError, match="at least 2"):
        window_offsets(1, 8, 8)


def test_eval_command_reports_whole_split_and_stateful_figures(trained_run):
    import json

    run, _ = trained_run
    base = json.loads(minrnn("eval", "--run", run).stdout)
    windows = json.loads(minrnn("eval", "--run", run, "--context", 64, "--stride", 32).stdout)
    stateful = json.loads(minrnn("eval", "--run", run, "--stateful", "--context", 256).stdout)
    assert windows["tokens"] == stateful["tokens"] > 5000
    assert windows["context"] == 64 and windows["stride"] == 32 and stateful["stateful"] is True
    for out in (windows, stateful):
        assert out["tokens_per_second"] > 0 and out["perplexity"] == pytest.approx(math.exp(out["loss"]))
        assert out["bits_per_character"] > 0 and abs(out["loss"] - base["loss"]) < 0.5
    r = minrnn("eval", "--run", run, "--stateful", "--stride", 8)
    assert_one_line_error(r, "--stride does not apply to --stateful")
    plot = run.parent / "positions.png"
    by_position = json.loads(minrnn("eval", "--run", run, "--positions", 1024, "--windows", 4, "--plot", plot).stdout)
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert_one_line_error(minrnn("eval", "--run", run, "--plot", plot), "--plot", "--positions")
    assert by_position["windows"] == 4 and by_position["buckets"][-1] == {**by_position["buckets"][-1], "to": 1024}
    assert_one_line_error(minrnn("eval", "--run", run, "--positions", 64, "--stateful"), "--positions", "--stateful")
    assert_one_line_error(minrnn("eval", "--run", run, "--positions", 10 ** 7), "a window of 10000000 needs")
