"""MinRNNCache: the recurrent state of a MinRNN model between forward calls.

Per block it holds what the next token needs and nothing that grows with the context:

    recurrent state   (B, E)        the minRNN's h after the last token seen
                                    (float32 for half-precision models, as the cells return it);
                      (B, H, n, d)  with state_expansion n > 1: each head's n x d state
    conv state        (B, D, k - 1) the conv's last k - 1 inputs (zeros before the first token);
                                    absent without a conv, empty for k = 1
and, in the attention blocks of a hybrid model (``config.attention_layer_indices``), in place
of the recurrent state:

    keys, values      (B, G, W, hd)  a ring buffer of the last W = attention_window positions'
                                    keys (after RoPE) and values, slot = position index mod W;
                                    with attention_window None it grows (full attention)
    positions, valid  (B, W)        each slot's token position and whether it holds a token

and, for the whole model, the last few token ids read (so that generate() can tell a prompt
given whole from one given without its cached part).

It follows transformers' conventions for linear-attention / state-space caches: each layer is
a `LinearAttentionCacheLayerMixin` (so `Cache.get_conv_state`, `update_conv_state`,
`get_recurrent_state`, `update_recurrent_state`, `reorder_cache` (beam search) and
`is_linear` work as for Mamba), and the container is a `Cache`. A recurrent state cannot be
rolled back, so `crop` and past recording (assisted decoding) raise, and `is_croppable` is False.
"""

from __future__ import annotations

import torch
from torch import Tensor
from transformers.cache_utils import Cache, LinearAttentionCacheLayerMixin

from .attention_minrnn import AttentionWindow

_NO_ROLLBACK = ("MinRNNCache cannot record its past for a rollback: a recurrent state is overwritten at every token, "
                "so a MinRNN model cannot be used for assisted (speculative) decoding")
_NO_CROP = "MinRNNCache cannot be cropped: the recurrent state keeps no per-token history"


