"""Decode suite: language model against language model, tokens per second as the context grows.

    minGRU   minrnn.models.MinRNNForCausalLM (``decode_width`` x ``decode_layers``, the
             config's defaults otherwise): a recurrent state of fixed size
    minLSTM  the same with cell="minlstm" and expansion factor 1.5, which brings its parameters
             to minGRU's (its input projection is 3E wide, minGRU's 2E)
    Llama    transformers' LlamaForCausalLM, same width, depth and vocabulary, ``decode_heads``
             heads, its MLP width chosen so that its parameters match minGRU's; a KV cache
             (DynamicCache) that grows by a token per step
    minGRU-hybrid  minGRU with attention in place of the recurrence in every third block
             (blocks 2, 5, ...): RoPE, ``decode_heads`` heads, a sliding window of
             ``HYBRID_WINDOW`` tokens, whose cache keeps only the window's keys and values
    LSTM     nn.LSTM (2 layers) between a tied embedding and head, its width chosen likewise
    minGRU-bf16, minGRU-int8  the minGRU model with its weights in bfloat16 / int8
             (``minrnn.quantize.for_decoding``, as ``minrnn generate --dtype``), its state float32;
             in float32 runs on the CPU only

Every model is built by ``minrnn.experiments.baselines.build_model``, the factories and the
parameter matching of `minrnn compare`.

For every batch in ``decode_batches`` and context c in ``decode_contexts``, each model reads the
first c - 1 tokens of a random prompt once (its prefill, untimed); every timed run continues
from a copy of that cache, reads the prompt's last token, then decodes ``decode_window``
tokens greedily, two ways:

    generate  ``model.generate(prompt, max_new_tokens=window, do_sample=False)``, each token
              timed from a stopping criterion (called once per token, after the model's step
              and generate's own work on it); the median over the window
    step      a plain loop ``model(next_token, cache) -> logits -> argmax``, each step timed;
              the median over the window (the LSTM has no generate(): this mode only)

and the repeats' medians are reported (their median). ``general`` rows are the minGRU and
minLSTM step loop with ``fast_step(False)``: every block through its general (sequence) path,
the reference the one-token fast path is tested against. ``matmul`` rows time every weight
matrix a minGRU step multiplies (the blocks' four and the head), ``x @ W.T`` on a (batch,
in) input, in the same run: the per-token ceiling of a decoder that did nothing else.
``state_bytes`` is what each model carries between steps at that context (its cache).
"""

from __future__ import annotations

import copy
import gc
import time

import torch
from torch import Tensor, nn

from ..experiments.baselines import build_model, parameter_count
from ..quantize import for_decoding
from .measure import median, synchronize
from .runner import progress
from .settings import Settings

LSTM_LAYERS = 2
HYBRID_WINDOW = 128
GENERAL_PATH_MODELS = ("minGRU", "minLSTM")
#: the weights' dtypes of the minGRU model's low-precision copies (CPU, float32 runs)
LOW_PRECISION = ("bf16", "int8")


def build_models(s: Settings) -> dict[str, nn.Module]:
    """The suite's models, each built by ``minrnn.experiments.baselines.build_model`` (the
    factories and the parameter matching of `minrnn compare`): minGRU, minLSTM and the hybrid
    at the settings' width and depth, Llama (width and depth fixed, its MLP width) and the LSTM
    (its width) matched to minGRU's parameters."""
    V, W, L, heads = s.decode_vocab, s.decode_width, s.decode_layers, s.decode_heads
    torch.manual_seed(s.seed)
    fixed = dict(hidden_size=W, num_hidden_layers=L)
    gru = build_model("mingru", V, None, **fixed)
    lstm_cell = build_model("minlstm", V, None, expansion_factor=1.5, **fixed)
    hybrid = build_model("mingru-hybrid", V, None, num_attention_heads=heads, attention_window=HYBRID_WINDOW, **fixed)
    target = parameter_count(gru)
    llama = build_model("llama", V, target, num_attention_heads=heads,
                        max_length=max(s.decode_contexts) + s.decode_window + 8, **fixed)
    lstm = build_model("lstm", V, target, num_hidden_layers=LSTM_LAYERS)
    # the transformers models without their logits-only wrapper: generate() and the cache are theirs
    models = {"minGRU": gru.model, "minLSTM": lstm_cell.model, "minGRU-hybrid": hybrid.model, "Llama": llama.model,
              "LSTM": lstm}
    return {k: m.to(device=s.device, dtype=s.dtype).eval() for k, m in models.items()}


