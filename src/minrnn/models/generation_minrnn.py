"""generate() for the MinRNN language model, through transformers' public generation API.

transformers builds a key/value cache for a model unless it is handed one, and decides which
prompt positions a cache has not read yet in a private prefill step whose rule for recurrent
(linear) caches changed between releases. So the mixin below:

- hands ``generate()`` a fresh ``MinRNNCache`` (unless the caller gave one), as a user would;
- picks, in ``prepare_inputs_for_generation`` (the model hook transformers documents for
  this), the positions the cache has not read, by transformers' documented convention for
  continuing from a cache: the inputs are the whole sequence (cached positions first), or only
  the new tokens with an ``attention_mask`` that covers the cached positions too;
- refuses, in one line, what a recurrent state cannot do: assisted / speculative decoding
  (no rollback), contrastive search (no keys to compare), other cache implementations.
"""

from __future__ import annotations

import copy

import torch
from transformers import GenerationMixin
from transformers.utils.deprecation import deprecate_kwarg

from .cache_minrnn import MinRNNCache


def _setting(name: str, kwargs: dict, given, model_default):
    """A generation setting as generate() resolves it: its keyword, else the GenerationConfig
    passed in, else the model's own."""
    if name in kwargs:
        return kwargs[name]
    for config in (given, model_default):
        value = getattr(config, name, None) if config is not None else None
        if value is not None:
            return value
    return None


def _unset(name: str, kwargs: dict, given):
    """Set a generation setting to None where generate() reads it (the keyword, else a copy of
    the GenerationConfig passed in, since transformers warns on both at once); returns that
    GenerationConfig."""
    if name in kwargs or given is None:
        kwargs[name] = None
        return given
    given = copy.deepcopy(given)
    setattr(given, name, None)
    return given


def _refuse_unsupported(model, kwargs: dict, given) -> None:
    def setting(name):
        return _setting(name, kwargs, given, model.generation_config)

    name = type(model).__name__
    assisted = [key for key in ("assistant_model", "prompt_lookup_num_tokens", "assistant_early_exit", "use_mtp")
                if setting(key) not in (None, False)]
    if assisted:
        raise ValueError(
            f"{name}.generate does not support assisted (speculative) decoding ({', '.join(assisted)} given): "
            "a recurrent state cannot be rolled back to drop rejected draft tokens"
        )
    penalty_alpha, top_k = setting("penalty_alpha"), setting("top_k")
    if penalty_alpha and penalty_alpha > 0 and top_k and top_k > 1 and not setting("do_sample"):
        raise ValueError(f"{name}.generate does not support contrastive search (penalty_alpha={penalty_alpha}): "
                         "it compares attention keys, which a recurrent model does not have")
    impl = setting("cache_implementation")
    if impl not in (None, "dynamic"):
        raise ValueError(
            f"{name}.generate does not support cache_implementation={impl!r}: its cache is a fixed-size recurrent "
            "state (MinRNNCache), already as small as a static cache; leave cache_implementation unset"
        )


def _positions_to_read(cache: MinRNNCache, length: int, attention_mask) -> int:
    """How many of the last input positions the cache has not read: all of the mask's positions
    past the cache's (the mask covers the cached positions too), or without a mask the input's."""
    seen = cache.get_seq_length()
    total = attention_mask.shape[1] if attention_mask is not None else length
    todo = total - seen
    if not 1 <= todo <= length:
        raise ValueError(
            f"the cache has already read {seen} positions, so the input (or its attention_mask) must cover them "
            f"as well as at least one new token: pass the whole sequence, or the new tokens with an attention_mask "
            f"of {seen} + new columns; got {length} input positions"
            + ("" if attention_mask is None else f" and an attention_mask of {total}")
        )
    return todo


def _check_prompt_starts_with_cache(cache: MinRNNCache, ids) -> None:
    """A prompt given whole must hold the tokens the cache has read before the new ones; a
    prompt of only the new tokens (without a mask over the cached positions) would otherwise
    lose its first tokens without a word."""
    seen, recent = cache.get_seq_length(), cache.recent_tokens
    if recent is None or recent.shape[0] != ids.shape[0]:
        return
    k = min(recent.shape[1], seen)
    if not torch.equal(ids[:, seen - k:seen], recent[:, recent.shape[1] - k:].to(ids.device)):
        raise ValueError(
            f"input_ids does not start with the {seen} tokens the cache has read: pass the whole sequence "
            f"(the cached tokens, then the new ones), or only the new tokens with an attention_mask of {seen} + new "
            "columns"
        )