class MinRNNCacheLayer(LinearAttentionCacheLayerMixin):
    """One block's state (state index 0 only).

    Args:
        conv_window: how many past conv inputs the block's conv needs (kernel - 1; 0 when the
            block has no conv or a kernel of 1).
    """

    # transformers asks this before it would record states for a rollback (assisted decoding,
    # deferred stopping); this layer keeps no per-token history to roll back to
    is_croppable = False

    def __init__(self, conv_window: int = 0):
        super().__init__(number_of_states=1)
        if not isinstance(conv_window, int) or conv_window < 0:
            raise ValueError(f"conv_window must be an integer >= 0, got {conv_window!r}")
        self.conv_kernel_size[0] = conv_window
        self.seen_tokens = 0

    def __repr__(self):
        return f"{self.__class__.__name__}(conv_window={self.conv_kernel_size[0]}, seen_tokens={self.seen_tokens})"

    def lazy_initialization(self, conv_states: Tensor | None = None, recurrent_states: Tensor | None = None,
                            state_idx: int = 0) -> None:
        for t in (conv_states, recurrent_states):
            if t is not None and self.device is None:
                self.device, self.dtype = t.device, t.dtype
            if t is not None:
                # read by Cache.batch_size (transformers looks for this attribute on each layer)
                self.batch_size = t.shape[0]
        if conv_states is not None:
            B, D = conv_states.shape[:2]
            self.conv_states[state_idx] = conv_states.new_zeros(B, D, self.conv_kernel_size[state_idx])
            self.is_conv_states_initialized[state_idx] = True
        if recurrent_states is not None:
            self.recurrent_states[state_idx] = torch.zeros_like(recurrent_states)
            self.is_recurrent_states_initialized[state_idx] = True

    def update_conv_state(self, conv_states: Tensor, state_idx: int = 0, **kwargs) -> Tensor:
        """Take this call's conv inputs (B, D, T); return (B, D, window + T): the stored window of
        past inputs (zeros before the first token) followed by them. Keep the last window."""
        if not self.is_conv_states_initialized[state_idx]:
            self.lazy_initialization(conv_states=conv_states, state_idx=state_idx)
        past = self.conv_states[state_idx]
        if past.shape[:2] != conv_states.shape[:2]:
            raise ValueError(
                f"the cache holds conv inputs for (batch, channels) = {tuple(past.shape[:2])}, "
                f"but this call has {tuple(conv_states.shape[:2])}; use a fresh cache for a new batch"
            )
        full = torch.cat([past.to(conv_states.dtype), conv_states], dim=-1)
        window = self.conv_kernel_size[state_idx]
        # clone: a slice would keep the whole (B, D, window + T) prefill alive
        self.conv_states[state_idx] = full[..., full.shape[-1] - window:].clone()
        self.has_previous_state[state_idx] = True
        return full

    def update_recurrent_state(self, recurrent_states: Tensor, state_idx: int = 0, num_tokens: int = 0,
                               **kwargs) -> Tensor:
        """Store the state ((B, E), or (B, H, n, d) expanded) after this call; ``num_tokens`` is how
        many positions it consumed."""
        if not self.is_recurrent_states_initialized[state_idx]:
            self.lazy_initialization(recurrent_states=recurrent_states, state_idx=state_idx)
        # clone: the last step of a (B, T, E) scan output is a view that would keep all of it alive
        self.recurrent_states[state_idx] = recurrent_states.clone()
        self.has_previous_state[state_idx] = True
        self.seen_tokens += int(num_tokens)
        return self.recurrent_states[state_idx]

    def step_inputs(self, batch: int, channels: int) -> tuple[Tensor | None, Tensor | AttentionWindow | None]:
        """(conv window (B, D, k - 1), recurrent state) for a step of ``batch`` rows of
        ``channels``, each None before the first position; a one-line error when the cache
        holds another batch."""
        if not self.has_previous_state[0]:
            return None, None
        window, state = self.conv_states[0], self.recurrent_states[0]
        held = state.batch_size if isinstance(state, AttentionWindow) else None if state is None else state.shape[0]
        if held is not None and held != batch:
            raise ValueError(f"the cache holds a state for batch {held}, but the input has batch {batch}; "
                             "use a fresh cache for a new batch")
        if window is not None and tuple(window.shape[:2]) != (batch, channels):
            raise ValueError(f"the cache holds conv inputs for (batch, channels) = {tuple(window.shape[:2])}, "
                             f"but this call has {(batch, channels)}; use a fresh cache for a new batch")
        return window, state

    def store_step(self, conv_window: Tensor | None, recurrent_state: Tensor) -> None:
        """Keep one decoding step's new conv window (None: no conv; the caller made it fresh, so
        no copy) and state, and count the position."""
        if conv_window is not None:
            if not self.is_conv_states_initialized[0]:
                self.lazy_initialization(conv_states=conv_window)
            self.conv_states[0] = conv_window
        self.update_recurrent_state(recurrent_state, num_tokens=1)

    def get_seq_length(self) -> int:
        return self.seen_tokens

    def reset(self) -> None:
        super().reset()
        self.seen_tokens = 0

    def activate_past_recording(self, *args, **kwargs):
        raise RuntimeError(_NO_ROLLBACK)

    def crop(self, tokens_to_remove: int) -> None:
        raise RuntimeError(_NO_CROP)

    def _map_batch(self, fn) -> None:
        for i in range(self.number_of_states):
            if self.is_conv_states_initialized[i]:
                self.conv_states[i] = fn(self.conv_states[i])
                self.batch_size = self.conv_states[i].shape[0]
            if self.is_recurrent_states_initialized[i]:
                self.recurrent_states[i] = fn(self.recurrent_states[i])
                self.batch_size = self.recurrent_states[i].shape[0]

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: Tensor) -> None:
        self._map_batch(lambda t: t[indices, ...])


def _slot_dim(t: Tensor) -> int:
    """The positions' axis: 2 for keys / values (B, G, S, hd), 1 for positions / valid (B, S)."""
    return 2 if t.dim() == 4 else 1


