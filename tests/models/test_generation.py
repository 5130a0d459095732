"""generate(): the cache changes nothing but the cost, and a decoding step costs the same
whatever the context length."""

import pytest
import torch

pytest.importorskip("transformers")

from minrnn.models import MinRNNCache  # noqa: E402

from .conftest import BLOCKS, random_ids, tiny_lm  # noqa: E402
from .test_modeling import left_pad  # noqa: E402

NEW = 10


def gen_lm(**overrides):
    """A tiny LM whose greedy continuations vary: with tied embeddings and small weights a random
    model tends to repeat one token, which would make token-equality tests weak."""
    return tiny_lm(**{"tie_word_embeddings": False, "initializer_range": 0.5, **overrides})


def generate(model, ids, use_cache, seed=0, **kw):
    torch.manual_seed(seed)
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=NEW, use_cache=use_cache, **kw)


def check_greedy_is_full_forward_argmax(model, ids) -> None:
    """Greedy generate() with the cache gives what it gives without, on a variant that must pick a
    new token at every step (so the state is tested on varied input), and what argmax over a full
    forward pass picks, token by token."""
    prompt = ids.shape[1]
    cached = generate(model, ids, True, do_sample=False, no_repeat_ngram_size=1)
    assert all(len(set(row.tolist())) == NEW for row in cached[:, prompt:])
    assert torch.equal(cached, generate(model, ids, False, do_sample=False, no_repeat_ngram_size=1))
    cached = generate(model, ids, True, do_sample=False)
    with torch.no_grad():
        seq = ids
        for _ in range(NEW):
            nxt = model(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
    assert torch.equal(cached, seq)


@pytest.mark.parametrize("block", list(BLOCKS), ids=list(BLOCKS))
def test_greedy_with_and_without_cache_agree(block):
    model = gen_lm(**BLOCKS[block])
    ids = random_ids(2, 7)
    cached = generate(model, ids, True, do_sample=False)
    assert cached.shape == (2, 7 + NEW)
    assert torch.equal(cached, generate(model, ids, False, do_sample=False))
    check_greedy_is_full_forward_argmax(model, ids)


@pytest.mark.parametrize("options", [
    dict(do_sample=True, temperature=0.8),
    dict(do_sample=True, top_k=5),
    dict(do_sample=True, top_p=0.7, temperature=1.3),
    dict(do_sample=False, repetition_penalty=1.5),
    dict(do_sample=False, num_beams=3, no_repeat_ngram_size=1),  # varied tokens: the state is exercised
    dict(do_sample=True, num_beams=2, top_k=10),
    dict(do_sample=True, num_return_sequences=3),
], ids=["temperature", "top-k", "top-p", "repetition-penalty", "beam-search", "beam-sample", "return-sequences"])
def test_decoding_options_with_and_without_cache_agree(options):
    """Without the cache every step re-reads the whole sequence in one full forward pass."""
    model = gen_lm(cell="minlstm")
    ids = random_ids(2, 5)
    cached = generate(model, ids, True, **options)
    assert torch.equal(cached, generate(model, ids, False, **options))
    assert len(set(cached[:, 5:].flatten().tolist())) >= 4  # varied tokens, not one repeated


def test_decoding_options_take_effect():
    model = tiny_lm()
    ids = random_ids(1, 4)
    greedy = generate(model, ids, True, do_sample=False)
    sampled = {tuple(generate(model, ids, True, seed=s, do_sample=True, temperature=5.0)[0].tolist())
               for s in range(4)}
    assert len(sampled) > 1
    no_repeat = generate(model, ids, True, do_sample=False, no_repeat_ngram_size=1)[0, 4:]
    assert len(set(no_repeat.tolist())) == NEW
    assert not torch.equal(no_repeat, greedy[0, 4:]) or len(set(greedy[0, 4:].tolist())) == NEW


def test_stop_token_ends_generation():
    model = tiny_lm()
    ids = random_ids(1, 5)
    free = generate(model, ids, True, do_sample=False)
    stop = int(free[0, 5 + 3])  # the 4th generated token
    first = (free[0, 5:] == stop).nonzero()[0].item()
    stopped = generate(model, ids, True, do_sample=False, eos_token_id=stop)
    assert stopped.shape[1] == 5 + first + 1 and stopped[0, -1] == stop
    assert torch.equal(stopped[0], free[0, : 5 + first + 1])


@pytest.mark.parametrize("block", ["mingru-conv", "minlstm-conv"])
def test_left_padded_batch_generates_as_each_prompt_alone(block):
    model = gen_lm(**BLOCKS[block])
    prompts = [random_ids(1, n, seed=n)[0] for n in (8, 3, 5)]
    ids, mask = left_pad(prompts, pad=0)
    with torch.no_grad():
        batch = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False)
    for i, p in enumerate(prompts):
        alone = generate(model, p[None], True, do_sample=False)
        assert torch.equal(batch[i, ids.shape[1]:], alone[0, len(p):]), f"row {i}"
    assert len(set(batch[:, ids.shape[1]:].flatten().tolist())) >= 3  # not one repeated token


