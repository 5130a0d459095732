"""torch.compile on the layers (every CPU backend) and on MinRNNForCausalLM: compiled equals
eager (float32, 1e-5; outputs and gradients), with and without fullgraph=True, and
transformers.Trainer with torch_compile=True trains.

Compiling is slow on a small CPU, so most cases compile with the "aot_eager" backend: dynamo
and AOTAutograd trace the whole forward and backward (the custom ops' fake implementations
and registered backwards included) and run the traced graphs without code generation. One
case, the LM's training step with fullgraph=True, goes through inductor, the default.
"""

import pytest
import torch
import torch._inductor.config
from torch._dynamo.testing import CompileCounterWithBackend

import minrnn
from minrnn.ops import BACKENDS, available_backends

transformers = pytest.importorskip("transformers")
from minrnn.models import MinRNNConfig, MinRNNForCausalLM  # noqa: E402

CPU_BACKENDS = [n for n in available_backends() if BACKENDS[n].supports(torch.device("cpu"))]
ATOL = RTOL = 1e-5


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test traces its own model: nothing cached from another test's guards."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _grads(params):
    return [None if p.grad is None else p.grad.clone() for p in params]


def _assert_same(compiled, eager):
    for c, e in zip(compiled, eager, strict=True):
        assert (c is None) == (e is None)
        if c is not None:
            torch.testing.assert_close(c, e, atol=ATOL, rtol=RTOL)


def _compare(module, call, inputs, fullgraph, backend="aot_eager"):
    """call(module, *inputs) -> a scalar loss and the outputs, compiled and eager: the outputs and
    the gradients of the module's parameters and of the inputs that require one agree."""
    counter = CompileCounterWithBackend(backend)
    compiled = torch.compile(module, fullgraph=fullgraph, backend=counter)
    leaves = [*module.parameters(), *(t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad)]
    results = []
    for m in (compiled, module):
        for t in leaves:
            t.grad = None
        loss, outs = call(m, *inputs)
        loss.backward()
        results.append(([loss, *outs], _grads(leaves)))
    (c_out, c_grads), (e_out, e_grads) = results
    _assert_same(c_out, e_out)
    _assert_same(c_grads, e_grads)
    assert counter.frame_count >= 1  # it was traced, not run eagerly behind our back
    return counter


def _layer_call(layer, x, h0):
    y, h_n = layer(x, h0)
    return (y * torch.linspace(-1, 1, y.shape[-1])).sum() + h_n.square().sum(), (y, h_n)


@pytest.mark.parametrize("cls", [minrnn.MinGRU, minrnn.MinLSTM])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_layer_compiles_fullgraph_on_every_backend(backend, cls):
    torch.manual_seed(0)
    layer = cls(6, 8, backend=backend)
    x = torch.randn(2, 7, 6, requires_grad=True)
    h0 = torch.rand(1, 2, 8, requires_grad=True)  # >= 0: the log backend's domain
    _compare(layer, _layer_call, (x, h0), fullgraph=True)


def test_bidirectional_layer_compiles_with_graph_breaks_allowed():
    torch.manual_seed(0)
    layer = minrnn.MinGRU(6, 8, bidirectional=True)
    _compare(layer, _layer_call, (torch.randn(3, 5, 6, requires_grad=True), None), fullgraph=False)


def _lm(**overrides):
    torch.manual_seed(0)
    cfg = dict(vocab_size=32, hidden_size=16, num_hidden_layers=1, mlp_mult=2, cell="mingru")
    return MinRNNForCausalLM(MinRNNConfig(**{**cfg, **overrides})).float()


def _lm_call(model, ids):
    out = model(input_ids=ids, labels=ids, use_cache=False)
    return out.loss, (out.logits,)


def test_lm_training_step_compiles_fullgraph_with_inductor(monkeypatch):
    # compiled in this process: a pool of compile workers costs more to start than it saves here
    monkeypatch.setattr(torch._inductor.config, "compile_threads", 1)
    ids = torch.randint(0, 32, (2, 9), generator=torch.Generator().manual_seed(0))
    counter = _compare(_lm(), _lm_call, (ids,), fullgraph=True, backend="inductor")
    assert counter.frame_count == 1


# position_ids that restart at 0 mark packed documents: the conv, the cells and the attention
# block reset there (the hybrid case, which so covers both claims in one compilation)
PACKED_POSITIONS = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5, 0, 0, 1]])


@pytest.mark.parametrize("overrides,fullgraph,position_ids", [
    (dict(cell="minlstm"), False, None), (dict(num_hidden_layers=2, attention_layers=[1]), True, PACKED_POSITIONS)],
    ids=["minlstm", "hybrid-packed-documents"])
