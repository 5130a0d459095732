"""Hybrid models (minRNN + attention blocks) with a cache: one parallel pass == chunked prefill ==
token-by-token decoding, padded rows == prompts alone, generate() with and without the cache,
and the attention layers' ring buffer (bounded by the window, beam-search reordering)."""

import pytest
import torch

pytest.importorskip("transformers")

from minrnn.models import MinRNNCache  # noqa: E402
from minrnn.models.attention_minrnn import AttentionWindow  # noqa: E402
from minrnn.models.cache_minrnn import MinRNNAttentionCacheLayer, MinRNNCacheLayer  # noqa: E402

from .conftest import random_ids, tiny_lm  # noqa: E402
from .test_generation import NEW, check_greedy_is_full_forward_argmax, generate  # noqa: E402
from .test_hybrid_attention import HYBRIDS  # noqa: E402
from .test_modeling import check_chunked_reads_equal_full_forward, check_padded_rows_equal_prompts_alone, left_pad  # noqa: E402,E501


def hybrid_lm(name, **overrides):
    return tiny_lm(**{"tie_word_embeddings": False, "initializer_range": 0.5, **HYBRIDS[name], **overrides})


@pytest.mark.parametrize("name", list(HYBRIDS))
def test_full_equals_chunked_equals_token_by_token(name):
    check_chunked_reads_equal_full_forward(hybrid_lm(name, initializer_range=0.2))


@pytest.mark.parametrize("name", list(HYBRIDS))
def test_left_padded_batch_rows_equal_prompts_alone(name):
    check_padded_rows_equal_prompts_alone(hybrid_lm(name, initializer_range=0.2), new_tokens=6)


@pytest.mark.parametrize("name", list(HYBRIDS))
def test_greedy_with_and_without_cache_agree(name):
    model = hybrid_lm(name)
    check_greedy_is_full_forward_argmax(model, random_ids(2, 7))


@pytest.mark.parametrize("options", [
    dict(do_sample=True, temperature=0.8),
    dict(do_sample=True, top_p=0.7, temperature=1.3),
    dict(do_sample=False, repetition_penalty=1.5),
    dict(do_sample=False, num_beams=3, no_repeat_ngram_size=1),
    dict(do_sample=True, num_beams=2, top_k=10),
    dict(do_sample=True, num_return_sequences=3),
], ids=["temperature", "top-p", "repetition-penalty", "beam-search", "beam-sample", "return-sequences"])
def test_decoding_options_with_and_without_cache_agree(options):
    model = hybrid_lm("minlstm-window5")  # window 5 < the 15 positions: the ring buffer wraps
    ids = random_ids(2, 5)
    cached = generate(model, ids, True, **options)
    assert torch.equal(cached, generate(model, ids, False, **options))
    assert len(set(cached[:, 5:].flatten().tolist())) >= 4


@pytest.mark.parametrize("name", ["full-mha", "window3-gqa"])
@pytest.mark.parametrize("beams", [1, 3])
def test_left_padded_batch_generates_as_each_prompt_alone(name, beams):
    model = hybrid_lm(name)
    prompts = [random_ids(1, n, seed=n)[0] for n in (8, 3, 5)]
    ids, mask = left_pad(prompts, pad=0)
    with torch.no_grad():
        batch = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, num_beams=beams)
    for i, p in enumerate(prompts):
        alone = generate(model, p[None], True, do_sample=False, num_beams=beams)
        assert torch.equal(batch[i, ids.shape[1]:], alone[0, len(p):]), f"row {i}"
    assert len(set(batch[:, ids.shape[1]:].flatten().tolist())) >= 3


@pytest.mark.parametrize("name", ["full-mha", "window3-gqa"])
def test_chunked_prefill_and_continuing_from_a_cache(name):
    model = hybrid_lm(name)
    ids = random_ids(2, 13)
    ref = generate(model, ids, False, do_sample=False)
    assert torch.equal(generate(model, ids, True, do_sample=False, prefill_chunk_size=4), ref)
    cache = MinRNNCache(model.config)
    with torch.no_grad():
        model(ids[:, :6], cache=cache)
    assert torch.equal(generate(model, ids, True, do_sample=False, num_beams=1, cache=cache), ref)
    assert cache.get_seq_length() == 13 + NEW - 1