def test_chunked_prefill_and_returned_cache():
    model = tiny_lm()
    ids = random_ids(2, 13)
    ref = generate(model, ids, True, do_sample=False)
    assert torch.equal(generate(model, ids, True, do_sample=False, prefill_chunk_size=4), ref)
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=NEW, do_sample=False, return_dict_in_generate=True)
    assert isinstance(out.cache, MinRNNCache)
    assert out.cache.get_seq_length() == 13 + NEW - 1  # the last token is generated, not yet read


def prefilled_cache(model, ids):
    cache = MinRNNCache(model.config)
    with torch.no_grad():
        model(ids, cache=cache)
    return cache


@pytest.mark.parametrize("options", [
    dict(do_sample=False),
    dict(do_sample=False, prefill_chunk_size=2),
    dict(do_sample=False, repetition_penalty=3.0, no_repeat_ngram_size=2),
    dict(do_sample=False, num_beams=3),
    dict(do_sample=True, num_return_sequences=2, top_k=10),
], ids=["greedy", "chunked-prefill", "penalties", "beam-search", "return-sequences"])
def test_generate_continues_from_a_given_cache(options):
    """Read a prefix once, then generate from its cache: with the whole sequence (as for any
    transformers model), or with only the rest and an attention mask covering all of it. Either
    way the result is what generating from the whole prompt without a cache gives."""
    model = gen_lm()
    ids = random_ids(2, 9)
    ref = generate(model, ids, False, **{k: v for k, v in options.items() if k != "prefill_chunk_size"})
    whole = generate(model, ids, True, cache=prefilled_cache(model, ids[:, :6]), **options)
    assert torch.equal(whole, ref)  # the penalties see the cached prompt tokens too
    rest = generate(model, ids[:, 6:], True, cache=prefilled_cache(model, ids[:, :6]),
                    attention_mask=torch.ones(2, 9, dtype=torch.long), **options)
    if "repetition_penalty" not in options:  # (they see only the given tokens here)
        assert torch.equal(rest, ref[:, 6:])
    # the cache went on from the prefix: its count includes it
    cache = prefilled_cache(model, ids[:, :6])
    generate(model, ids, True, cache=cache, **options)
    rows = max(options.get("num_beams", 1), options.get("num_return_sequences", 1)) * 2
    assert cache.get_seq_length() == 9 + NEW - 1 and cache.batch_size == rows


def test_generate_from_a_cache_needs_the_cached_positions_in_the_input():
    model = tiny_lm()
    ids = random_ids(2, 9)
    # only the rest, no mask: 3 positions given, but the cache has read 6 of the sequence
    with pytest.raises(ValueError, match="already read 6 positions") as info:
        generate(model, ids[:, 6:], True, cache=prefilled_cache(model, ids[:, :6]))
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="attention_mask of 5"):
        generate(model, ids[:, 6:], True, cache=prefilled_cache(model, ids[:, :6]),
                 attention_mask=torch.ones(2, 5, dtype=torch.long))
    # only the rest, longer than the cached prefix: it cannot be the whole sequence either
    with pytest.raises(ValueError, match="does not start with the 3 tokens the cache has read") as info:
        generate(model, ids[:, 3:], True, cache=prefilled_cache(model, ids[:, :3]))
    assert "\n" not in str(info.value)
    # after embeddings the cache does not know its tokens, and takes the whole sequence on trust
    cache = MinRNNCache(model.config)
    with torch.no_grad():
        model(inputs_embeds=model.get_input_embeddings()(ids[:, :3]), cache=cache)
    assert cache.recent_tokens is None
    assert torch.equal(generate(model, ids, True, cache=cache, do_sample=False),
                       generate(model, ids, True, do_sample=False))


class ShapeRecorder:
    """Forward hooks on every block's mixer projection: the shapes of what each call fed it."""

    def __init__(self, model):
        self.shapes = []
        self.handles = [b.mixer.in_proj.register_forward_hook(lambda m, i, o: self.shapes.append(tuple(i[0].shape)))
                        for b in model.model.layers]

    def close(self):
        for h in self.handles:
            h.remove()


