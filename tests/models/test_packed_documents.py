"""Packed documents (transformers' padding-free convention) give each document what it gets alone:
the recurrence forgets its state at a start, the conv sees no earlier document, attention stays
inside the document; logits and every parameter gradient, every backend, every kind of block."""

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")

from transformers import DataCollatorWithFlattening  # noqa: E402

from minrnn.ops import BACKENDS, available_backends  # noqa: E402

from .conftest import tiny_config  # noqa: E402

CPU_BACKENDS = [b for b in available_backends() if BACKENDS[b].supports(torch.device("cpu"))]
MODELS = {
    "mingru": dict(cell="mingru"),
    "minlstm": dict(cell="minlstm"),
    "mingru-signed": dict(cell="mingru_signed", decay_bias=3.0),
    "hybrid": dict(cell="mingru", num_hidden_layers=3, attention_layers=[1], num_attention_heads=2),
}
CASES = [(m, b) for m in MODELS for b in CPU_BACKENDS if BACKENDS[b].signed or "signed" not in m]
DOC_LENGTHS = (5, 9, 2)


def lm(name: str, backend: str, seed: int = 0):
    from minrnn.models import MinRNNForCausalLM

    torch.manual_seed(seed)
    return MinRNNForCausalLM(tiny_config(scan_backend=backend, conv_kernel=4, **MODELS[name]))


def documents(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 50, (n,), generator=gen) for n in DOC_LENGTHS]


def summed_loss(logits, labels):
    """The next-token cross-entropy summed over the scored positions (-100 skipped)."""
    return F.cross_entropy(logits[0, :-1], labels[0, 1:], ignore_index=-100, reduction="sum")


@pytest.mark.parametrize("name,backend", CASES)
def test_collator_batch_equals_each_document_alone(name, backend):
    model = lm(name, backend)
    docs = documents()
    batch = DataCollatorWithFlattening(return_seq_idx=True, return_flash_attn_kwargs=True)(
        [{"input_ids": d.tolist()} for d in docs])
    out = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"])
    summed_loss(out.logits, batch["labels"]).backward()
    packed_grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad()

    alone, total = [], 0.0
    for d in docs:
        logits = model(input_ids=d[None]).logits
        alone.append(logits)
        total = total + summed_loss(logits, d[None])
    total.backward()
    torch.testing.assert_close(out.logits, torch.cat(alone, 1), rtol=1e-5, atol=1e-5)
    for k, p in model.named_parameters():
        torch.testing.assert_close(packed_grads[k], p.grad, rtol=1e-5, atol=1e-5, msg=f"gradient of {k}")

    # the collator's other two descriptions of the same boundaries mark the same starts
    with torch.no_grad():
        by_seq_idx = model(input_ids=batch["input_ids"], seq_idx=batch["seq_idx"]).logits
        by_offsets = model(**{k: v for k, v in batch.items() if k not in ("labels", "position_ids", "seq_idx")}).logits
    torch.testing.assert_close(by_seq_idx, out.logits, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(by_offsets, out.logits, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", list(MODELS))
def test_a_cache_after_a_packed_call_continues_the_last_document_only(name):
    """The state, the conv window and the attention keys a cache keeps after a packed prompt are
    those of its last document: continuing token by token gives that document's logits alone."""
    model = lm(name, "auto").eval()
    docs = documents(1)
    ids = torch.cat(docs)[None]
    positions = torch.cat([torch.arange(len(d)) for d in docs])[None]
    more = torch.randint(1, 50, (1, 4), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        cache = model(input_ids=ids, position_ids=positions, use_cache=True).cache
        steps = [model(input_ids=more[:, i:i + 1], cache=cache).logits for i in range(more.shape[1])]
        alone = model(input_ids=torch.cat([docs[-1][None], more], 1)).logits[:, len(docs[-1]):]
    torch.testing.assert_close(torch.cat(steps, 1), alone, rtol=1e-5, atol=1e-5)


def test_a_start_in_a_one_token_call_forgets_the_cache():
    model = lm("mingru", "auto").eval()
    docs = documents(2)
    with torch.no_grad():
        cache = model(input_ids=docs[0][None], use_cache=True).cache
        restarted = model(input_ids=docs[1][None, :1], cache=cache, position_ids=torch.zeros(1, 1, dtype=torch.long))
        fresh = model(input_ids=docs[1][None, :1]).logits
    torch.testing.assert_close(restarted.logits, fresh, rtol=1e-6, atol=1e-6)


def test_an_unknown_keyword_argument_is_a_type_error_that_names_it():
    from minrnn.models import MinRNNForSequenceClassification, MinRNNModel

    model = lm("mingru", "auto")
    ids = torch.randint(1, 50, (1, 4))
    with pytest.raises(TypeError, match="unexpected keyword argument 'foo'"):
        model(ids, foo=1)
    with pytest.raises(TypeError, match="unexpected keyword argument 'bar'"):
        MinRNNModel(tiny_config())(ids, bar=2)
    with pytest.raises(TypeError, match="unexpected keyword argument 'baz'"):
        MinRNNForSequenceClassification(tiny_config())(ids, baz=3)


def test_boundaries_of_the_wrong_shape_are_one_line_errors():
    model = lm("mingru", "auto")
    ids = torch.randint(1, 50, (2, 6))
    with pytest.raises(ValueError, match=r"position_ids must be \(batch, length\) = \(2, 6\)"):
        model(ids, position_ids=torch.arange(5)[None])
    with pytest.raises(ValueError, match="cu_seq_lens_q describes one packed row"):
        model(ids, cu_seq_lens_q=torch.tensor([0, 3, 6]))


def test_trainer_trains_with_the_flattening_collator(tmp_path):
    pytest.importorskip("accelerate")
    from transformers import Trainer, TrainingArguments

    from minrnn.models import MinRNNForCausalLM

    seen = []

    class Counting(MinRNNForCausalLM):
        def forward(self, *args, **kwargs):
            seen.append(kwargs.get("position_ids"))
            return super().forward(*args, **kwargs)

    torch.manual_seed(0)
    model = Counting(tiny_config(initializer_range=0.02))
    gen = torch.Generator().manual_seed(0)
    # documents that count up by one from a random start: learnable only within a document
    rows = [((torch.randint(1, 49, (1,), generator=gen) + torch.arange(int(n))) % 49 + 1).tolist()
            for n in torch.randint(8, 24, (64,), generator=gen)]
    data = [{"input_ids": r} for r in rows]
    collate = DataCollatorWithFlattening()
    probe = collate(data[:16])
    with torch.no_grad():
        before = model(**probe).loss.item()
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=30, per_device_train_batch_size=8,
                             learning_rate=3e-2, warmup_steps=0, save_strategy="no", report_to=[], use_cpu=True,
                             dataloader_num_workers=0, seed=0, disable_tqdm=True, remove_unused_columns=False)
    result = Trainer(model=model, args=args, train_dataset=data, data_collator=collate).train()
    assert result.global_step == 30
    assert all(p is not None and p.shape[0] == 1 for p in seen[:30]), "the Trainer passed no position_ids"
    with torch.no_grad():
        after = model(**probe).loss.item()
    assert after < 0.7 * before, (before, after)
