"""The decode suite: its models match in size, decode what their full forward predicts, and a
tiny run writes its rows, JSON and table (timings are never asserted)."""

import io
import json

import pytest
import torch

pytest.importorskip("transformers")

from minrnn.bench import decode  # noqa: E402
from minrnn.bench.settings import Settings  # noqa: E402
from minrnn.bench.suites import run as run_suites  # noqa: E402
from minrnn.experiments.baselines import TorchRNNLM, parameter_count  # noqa: E402


def test_default_models_have_equal_parameters_within_ten_percent():
    models = decode.build_models(Settings.make())
    counts = {name: parameter_count(m) for name, m in models.items()}
    # the models of record, as they were built before the suite took the baselines' factory
    assert counts == {"minGRU": 12_510_336, "minLSTM": 12_511_488, "minGRU-hybrid": 11_917_440,
                      "Llama": 12_510_336, "LSTM": 12_516_288}
    assert isinstance(models["LSTM"], TorchRNNLM) and models["LSTM"].rnn.hidden_size == 876
    assert models["Llama"].config.intermediate_size == 1283
    for n in counts.values():
        assert abs(n / counts["minGRU"] - 1) < 0.10, counts


@pytest.mark.parametrize("name", ["minGRU", "minLSTM", "minGRU-hybrid", "Llama", "LSTM"])
def test_each_models_step_loop_continues_its_prefill(name):
    """The step loop's logits equal the full forward's over the same tokens."""
    s = Settings.make(quick=True)
    model = decode.build_models(s)[name].double()
    prefill, step = decode._step_fn(name, model)
    ids = torch.randint(1, s.decode_vocab, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits, state = prefill(ids[:, :6])
        steps = [logits[:, -1]]
        for t in range(6, 9):
            logits, state = step(ids[:, t:t + 1], state)
            steps.append(logits[:, -1])
        full = model(ids)
        full = full if name == "LSTM" else full.logits
    # float64, but the MinRNN models' RMSNorm runs in float32 on both paths
    tol = 1e-6 if name.startswith("min") else 1e-9
    torch.testing.assert_close(torch.stack(steps, 1), full[:, 5:9], rtol=tol, atol=tol)


def test_state_bytes_counts_every_tensor_once():
    t = torch.zeros(3, 4)
    assert decode._state_bytes([t, (t, {"a": torch.zeros(2, dtype=torch.float64)})]) == 48 + 16


def test_a_tiny_run_writes_rows_json_and_table(tmp_path):
    s = Settings.make(quick=True, out=tmp_path, plots=False, threads=1, decode_batches=[2], decode_contexts=[5])
    printed = io.StringIO()
    written = run_suites(["decode"], s, command="test", stream=printed)
    result = written["decode"]["result"]
    keys = {(r["model"], r["mode"]) for r in result["rows"]}
    assert keys == {("minGRU", "generate"), ("minGRU", "step"), ("minGRU", "general"), ("minLSTM", "generate"),
                    ("minLSTM", "step"), ("minLSTM", "general"), ("minGRU-hybrid", "generate"),
                    ("minGRU-hybrid", "step"), ("Llama", "generate"), ("Llama", "step"), ("LSTM", "step"),
                    ("minGRU", "matmul"), ("minGRU-bf16", "generate"), ("minGRU-bf16", "step"),
                    ("minGRU-int8", "generate"), ("minGRU-int8", "step")}
    # the low-precision copies are described as the float32 minGRU they were made from
    assert result["models"]["minGRU-int8"] == {**result["models"]["minGRU"], "weights": "int8"}
    for r in result["rows"]:
        assert r["batch"] == 2 and r["context"] == 5
        assert r["tokens_per_s"] == pytest.approx(2 / (r["ms_per_token"] / 1e3))
        assert len(r["times_ms"]) == s.budget.repeats
    on_disk = json.loads((tmp_path / "decode.json").read_text())
    assert on_disk["result"]["rows"] == result["rows"]
    table = printed.getvalue()
    assert "### Decoding tokens/s, batch 2" in table and "| minGRU generate" in table
    assert "minGRU step: general path time / fast" in table and "minGRU-hybrid state MiB" in table


def test_the_hybrid_has_attention_blocks_and_its_cache_does_not_grow_with_the_context():
    """Its attention blocks keep a ring buffer of the window's keys/values (allocated whole at
    the first token), so what it carries is the same at half the window and at three times it."""
    s = Settings.make(quick=True)
    model = decode.build_models(s)["minGRU-hybrid"]
    assert model.config.attention_layer_indices and model.config.attention_window == decode.HYBRID_WINDOW
    prefill, step = decode._step_fn("minGRU-hybrid", model)
    sizes = {}
    with torch.no_grad():
        for n in (decode.HYBRID_WINDOW // 2, decode.HYBRID_WINDOW, 3 * decode.HYBRID_WINDOW):
            ids = torch.randint(1, s.decode_vocab, (1, n), generator=torch.Generator().manual_seed(n))
            logits, state = prefill(ids)
            step(logits[:, -1:].argmax(-1), state)
            sizes[n] = decode._state_bytes(state)
    half, full, triple = sizes.values()
    assert half == full == triple, sizes
    llama = decode.build_models(s)["Llama"]
    prefill, step = decode._step_fn("Llama", llama)
    with torch.no_grad():
        logits, state = prefill(ids)
    assert decode._state_bytes(state) > triple  # the KV cache of 3 windows is larger


def test_the_general_path_rows_time_the_same_numbers_by_another_path():
    """fast_step(False) changes the path, not the result: the loop the general rows time gives
    the fast loop's logits."""
    from minrnn.models.decoding_minrnn import fast_step

    s = Settings.make(quick=True)
    model = decode.build_models(s)["minGRU"].double()
    prefill, step = decode._step_fn("minGRU", model)
    ids = torch.randint(1, s.decode_vocab, (2, 8), generator=torch.Generator().manual_seed(1))
    outs = []
    for enabled in (True, False):
        with torch.no_grad(), fast_step(enabled):
            logits, state = prefill(ids[:, :5])
            for t in range(5, 8):
                logits, state = step(ids[:, t:t + 1], state)
            outs.append(logits)
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ["minGRU", "Llama"])
def test_generate_from_the_prefilled_cache_continues_the_prompt(name):
    """The timed generate() runs continue from a cache that read all but the prompt's last
    token: they give the tokens a generate() from scratch gives."""
    s = Settings.make(quick=True)
    model = decode.build_models(s)[name]
    prefill, _ = decode._step_fn(name, model)
    prompt = torch.randint(1, s.decode_vocab, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cache = prefill(prompt[:, :-1])[1]
        kw = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=5, do_sample=False, pad_token_id=0)
        continued = model.generate(prompt, cache=cache, **kw)
        scratch = model.generate(prompt, **kw)
    assert torch.equal(continued, scratch)