@pytest.mark.parametrize("use_cache", [True, False])
def test_per_token_work_does_not_grow_with_context(use_cache):
    """With the cache, after the prefill every step feeds each layer one position, whether the
    prompt had 4 tokens or 200. Without it (the control), every step re-reads the whole context."""
    model = tiny_lm()
    L = model.config.num_hidden_layers
    fed = {}
    for T in (4, 200):
        rec = ShapeRecorder(model)
        generate(model, random_ids(2, T), use_cache, do_sample=False)
        rec.close()
        assert len(rec.shapes) == NEW * L  # one prefill + NEW - 1 steps, each through every layer
        assert rec.shapes[:L] == [(2, T, 16)] * L  # the prefill: the whole prompt at once
        fed[T] = rec.shapes[L:]
    if use_cache:  # the blocks' one-token step: one position per row, (B, D)
        assert fed[4] == fed[200] == [(2, 16)] * (NEW - 1) * L
    else:
        assert fed[4] != fed[200]
        assert fed[200][-1] == (2, 200 + NEW - 1, 16)


@pytest.mark.parametrize("options,message", [
    (dict(cache_implementation="static"), "cache_implementation='static'"),
    (dict(assistant_model="draft"), "assisted .*assistant_model given"),
    (dict(prompt_lookup_num_tokens=3), "assisted .*prompt_lookup_num_tokens given"),
    (dict(assistant_early_exit=1), "assisted .*assistant_early_exit given"),
    (dict(penalty_alpha=0.6, top_k=4), "contrastive search"),
    (dict(use_cache=False, cache="prefilled"), "cache and use_cache=False"),
], ids=["static-cache", "assistant-model", "prompt-lookup", "early-exit", "contrastive", "cache-without-use-cache"])
def test_unsupported_generation_modes_raise_one_line(options, message):
    model = tiny_lm()
    ids = random_ids(1, 4)
    if options.get("assistant_model") == "draft":
        options = {**options, "assistant_model": tiny_lm(seed=1)}
    if options.get("cache") == "prefilled":
        options = {**options, "cache": prefilled_cache(model, ids)}
    with pytest.raises(ValueError, match=message) as info:
        model.generate(ids, max_new_tokens=2, **options)
    assert "\n" not in str(info.value)


def test_generation_refuses_other_caches_and_rollbacks():
    model = tiny_lm()
    ids = random_ids(1, 4)
    from transformers import DynamicCache

    with pytest.raises(TypeError, match="MinRNNCache"):
        model.generate(ids, max_new_tokens=2, cache=DynamicCache())
    with pytest.raises(TypeError, match="MinRNNCache"), pytest.warns(FutureWarning, match="past_key_values"):
        model.generate(ids, max_new_tokens=2, past_key_values=DynamicCache())  # the old name, as transformers'
    cache = MinRNNCache(model.config)
    assert not cache.is_croppable  # so transformers never plans a rollback
    for call in (cache.activate_past_recording, lambda: cache.activate_past_recording(recurrent_states_to_keep=2),
                 lambda: cache.crop(-1), cache.layers[0].activate_past_recording, lambda: cache.layers[0].crop(-1)):
        with pytest.raises(RuntimeError, match="rolled back|rollback|cropped"):
            call()


def test_generation_uses_no_private_transformers_hook():
    """generate() is reached through transformers' public methods only (generate,
    prepare_inputs_for_generation), so a release that renames its private helpers cannot
    break it silently."""
    from minrnn.models import MinRNNForCausalLM
    from minrnn.models.generation_minrnn import MinRNNGenerationMixin

    for cls in (MinRNNForCausalLM, MinRNNGenerationMixin):
        overridden = {name for name in vars(cls) if name.startswith("_") and not name.startswith("__")}
        from transformers import GenerationMixin
        assert not overridden & set(vars(GenerationMixin)), overridden & set(vars(GenerationMixin))


def test_generate_from_inputs_embeds():
    model = gen_lm()
    ids = random_ids(2, 6)
    with torch.no_grad():
        from_ids = model.generate(ids, max_new_tokens=NEW, do_sample=False)
        from_embeds = model.generate(inputs_embeds=model.get_input_embeddings()(ids), max_new_tokens=NEW,
                                     do_sample=False)
    assert torch.equal(from_embeds, from_ids[:, 6:])  # with embeddings, only the new tokens come back