def low_precision_models(s: Settings, models: dict[str, nn.Module]) -> dict[str, nn.Module]:
    """The minGRU model's copies with weights in each of ``LOW_PRECISION`` (``minrnn generate
    --dtype``), in float32 runs on the CPU; none otherwise."""
    if torch.device(s.device).type != "cpu" or s.dtype != torch.float32:
        return {}
    return {f"minGRU-{dtype}": for_decoding(models["minGRU"], dtype) for dtype in LOW_PRECISION}


def _describe(name: str, model: nn.Module) -> dict:
    if name == "LSTM":
        return {"params": parameter_count(model), "layers": model.rnn.num_layers, "width": model.rnn.hidden_size}
    c = model.config
    info = {"params": parameter_count(model), "layers": c.num_hidden_layers, "width": c.hidden_size}
    if name == "Llama":
        info.update(heads=c.num_attention_heads, mlp_width=c.intermediate_size)
    else:
        info.update(cell=c.cell, rnn_width=c.rnn_hidden_size, mlp_width=c.mlp_hidden_size)
        if c.attention_layer_indices:
            info.update(attention_layers=sorted(c.attention_layer_indices), attention_window=c.attention_window)
    return info


def _state_bytes(state) -> int:
    """Bytes of every tensor reachable in a cache / state (lists, tuples, attributes)."""
    seen, total, todo = set(), 0, [state]
    while todo:
        x = todo.pop()
        if isinstance(x, Tensor):
            if x.data_ptr() not in seen:
                seen.add(x.data_ptr())
                total += x.numel() * x.element_size()
        elif isinstance(x, (list, tuple)):
            todo.extend(x)
        elif isinstance(x, dict):
            todo.extend(x.values())
        elif hasattr(x, "__dict__") and not isinstance(x, nn.Module):
            todo.extend(vars(x).values())
    return total


class _TokenClock:
    """A stopping criterion that never stops and notes when each token was done."""

    def __init__(self, device):
        self.device, self.times = device, []

    def __call__(self, input_ids, scores, **kwargs):
        synchronize(self.device)
        self.times.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def _time_generate(model, prompt: Tensor, cache, window: int, device) -> float:
    """Per-token seconds of generate() continuing from ``cache``, which has read all of
    ``prompt`` but its last token."""
    from transformers import StoppingCriteriaList

    clock = _TokenClock(device)
    model.generate(prompt, attention_mask=torch.ones_like(prompt), cache=cache, max_new_tokens=window + 1,
                   min_new_tokens=window + 1, do_sample=False, stopping_criteria=StoppingCriteriaList([clock]),
                   pad_token_id=0)
    steps = [b - a for a, b in zip(clock.times, clock.times[1:])]  # the first token read the prompt's last
    return median(steps)


def _step_fn(name: str, model):
    """(prefill(prompt) -> (logits, state), step(tokens, state) -> (logits, state))."""
    if name == "LSTM":  # a TorchRNNLM: its modules, carrying nn.LSTM's (h, c)
        def step_lstm(ids, state=None):
            y, state = model.rnn(model.embed(ids), state)
            return model.head(y), state
        return step_lstm, step_lstm
    if name == "Llama":
        from transformers import DynamicCache

        def prefill(ids):
            out = model(input_ids=ids, cache=DynamicCache(config=model.config), use_cache=True)
            return out.logits, out.cache

        def step(tok, cache):
            out = model(input_ids=tok, cache=cache, use_cache=True)
            return out.logits, out.cache
        return prefill, step
    from ..models import MinRNNCache

    def prefill_rnn(ids):
        cache = MinRNNCache(model.config)
        return model(input_ids=ids, cache=cache).logits, cache

    return prefill_rnn, (lambda tok, cache: (model(input_ids=tok, cache=cache).logits, cache))