class MinRNNAttentionCacheLayer(MinRNNCacheLayer):
    """An attention block's state: the conv window (as `MinRNNCacheLayer`) and the keys/values
    of the last ``attention_window`` positions in a ring buffer (all of them when it is None).

    ``Cache.get_recurrent_state`` gives the buffer as an ``AttentionWindow``;
    ``update_recurrent_state`` takes one call's new keys/values (an ``AttentionWindow``) and
    writes them into their slots.
    """

    def __init__(self, conv_window: int = 0, attention_window: int | None = None):
        super().__init__(conv_window)
        if attention_window is not None and (not isinstance(attention_window, int) or attention_window < 1):
            raise ValueError(f"attention_window must be None or an integer >= 1, got {attention_window!r}")
        self.attention_window = attention_window

    def __repr__(self):
        return (f"{self.__class__.__name__}(conv_window={self.conv_kernel_size[0]}, "
                f"attention_window={self.attention_window}, seen_tokens={self.seen_tokens})")

    def update_recurrent_state(self, recurrent_states: AttentionWindow, state_idx: int = 0, num_tokens: int = 0,
                               **kwargs) -> AttentionWindow:
        new, past = recurrent_states, self.recurrent_states[state_idx] if self.has_previous_state[state_idx] else None
        if past is None or past.batch_size != new.batch_size:
            self.device, self.dtype, self.batch_size = new.keys.device, new.keys.dtype, new.batch_size
        W, T = self.attention_window, new.keys.shape[2]
        if W is None:
            fields = new[:4] if past is None else [torch.cat([a, b], dim=_slot_dim(a)) for a, b in zip(past[:4], new[:4])]
        else:
            if past is None:
                B, G, _, hd = new.keys.shape
                past = AttentionWindow(new.keys.new_zeros(B, G, W, hd), new.values.new_zeros(B, G, W, hd),
                                       new.positions.new_zeros(B, W), new.valid.new_zeros(B, W), new.next_position)
            # the last min(T, W) positions of this call go to their slots; out of place, so no
            # autograd graph that read the old buffer is disturbed
            n = min(T, W)
            slots = (self.seen_tokens + T - n + torch.arange(n, device=new.keys.device)) % W
            fields = [old.to(fresh.dtype).index_copy(_slot_dim(old), slots, fresh.narrow(_slot_dim(fresh), T - n, n))
                      for old, fresh in zip(past[:4], new[:4])]
        self.recurrent_states[state_idx] = AttentionWindow(*fields, new.next_position)
        self.has_previous_state[state_idx] = True
        self.seen_tokens += int(num_tokens)
        return self.recurrent_states[state_idx]

    def reset(self) -> None:
        super().reset()
        self.recurrent_states = dict.fromkeys(range(self.number_of_states))

    def reorder_cache(self, beam_idx: Tensor) -> None:
        self._map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def _map_batch(self, fn) -> None:
        super()._map_batch(fn)  # the conv window
        for i in range(self.number_of_states):
            if self.recurrent_states[i] is not None:
                self.recurrent_states[i] = AttentionWindow(*(fn(t) for t in self.recurrent_states[i]))
                self.batch_size = self.recurrent_states[i].batch_size

    def offload(self):
        raise NotImplementedError("MinRNNAttentionCacheLayer does not offload its keys and values")

    def prefetch(self):
        raise NotImplementedError("MinRNNAttentionCacheLayer does not offload its keys and values")