def cache_bytes(cache):
    total = 0
    for layer in cache.layers:
        tensors = list(layer.conv_states.values()) + list(layer.recurrent_states.values())
        for t in tensors:
            for part in (t if isinstance(t, AttentionWindow) else (t,)):
                total += 0 if part is None else part.numel() * part.element_size()
    return total


@pytest.mark.parametrize("window", [4, None])
def test_attention_cache_is_bounded_by_the_window(window):
    model = hybrid_lm("full-mha", attention_window=window)
    assert isinstance(MinRNNCache(model.config).layers[1], MinRNNAttentionCacheLayer)
    assert type(MinRNNCache(model.config).layers[0]) is MinRNNCacheLayer
    sizes = {}
    for T in (6, 30, 90):
        cache = MinRNNCache(model.config)
        with torch.no_grad():
            model(random_ids(2, T), cache=cache)
            model(random_ids(2, 1), cache=cache)
        sizes[T] = cache_bytes(cache)
        keys = cache.get_recurrent_state(1).keys
        assert keys.shape[2] == (T + 1 if window is None else window)
    if window is None:
        assert sizes[6] < sizes[30] < sizes[90]
    else:
        assert sizes[6] == sizes[30] == sizes[90]


def test_ring_buffer_holds_the_last_window_positions():
    model = hybrid_lm("window3-gqa")
    cache = MinRNNCache(model.config)
    with torch.no_grad():
        for n in (2, 1, 5, 1):  # 9 positions in chunks
            model(random_ids(1, n, seed=n), cache=cache)
    window = cache.get_recurrent_state(1)
    # slot = position mod 3: positions 6, 7, 8 sit in slots 0, 1, 2
    assert window.positions.tolist() == [[6, 7, 8]] and window.valid.all()
    assert window.next_position.tolist() == [9] and cache.get_seq_length() == 9


def test_batch_operations_reorder_every_part_of_the_attention_cache():
    model = hybrid_lm("window3-gqa")
    cache = MinRNNCache(model.config)
    with torch.no_grad():
        model(random_ids(3, 5), cache=cache)
    before = cache.get_recurrent_state(1)
    cache.reorder_cache(torch.tensor([2, 0, 0]))
    after = cache.get_recurrent_state(1)
    for a, b in zip(after, before):
        assert torch.equal(a, b[[2, 0, 0]])
    cache.batch_select_indices(torch.tensor([1, 2]))
    cache.batch_repeat_interleave(2)
    assert cache.batch_size == 4 and cache.get_recurrent_state(1).keys.shape[0] == 4
    assert torch.equal(cache.get_recurrent_state(1).keys, before.keys[[0, 0, 0, 0]])
    cache.reset()
    assert cache.get_recurrent_state(1) is None and cache.get_seq_length() == 0


def test_attention_cache_refuses_crop_and_another_batch():
    model = hybrid_lm("window3-gqa")
    cache = MinRNNCache(model.config)
    with torch.no_grad():
        model(random_ids(2, 5), cache=cache)
        with pytest.raises(RuntimeError, match="cannot be cropped"):
            cache.crop(1)
        with pytest.raises(RuntimeError, match="cannot be cropped"):
            cache.layers[1].crop(1)
        with pytest.raises(ValueError, match="batch 2, but the input has batch 3") as err:
            model(random_ids(3, 1), cache=cache)
    assert "\n" not in str(err.value)


def test_output_attentions_is_refused_in_one_line():
    model = hybrid_lm("full-mha")
    with pytest.raises(ValueError, match="output_attentions is not supported") as err:
        model(random_ids(1, 3), output_attentions=True)
    assert "\n" not in str(err.value)