def _time_steps(step, prompt: Tensor, state, window: int, device) -> tuple[float, int]:
    """Per-token seconds of a loop of ``step`` from ``state``, which has read all of
    ``prompt`` but its last token; and the state's bytes once it has read the whole prompt."""
    logits, state = step(prompt[:, -1:], state)
    nbytes = _state_bytes(state)
    times = []
    for _ in range(window):
        tok = logits[:, -1:].argmax(-1)
        synchronize(device)
        start = time.perf_counter()
        logits, state = step(tok, state)
        synchronize(device)
        times.append(time.perf_counter() - start)
    return median(times), nbytes


def _time_matmuls(model, batch: int, device, dtype, window: int) -> float:
    weights = [p for p in model.parameters() if p.dim() == 2 and p is not model.get_input_embeddings().weight]
    weights.append(model.get_output_embeddings().weight)
    xs = {w.shape[1]: torch.randn(batch, w.shape[1], device=device, dtype=dtype) for w in weights}
    times = []
    for _ in range(window):
        synchronize(device)
        start = time.perf_counter()
        for w in weights:
            xs[w.shape[1]] @ w.T
        synchronize(device)
        times.append(time.perf_counter() - start)
    return median(times)


def run(settings: Settings) -> dict:
    """Run the suite; returns {"models": {...}, "rows": [...]} (see the module docstring)."""
    from ..models.decoding_minrnn import fast_step

    s, dev = settings, settings.device
    if min(s.decode_contexts) < 2:
        raise ValueError(f"decode contexts must be >= 2 tokens (a prompt to prefill and one to read), "
                         f"got {sorted(s.decode_contexts)}")
    models = build_models(s)
    low = low_precision_models(s, models)
    models.update(low)
    window, repeats = s.decode_window, max(1, s.budget.repeats)
    gen = torch.Generator().manual_seed(s.seed)
    rows = []
    enabled = gc.isenabled()
    gc.disable()
    try:
        with torch.inference_mode():
            for B in s.decode_batches:
                for c in sorted(s.decode_contexts):
                    t0 = time.perf_counter()
                    prompt = torch.randint(1, s.decode_vocab, (B, c), generator=gen).to(dev)
                    found: dict[tuple[str, str], list[float]] = {}
                    state_bytes: dict[str, int] = {}
                    # each model reads the prompt once; every timed run continues from a copy
                    prefilled = {}
                    for name, model in models.items():
                        prefill, step = _step_fn(name, model)
                        state = prefill(prompt[:, :-1])[1]
                        prefilled[name] = (step, state)
                    for _ in range(repeats):  # repeats interleaved: each model once per round
                        for name, model in models.items():
                            step, state = prefilled[name]
                            if name != "LSTM":
                                found.setdefault((name, "generate"), []).append(
                                    _time_generate(model, prompt, copy.deepcopy(state), window, dev))
                            sec, state_bytes[name] = _time_steps(step, prompt, copy.deepcopy(state), window, dev)
                            found.setdefault((name, "step"), []).append(sec)
                            if name in GENERAL_PATH_MODELS:
                                with fast_step(False):
                                    sec = _time_steps(step, prompt, copy.deepcopy(state), window, dev)[0]
                                found.setdefault((name, "general"), []).append(sec)
                            gc.collect()
                        found.setdefault(("minGRU", "matmul"), []).append(
                            _time_matmuls(models["minGRU"], B, dev, s.dtype, window))
                    del prefilled
                    for (name, mode), secs in found.items():
                        sec = median(secs)
                        rows.append({"model": name, "mode": mode, "batch": B, "context": c,
                                     "ms_per_token": sec * 1e3, "tokens_per_s": B / sec,
                                     "times_ms": [t * 1e3 for t in secs],
                                     "state_bytes": None if mode == "matmul" else state_bytes[name]})
                    progress(f"decode: batch {B}, context {c}: {time.perf_counter() - t0:.1f} s")
    finally:
        if enabled:
            gc.enable()
    described = {k: _describe(k if k not in low else "minGRU", m if k not in low else models["minGRU"])
                 for k, m in models.items()}  # an int8 copy's weights are packed buffers, not parameters
    for k in low:
        described[k]["weights"] = k.split("-")[1]
    return {"models": described, "batches": list(s.decode_batches),
            "window": window, "repeats": repeats, "rows": rows}