class MinRNNCache(Cache):
    """The recurrent cache of a MinRNN model: one `MinRNNCacheLayer` per block.

    Its size is fixed by the config and the batch (B * (E + D * (k - 1)) numbers per minRNN
    block, B * (E n + D * (k - 1)) with state_expansion n and d = n; B * (2 G hd + 2) * W more per attention block with a window W), whatever the number
    of tokens seen; only an attention block without a window grows with the context. ``get_seq_length()`` counts the positions consumed
    (padding included, as an attention mask counts them).

    Args:
        config: a `MinRNNConfig`.
    """

    def __init__(self, config):
        window = config.conv_kernel - 1 if config.use_conv else 0
        attention = set(getattr(config, "attention_layer_indices", ()))
        super().__init__(layers=[
            MinRNNAttentionCacheLayer(window, config.attention_window) if i in attention else MinRNNCacheLayer(window)
            for i in range(config.num_hidden_layers)])
        # set by generate() when it continues from this cache: how many of the prompt's last
        # positions the cache has not read (the rest it has)
        self.prompt_positions_to_read: int | None = None
        # the last token ids read (B, <= RECENT_TOKENS), None after inputs_embeds: lets
        # generate() check that a prompt given whole starts with what the cache has read
        self.recent_tokens: Tensor | None = None

    RECENT_TOKENS = 8

    def to_tensors(self) -> dict[str, Tensor]:
        """The state of every recurrent block as plain tensors, batch first:
        ``{"layers.{i}.state": (B, E) or (B, H, n, d), "layers.{i}.conv": (B, D, k - 1)}`` (a block
        not run yet, or without a conv, has no entry). What carries a model's state from one
        training window to the next (detach them) and into a checkpoint; `from_tensors` reads
        it back. ValueError for a cache with attention blocks (their keys are not a fixed state)."""
        out = {}
        for i, layer in enumerate(self.layers):
            if isinstance(layer, MinRNNAttentionCacheLayer):
                raise ValueError(f"layer {i} is an attention block: its keys and values are not a fixed-size state "
                                 "to carry (to_tensors needs a model of recurrent blocks only)")
            if layer.has_previous_state[0]:
                out[f"layers.{i}.state"] = layer.recurrent_states[0]
                if layer.is_conv_states_initialized[0]:
                    out[f"layers.{i}.conv"] = layer.conv_states[0]
        return out

    @classmethod
    def from_tensors(cls, config, tensors: dict[str, Tensor]) -> MinRNNCache:
        """A cache for ``config`` holding the states of ``tensors`` (as `to_tensors` writes them):
        the next forward continues from them. Positions seen start at 0 again."""
        cache = cls(config)
        known = {f"layers.{i}.{kind}" for i in range(len(cache.layers)) for kind in ("state", "conv")}
        unknown = sorted(set(tensors) - known)
        if unknown:
            raise ValueError(f"from_tensors: unknown entries {unknown[:3]} for a model of {len(cache.layers)} "
                             "layers (expected layers.{i}.state and layers.{i}.conv)")
        for i, layer in enumerate(cache.layers):
            state, conv = tensors.get(f"layers.{i}.state"), tensors.get(f"layers.{i}.conv")
            if state is None:
                continue
            if isinstance(layer, MinRNNAttentionCacheLayer):
                raise ValueError(f"from_tensors: layer {i} is an attention block; it holds no carried state")
            if conv is not None:
                layer.lazy_initialization(conv_states=conv)
                layer.conv_states[0] = conv
            layer.lazy_initialization(recurrent_states=state)
            layer.recurrent_states[0] = state
            layer.has_previous_state[0] = True
        return cache

    def note_tokens(self, input_ids: Tensor | None, length: int) -> None:
        """Record the ids of ``length`` positions just read (None: they came as embeddings)."""
        if length == 0:
            return
        if input_ids is None or (self.recent_tokens is None and self.get_seq_length() > length):
            self.recent_tokens = None
            return
        ids = input_ids if self.recent_tokens is None else torch.cat([self.recent_tokens, input_ids], dim=1)
        self.recent_tokens = ids[:, -self.RECENT_TOKENS:].clone()

    def _map_recent_tokens(self, fn) -> None:
        if self.recent_tokens is not None:
            self.recent_tokens = fn(self.recent_tokens)

    def reorder_cache(self, beam_idx: Tensor):
        super().reorder_cache(beam_idx)
        self._map_recent_tokens(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int):
        super().batch_repeat_interleave(repeats)
        self._map_recent_tokens(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: Tensor):
        super().batch_select_indices(indices)
        self._map_recent_tokens(lambda t: t[indices, ...])

    def reset(self):
        super().reset()
        self.recent_tokens = None

    def get_seq_length(self, layer_idx: int = 0) -> int:
        if layer_idx >= len(self.layers):
            return 0
        return self.layers[layer_idx].seen_tokens

    @property
    def is_compileable(self) -> bool:
        # The decode step branches in Python on the shapes; don't let generate() auto-compile it.
        return False

    def activate_past_recording(self, *args, **kwargs):
        raise RuntimeError(_NO_ROLLBACK)

    def crop(self, tokens_to_remove: int) -> None:
        raise RuntimeError(_NO_CROP)

    def get_mask_sizes(self, query_length: int, layer_idx: int) -> tuple[int, int]:
        raise RuntimeError("MinRNNCache builds no attention masks: its attention layers read the padding mask and positions themselves")


__all__ = ["MinRNNCache", "MinRNNCacheLayer", "MinRNNAttentionCacheLayer"]