class MinRNNGenerationMixin(GenerationMixin):
    """``generate()`` with a ``MinRNNCache``; see the module docstring."""

    # the same old name for the cache that transformers' own generate() accepts
    @deprecate_kwarg("past_key_values", "6.0.0", new_name="cache")
    def generate(self, inputs=None, generation_config=None, **kwargs):
        """transformers' ``generate()``: greedy search, sampling, beam search, beam sampling and
        their logits processors, stop tokens, ``prefill_chunk_size``, left-padded batches.

        The prompt is read in one parallel pass (the prefill), then one token per step from a
        ``MinRNNCache``, whose size does not grow with the context. To continue from a cache
        that has read part of a sequence (``cache=...``), pass the whole sequence, or only the
        new tokens with an ``attention_mask`` covering all positions, as for any transformers
        model. Assisted decoding, contrastive search and ``cache_implementation`` values other
        than "dynamic" raise a ValueError.
        """
        if kwargs.get("custom_generate") is not None:
            return super().generate(inputs, generation_config, **kwargs)
        _refuse_unsupported(self, kwargs, generation_config)
        cache = kwargs.get("cache")
        if _setting("use_cache", kwargs, generation_config, self.generation_config) is False:
            if cache is not None:
                raise ValueError("generate() got a cache and use_cache=False; drop one of them")
            return super().generate(inputs, generation_config, **kwargs)
        if cache is None:
            cache = kwargs["cache"] = MinRNNCache(self.config)
        elif not isinstance(cache, MinRNNCache):
            raise TypeError(f"cache must be a MinRNNCache (or None), got {type(cache).__name__}; "
                            "a MinRNN model keeps a recurrent state, not keys and values")
        if _setting("cache_implementation", kwargs, generation_config, self.generation_config) is not None:
            # "dynamic": the cache is passed in, so transformers must not also build one
            generation_config = _unset("cache_implementation", kwargs, generation_config)
        chunk = _setting("prefill_chunk_size", kwargs, generation_config, self.generation_config)
        ids, mask = kwargs.get("input_ids", inputs), kwargs.get("attention_mask")
        if chunk and ids is not None:
            self._read_in_chunks(ids, mask, cache, chunk)
            generation_config = _unset("prefill_chunk_size", kwargs, generation_config)
        prompt = ids if ids is not None else kwargs.get("inputs_embeds")
        cache.prompt_positions_to_read = None
        if cache.get_seq_length() > 0 and prompt is not None:
            # decided here: generate() drops an all-ones attention_mask before the prefill
            cache.prompt_positions_to_read = _positions_to_read(cache, prompt.shape[1], mask)
            if ids is not None and (mask is None or mask.shape[1] == ids.shape[1]):
                _check_prompt_starts_with_cache(cache, ids)
        return super().generate(inputs, generation_config, **kwargs)

    @torch.no_grad()  # as generate() itself
    def _read_in_chunks(self, ids, attention_mask, cache: MinRNNCache, chunk: int) -> None:
        """Read the unread prompt positions but the last into ``cache``, ``chunk`` at a time, so
        that generate()'s own prefill has one position left. (transformers' chunked prefill
        feeds a recurrent cache positions it has already read in some releases, and its
        chunks cannot be told from whole sequences without an attention mask.)"""
        todo = _positions_to_read(cache, ids.shape[1], attention_mask)
        new, seen = ids[:, ids.shape[1] - todo:], cache.get_seq_length()
        for start in range(0, todo - 1, chunk):
            stop = min(start + chunk, todo - 1)
            mask = None if attention_mask is None else attention_mask[:, :seen + stop]
            self(input_ids=new[:, start:stop], attention_mask=mask, cache=cache, use_cache=True)

    def prepare_inputs_for_generation(self, input_ids, next_sequence_length=None, cache=None, attention_mask=None,
                                      inputs_embeds=None, is_first_iteration=False, **kwargs):
        if is_first_iteration and isinstance(cache, MinRNNCache) and cache.get_seq_length() > 0:
            given = inputs_embeds if inputs_embeds is not None else input_ids
            next_sequence_length = cache.prompt_positions_to_read
            cache.prompt_positions_to_read = None
            if next_sequence_length is None:
                next_sequence_length = _positions_to_read(cache, given.shape[1], attention_mask)
            # a cache read for B prompts, now B * k rows (beams, num_return_sequences)
            have = cache.batch_size
            if have > 0 and given.shape[0] != have and given.shape[0] % have == 0:
                cache.batch_repeat_interleave(given.shape[0] // have)
        inputs = super().prepare_inputs_for_generation(
            input_ids, next_sequence_length=next_sequence_length, cache=cache, attention_mask=attention_mask,
            inputs_embeds=inputs_embeds, is_first_iteration=is_first_iteration, **kwargs)
        # generate() derives positions from the attention mask; they mark no document starts
        # here (padding already makes a row's state what its prompt gives alone)
        inputs.pop("position_ids", None)
        return inputs


__all__ = ["MinRNNGenerationMixin"]
