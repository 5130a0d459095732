"""minrnn.export: the prefill and step graphs as ONNX, run by onnxruntime alone, give the
PyTorch model's greedy tokens and logits over 200 tokens (1e-4)."""

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("onnxscript")
ort = pytest.importorskip("onnxruntime")

from minrnn.export import export_onnx  # noqa: E402
from minrnn.models import MinRNNConfig, MinRNNForCausalLM  # noqa: E402
from minrnn.models.cache_minrnn import MinRNNCache  # noqa: E402

STEPS = 200


def _torch_decode(model, prompt, steps, forced=None):
    """The eager model from ``prompt``: (tokens (steps,), logits (steps, V) before each), each
    token the argmax of the logits before it, or ``forced``'s when given."""
    cache = MinRNNCache(model.config)
    tokens, logits = [], []
    with torch.no_grad():
        last = model(input_ids=prompt, cache=cache, use_cache=True).logits[:, -1]
        for i in range(steps):
            logits.append(last[0])
            nxt = last.argmax(-1, keepdim=True) if forced is None else forced[:, i:i + 1]
            tokens.append(int(nxt))
            last = model(input_ids=nxt, cache=cache, use_cache=True).logits[:, -1]
    return np.array(tokens), torch.stack(logits).numpy()


def _onnx_decode(sessions, prompt, steps, forced=None):
    """The same through the two ONNX graphs, with onnxruntime alone."""
    prefill, step = sessions
    last, conv, states = prefill.run(None, {"input_ids": prompt})
    tokens, logits = [], []
    for i in range(steps):
        logits.append(last[0])
        nxt = (last.argmax(-1) if forced is None else forced[:, i]).reshape(1, 1).astype(np.int64)
        tokens.append(int(nxt[0, 0]))
        last, conv, states = step.run(None, {"input_ids": nxt, "conv": conv, "states": states})
    return np.array(tokens), np.stack(logits)


def test_onnxruntime_reproduces_decoding(tmp_path):
    torch.manual_seed(0)
    # a wide init: the greedy path visits several tokens before it settles
    model = MinRNNForCausalLM(MinRNNConfig(vocab_size=48, hidden_size=32, num_hidden_layers=2, mlp_mult=2,
                                           initializer_range=1.0)).eval()
    gen = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, 48, (1, 8), generator=gen)
    paths = export_onnx(model, tmp_path, prompt_length=8)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prefill.onnx", "step.onnx"]
    sessions = [ort.InferenceSession(str(paths[k])) for k in ("prefill", "step")]
    want_tokens, want_logits = _torch_decode(model, prompt, STEPS)
    got_tokens, got_logits = _onnx_decode(sessions, prompt.numpy(), STEPS)
    assert len(set(want_tokens.tolist())) > 3
    np.testing.assert_array_equal(got_tokens, want_tokens)
    np.testing.assert_allclose(got_logits, want_logits, atol=1e-4, rtol=1e-4)
    # and along 200 random tokens, where the state never settles
    forced = torch.randint(0, 48, (1, STEPS), generator=gen)
    _, want_logits = _torch_decode(model, prompt, STEPS, forced)
    _, got_logits = _onnx_decode(sessions, prompt.numpy(), STEPS, forced.numpy())
    np.testing.assert_allclose(got_logits, want_logits, atol=1e-4, rtol=1e-4)


def test_export_refuses_a_hybrid_model(tmp_path):
    model = MinRNNForCausalLM(MinRNNConfig(vocab_size=16, hidden_size=16, num_hidden_layers=2, attention_layers=[1]))
    with pytest.raises(ValueError, match="attention"):
        export_onnx(model, tmp_path)