def test_lm_compiles_with_and_without_fullgraph(overrides, fullgraph, position_ids):
    ids = torch.randint(0, 32, (2, 9), generator=torch.Generator().manual_seed(1))

    def call(model, ids):
        out = model(input_ids=ids, labels=ids, position_ids=position_ids, use_cache=False)
        return out.loss, (out.logits,)

    _compare(_lm(**overrides), call, (ids,), fullgraph=fullgraph)


def test_lm_decoding_step_compiles_fullgraph():
    """The cached one-token forward (what generate calls) traced whole: the step kernels give
    way to their torch references under compile."""
    model = _lm().eval()
    ids = torch.randint(0, 32, (2, 6), generator=torch.Generator().manual_seed(2))
    compiled_model = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        logits = []
        for m in (compiled_model, model):  # the cache is updated in place: a fresh prefix for each
            cache = model(input_ids=ids[:, :5], use_cache=True).past_key_values
            logits.append(m(input_ids=ids[:, 5:], cache=cache, use_cache=True).logits)
    compiled, eager = logits
    torch.testing.assert_close(compiled, eager, atol=ATOL, rtol=RTOL)


def test_trainer_with_torch_compile_trains(tmp_path):
    from torch._dynamo.utils import counters

    model = _lm()
    before = [p.detach().clone() for p in model.parameters()]
    gen = torch.Generator().manual_seed(3)
    rows = [{"input_ids": r, "labels": r} for r in torch.randint(0, 32, (8, 12), generator=gen)]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), torch_compile=True, torch_compile_backend="aot_eager", max_steps=4,
        per_device_train_batch_size=4, learning_rate=1e-2, use_cpu=True, report_to=[], save_strategy="no",
        logging_steps=1, disable_tqdm=True)
    counters.clear()
    trainer = transformers.Trainer(model=model, args=args, train_dataset=rows)
    trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert counters["stats"]["unique_graphs"] >= 1  # the model ran compiled
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))


@pytest.mark.parametrize("K", [1, 2, 4])
def test_masked_document_heads_equal_the_reference(K, monkeypatch):
    """The conv's reset path as torch.compile traces it (every position recomputed with masks,
    no data-dependent shapes), run eagerly: equal to documents convolved alone, gradients too."""
    from minrnn.ops.conv import causal_conv
    from minrnn.ops.reference import causal_conv_reference

    gen = torch.Generator().manual_seed(K)
    x = torch.randn(3, 11, 5, generator=gen, requires_grad=True)
    w = torch.randn(5, 1, K, generator=gen, requires_grad=True)
    bias = torch.randn(5, generator=gen, requires_grad=True)
    reset = torch.rand(3, 11, generator=gen) < 0.3
    reset[0, 0] = reset[1, 4:7] = True  # a start at 0; one-token documents back to back
    reset[2] = False  # a row with no start: nothing recomputed
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    y = causal_conv(x, w, bias, reset=reset, backend="sequential")
    monkeypatch.undo()
    want = causal_conv_reference(x, w, bias, reset)
    torch.testing.assert_close(y, want, atol=ATOL, rtol=RTOL)
    weights = torch.randn(y.shape, generator=gen)
    _assert_same(torch.autograd.grad((y * weights).sum(), [x, w, bias]),
                 torch.autograd.grad((want * weights).sum(), [x, w, bias]))


def _packed_resets(B, T, seed):
    reset = torch.rand(B, T, generator=torch.Generator().manual_seed(seed)) < 0.25
    reset[:, 0] = True
    return reset


def test_conv_with_document_resets_compiles_fullgraph():
    """The conv of every backend that has one, with resets, in one module compiled whole."""
    from minrnn.ops.conv import causal_conv

    backends = [b for b in CPU_BACKENDS if BACKENDS[b].implements("conv")]
    assert len(backends) >= 2

    class Convs(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.randn(len(backends), 6, 1, 4))
            self.bias = torch.nn.Parameter(torch.randn(len(backends), 6))

        def forward(self, x, reset):
            return [causal_conv(x, w, b, reset=reset, backend=name)
                    for name, w, b in zip(backends, self.weight, self.bias, strict=True)]

    def call(m, x, reset):
        ys = m(x, reset)
        return sum((y * (i + 1)).sin().sum() for i, y in enumerate(ys)), ys

    torch.manual_seed(0)
    x = torch.randn(2, 13, 6, requires_grad=True)
    _compare(Convs(), call, (x, _packed_resets(2, 13, 0)), fullgraph=True)


def test_layer_with_document_resets_compiles_fullgraph():
    torch.manual_seed(0)
    layer = minrnn.MinGRU(6, 8)
    x = torch.randn(2, 9, 6, requires_grad=True)
    reset = _packed_resets(2, 9, 1)
    _compare(layer, lambda m, x, h0: _layer_call(lambda x, h0: m(x, h0, reset=reset), x, h0), (x, None),
             fullgraph=True)

