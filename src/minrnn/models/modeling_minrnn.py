"""The minGRU / minLSTM language model as transformers 5 models.

    MinRNNModel                       embeddings -> blocks -> final RMSNorm
    MinRNNForCausalLM                 + LM head (tied or not); generate() with a recurrent cache
    MinRNNForSequenceClassification   + a linear head on the last real token

One block (Feng et al. 2024, the block of the paper's official code):

    x = x + Dropout(CausalDepthwiseConv(x))                 if use_conv
    x = x + Dropout(Out(minRNN(In(RMSNorm(x)))))             In: D -> n E (the cell's n pre-activations)
    x = x + Dropout(W2 act(W1 RMSNorm(x)))                  if use_mlp

The modules are those of ``modules_minrnn`` (each with a forward and a one-token step) and, in
a hybrid's attention blocks, ``attention_minrnn.MinRNNAttention`` in place of the minRNN mixer.

Every position's output depends on positions <= t only, so the model can run a whole prompt
in parallel (one scan), continue from a cache in chunks of any length, or decode one token
at a time with a fixed amount of work per token; all three give the same numbers.

Padding: an attention mask marks real tokens (1) and padding (0). A padded position is the
identity of the recurrence (a = 1, b = 0, so the state passes through unchanged) and a zero
input to the conv, so left- or right-padded rows give what their prompts give alone.

Packed documents (transformers' padding-free convention, e.g. ``DataCollatorWithFlattening``):
a document starts where ``position_ids`` is 0, where ``seq_idx`` changes, or at the offsets of
``cu_seq_lens_q``. There the recurrence forgets its state (a = 0), the conv sees no input of
the previous document and an attention block attends within the document only, so each
document's logits are those it gets alone.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import (
    BaseModelOutputWithPast,
    CausalLMOutputWithPast,
    SequenceClassifierOutputWithPast,
)
from transformers.utils import can_return_tuple
from transformers.utils.deprecation import deprecate_kwarg

from .attention_minrnn import MinRNNAttention
from .cache_minrnn import MinRNNCache
from .configuration_minrnn import MinRNNConfig
from .decoding_minrnn import steps_enabled
from .generation_minrnn import MinRNNGenerationMixin
from .loading_minrnn import check_loaded_weights, report_only_if_accepted
from .modules_minrnn import (
    MinRNNCausalConv,
    MinRNNExpandedMixer,
    MinRNNGateProj,
    MinRNNMixer,
    MinRNNMLP,
    MinRNNResidualOut,
    MinRNNRMSNorm,
)

# transformers 5 calls the cache `cache`; these older names are accepted with a warning.
_CACHE_ALIASES = ("past_key_values", "cache_params")
_ALIAS_VERSION = "5.40.0"


def _accept_cache_aliases(fn):
    for old in _CACHE_ALIASES:
        fn = deprecate_kwarg(old, _ALIAS_VERSION, new_name="cache")(fn)
    return fn


# what transformers' tools pass to every model and this one has no use for: accepted, ignored
_IGNORED_KWARGS = frozenset({"cache_position", "return_dict", "output_attentions", "token_type_ids"})
# the causal LM also hands these to its loss (transformers' ForCausalLMLoss)
_LOSS_KWARGS = frozenset({"num_items_in_batch", "ignore_index", "shift_labels"})
# flash attention's view of packed documents beside cu_seq_lens_q: nothing more for this model
_FLASH_KWARGS = frozenset({"cu_seq_lens_k", "max_length_q", "max_length_k"})


def _check_kwargs(kwargs: dict, allowed: frozenset, where: str) -> None:
    unknown = sorted(set(kwargs) - allowed)
    if unknown:
        raise TypeError(f"{where}() got an unexpected keyword argument {unknown[0]!r}")


def document_starts(position_ids: Tensor | None, seq_idx: Tensor | None, cu_seq_lens: Tensor | None,
                    batch: int, length: int, device: torch.device) -> Tensor | None:
    """(B, T) bool, True at each packed document's first token, or None when nothing marks one.

    position_ids (B, T): a document starts where it is 0. seq_idx (B, T): where it differs
    from the position before. cu_seq_lens (n + 1,): the offsets of n documents in the one row
    of a batch of 1. Several given: a start marked by any of them.
    """
    starts = None
    for name, ids in (("position_ids", position_ids), ("seq_idx", seq_idx)):
        if ids is None:
            continue
        if not isinstance(ids, Tensor) or ids.dim() != 2 or ids.shape[1] != length or ids.shape[0] not in (1, batch):
            shape = tuple(ids.shape) if isinstance(ids, Tensor) else type(ids).__name__
            raise ValueError(f"{name} must be (batch, length) = ({batch}, {length}), got {shape}")
        ids = ids.to(device).expand(batch, length)
        if name == "position_ids":
            marked = ids == 0
        else:
            marked = torch.cat([torch.zeros_like(ids[:, :1], dtype=torch.bool), ids[:, 1:] != ids[:, :-1]], 1)
        starts = marked if starts is None else starts | marked
    if cu_seq_lens is not None:
        if batch != 1:
            raise ValueError(f"cu_seq_lens_q describes one packed row, but the input has batch {batch}")
        offsets = torch.as_tensor(cu_seq_lens, device=device).long().flatten()
        marked = torch.zeros(1, length, dtype=torch.bool, device=device)
        marked[0, offsets[offsets < length]] = True
        starts = marked if starts is None else starts | marked
    return starts


class MinRNNBlock(GradientCheckpointingLayer):
    """[x + Conv(x)] -> x + Mixer(Norm(x)) -> [x + MLP(Norm(x))]; see the module docstring.

    ``forward`` runs any number of positions (continuing from a cache when given); one position
    with a cache runs ``step``, the block composed from its modules' one-token steps (unless
    ``decoding_minrnn.fast_step(False)``). The two compute the same numbers.
    """

    def __init__(self, config: MinRNNConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        D = config.hidden_size
        self.conv = MinRNNCausalConv(D, config.conv_kernel) if config.use_conv else None
        self.rnn_norm = MinRNNRMSNorm(D, config.rms_norm_eps)
        # a hybrid's attention blocks: attention in place of the recurrence, all else the same
        self.mixer = (MinRNNAttention(config) if layer_idx in config.attention_layer_indices
                      else MinRNNExpandedMixer(config) if config.state_expansion > 1 else MinRNNMixer(config))
        if config.use_mlp:
            self.mlp_norm = MinRNNRMSNorm(D, config.rms_norm_eps)
            self.mlp = MinRNNMLP(config)
        else:
            self.mlp_norm = self.mlp = None
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, hidden_states: Tensor, mask: Tensor | None = None, cache: MinRNNCache | None = None,
                reset: Tensor | None = None) -> Tensor:
        """hidden_states (B, T, D), mask (B, T) bool or None, reset (B, T) bool or None (True at
        a document's first token); reads and updates ``cache``."""
        if cache is not None and hidden_states.shape[1] == 1 and reset is None and steps_enabled():
            return self.step(hidden_states, mask, cache)
        h0 = None if cache is None else cache.get_recurrent_state(self.layer_idx)
        if isinstance(h0, Tensor) and h0.shape[0] != hidden_states.shape[0]:
            raise ValueError(f"the cache holds a state for batch {h0.shape[0]}, but the input has batch "
                             f"{hidden_states.shape[0]}; use a fresh cache for a new batch")
        if self.conv is not None:
            x = hidden_states if mask is None else hidden_states * mask.unsqueeze(-1).to(hidden_states.dtype)
            past = None
            if cache is not None:
                past = cache.get_conv_state(self.layer_idx)
                cache.update_conv_state(_after_last_start(x, past, reset).transpose(1, 2), self.layer_idx)
            hidden_states = hidden_states + self.dropout(self.conv(x, past, reset))
        y, h_last = self.mixer(self.rnn_norm(hidden_states), h0, mask, reset)
        if cache is not None:
            cache.update_recurrent_state(h_last, self.layer_idx, num_tokens=hidden_states.shape[1])
        hidden_states = hidden_states + self.dropout(y)
        if self.mlp is not None:
            hidden_states = hidden_states + self.dropout(self.mlp(self.mlp_norm(hidden_states)))
        return hidden_states

    def step(self, hidden_states: Tensor, mask: Tensor | None, cache: MinRNNCache) -> Tensor:
        """One position from ``cache``: hidden_states (B, 1, D), mask (B, 1) bool or None ->
        (B, 1, D); the cache's window and state for this block replaced by new tensors."""
        layer = cache.layers[self.layer_idx]
        x = hidden_states[:, 0]
        keep = None if mask is None else mask[:, 0]
        window, state = layer.step_inputs(*x.shape)
        # dropout only where it acts: its module call would cost more than the adds around it
        drop = self.dropout if self.training and self.dropout.p > 0 else None
        conv = self.conv
        if conv is None:
            normed = self.rnn_norm.step(x)
        else:
            window = conv.new_window(x) if window is None else window
            if drop is None:
                x, normed, window = conv.add_norm_step(x, window, keep, self.rnn_norm)
            else:  # dropout between the conv and the residual
                y, window = conv.step(x, window, keep)
                x = x + drop(y)
                normed = self.rnn_norm.step(x)
        # without dropout the residual goes into the output projections' matmuls
        if drop is None:
            x, state = self.mixer.step(normed, state, keep, residual=x)
        else:
            y, state = self.mixer.step(normed, state, keep)
            x = x + drop(y)
        mlp = self.mlp
        if mlp is not None:
            normed = self.mlp_norm.step(x)
            x = mlp.step(normed, residual=x) if drop is None else x + drop(mlp.step(normed))
        layer.store_step(None if conv is None else window, state)
        return x.unsqueeze(1)


def _after_last_start(x: Tensor, past: Tensor | None, reset: Tensor | None) -> Tensor:
    """What the cache's conv window is cut from (it keeps the last k - 1 inputs): x (B, T, D)
    itself, or, after a document start, the row's inputs from its last start on, preceded by
    zeros in place of the ``past`` window (B, D, k - 1), so a later call sees no earlier document."""
    if reset is None:
        return x
    t = torch.arange(x.shape[1], device=x.device)
    last = torch.where(reset, t, -1).amax(1, keepdim=True)  # (B, 1): -1 where the row has no start
    kept = x * (t >= last).unsqueeze(-1).to(x.dtype)
    if past is None or past.shape[-1] == 0:
        return kept
    old = past.transpose(1, 2).to(x.dtype) * (last < 0).unsqueeze(-1).to(x.dtype)
    return torch.cat([old, kept], 1)


class MinRNNPreTrainedModel(PreTrainedModel):
    """Weights init (``_init_weights``), applied by ``post_init`` to whatever was not loaded:

    - embeddings and every Linear / conv weight: N(0, initializer_range); biases 0;
    - the two projections that write into the residual stream (the mixer's ``out_proj`` and the
      MLP's ``down_proj``): N(0, initializer_range / sqrt(2 * num_hidden_layers)), GPT-2's
      scaling, so the residual stream's variance does not grow with depth at init;
    - the cell's decay bias (``config.decay_bias``, else the cell's default) on the bias of its
      decay pre-activation with the cell's sign: minLSTM's forget gate +3 by default, so the cell
      starts by remembering; minGRU's gate -0 by default (the paper's init);
    - RMSNorm weights 1.
    """

    config_class = MinRNNConfig
    config: MinRNNConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _no_split_modules = ["MinRNNBlock"]
    # a recurrent state cannot be rolled back (older transformers read this to refuse assisted decoding)
    _is_stateful = True
    # task heads that a checkpoint of another task may lack (created fresh) or hold (dropped)
    _new_head_modules: tuple[str, ...] = ()

    @classmethod
    def from_pretrained(cls, *args, output_loading_info: bool = False, **kwargs):
        """transformers' ``from_pretrained``, but weights that do not fit the config (a layer
        missing or left over, ``tie_word_embeddings`` changed) raise a one-line ValueError
        instead of leaving random or dropped weights; a task head new to the checkpoint (e.g.
        the classifier's ``score`` on a language model's weights) is still created fresh."""
        with report_only_if_accepted():
            model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
            check_loaded_weights(model, info, source=args[0] if args else kwargs.get("pretrained_model_name_or_path"))
        return (model, info) if output_loading_info else model

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)  # normal(std) weights, zero biases, unit norms
        std = self.config.initializer_range
        if isinstance(module, MinRNNResidualOut):
            init.normal_(module.weight, mean=0.0, std=std / math.sqrt(2 * self.config.num_hidden_layers))
        elif isinstance(module, MinRNNGateProj):
            # one copy of the whole bias: a slice would lose the "already loaded" flag
            start, stop = module.decay_range()
            bias = torch.zeros_like(module.bias)
            bias[start:stop] = module.decay_bias_sign * module.decay_bias
            init.copy_(module.bias, bias)
        elif isinstance(module, MinRNNCausalConv):  # as nn.Conv1d's in the base rule
            init.normal_(module.weight, mean=0.0, std=std)
            init.zeros_(module.bias)


def _check_cache(cache, config: MinRNNConfig) -> None:
    if cache is None:
        return
    if not isinstance(cache, MinRNNCache):
        raise TypeError(f"cache must be a MinRNNCache (or None), got {type(cache).__name__}; "
                        "a MinRNN model keeps a recurrent state, not keys and values")
    if len(cache.layers) != config.num_hidden_layers:
        raise ValueError(f"cache has {len(cache.layers)} layers but the model has {config.num_hidden_layers}")


def _positions_mask(attention_mask: Tensor | None, batch: int, length: int) -> Tensor | None:
    """The (B, T) bool mask of this call's positions: the last T columns of ``attention_mask``
    (which may also cover positions already in the cache, as generate() passes it)."""
    if attention_mask is None:
        return None
    if not isinstance(attention_mask, Tensor) or attention_mask.dim() != 2:
        raise ValueError("attention_mask must be a 2D (batch, length) tensor of 1 (token) and 0 (padding), got "
                         f"{tuple(attention_mask.shape) if isinstance(attention_mask, Tensor) else type(attention_mask).__name__}")
    if attention_mask.shape[0] != batch or attention_mask.shape[1] < length:
        raise ValueError(f"attention_mask must be (batch, length >= {length}) with batch {batch}, "
                         f"got {tuple(attention_mask.shape)}")
    return attention_mask[:, attention_mask.shape[1] - length:] != 0


class MinRNNModel(MinRNNPreTrainedModel):
    """Embeddings -> ``num_hidden_layers`` blocks -> final RMSNorm. See ``forward``."""

    def __init__(self, config: MinRNNConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(MinRNNBlock(config, i) for i in range(config.num_hidden_layers))
        self.norm = MinRNNRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.dropout = nn.Dropout(config.dropout)
        self.gradient_checkpointing = False
        self.post_init()

    @_accept_cache_aliases
    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: Tensor | None = None,
        inputs_embeds: Tensor | None = None,
        cache: MinRNNCache | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        position_ids: Tensor | None = None,
        seq_idx: Tensor | None = None,
        cu_seq_lens_q: Tensor | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        """Run the blocks over new positions, continuing from ``cache`` when one is given.

        Args:
            input_ids: (B, T) token ids, or
            inputs_embeds: (B, T, D) instead of them.
            attention_mask: (B, L) with L >= T, 1 for tokens and 0 for padding; its last T
                columns are this call's positions (earlier ones may describe the cache's past).
            cache: a MinRNNCache to continue from; it is updated in place.
            use_cache: create a cache when none is given and return it (default:
                ``config.use_cache`` in eval mode, False in training mode).
            output_hidden_states: also return the embeddings and every block's output.
            position_ids: (B, T) positions of packed documents, 0 at each document's first
                token (transformers' padding-free convention): the state is reset there.
            seq_idx: (B, T) the document each token belongs to; a change starts a document.
            cu_seq_lens_q: (n + 1,) offsets of n documents packed in a batch of one row;
                ``cu_seq_lens_k``, ``max_length_q`` and ``max_length_k`` (flash attention's) are
                accepted and add nothing.
        Returns:
            BaseModelOutputWithPast: last_hidden_state (B, T, D) after the final norm, cache,
            hidden_states (embeddings, block 1, ..., block L) when asked.

        An unknown keyword argument is a TypeError.
        """
        _check_kwargs(kwargs, _IGNORED_KWARGS | _FLASH_KWARGS, "MinRNNModel.forward")
        if kwargs.get("output_attentions"):
            raise ValueError("output_attentions is not supported: MinRNN models return no attention weights")
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids (B, T) and inputs_embeds (B, T, D)")
        if inputs_embeds is None:
            if input_ids.dim() != 2:
                raise ValueError(f"input_ids must be (batch, time), got shape {tuple(input_ids.shape)}")
            inputs_embeds = self.embed_tokens(input_ids)
        elif inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != self.config.hidden_size:
            raise ValueError(f"inputs_embeds must be (batch, time, {self.config.hidden_size}), "
                             f"got shape {tuple(inputs_embeds.shape)}")
        B, T = inputs_embeds.shape[:2]
        output_hidden_states = (output_hidden_states if output_hidden_states is not None
                                else self.config.output_hidden_states)
        if use_cache is None:
            use_cache = self.config.use_cache and not self.training
        if self.gradient_checkpointing and self.training:
            use_cache, cache = False, None
        _check_cache(cache, self.config)
        if use_cache and cache is None:
            cache = MinRNNCache(self.config)
        mask = _positions_mask(attention_mask, B, T)
        reset = document_starts(position_ids, seq_idx, cu_seq_lens_q, B, T, inputs_embeds.device)

        hidden_states = self.dropout(inputs_embeds)
        all_hidden = (hidden_states,) if output_hidden_states else None
        for block in self.layers:
            # no positions: nothing to read, and the cache stays as it is
            hidden_states = block(hidden_states, mask=mask, cache=cache, reset=reset) if T > 0 else hidden_states
            if output_hidden_states:
                all_hidden += (hidden_states,)
        if cache is not None:
            cache.note_tokens(input_ids, T)
        return BaseModelOutputWithPast(
            last_hidden_state=self.norm(hidden_states),
            cache=cache,
            hidden_states=all_hidden,
        )


class MinRNNForCausalLM(MinRNNPreTrainedModel, MinRNNGenerationMixin):
    """MinRNNModel + a linear LM head (tied to the embeddings when ``tie_word_embeddings``).

    ``generate()`` runs the prompt through the model in parallel once (the prefill), then
    feeds one token per step from a ``MinRNNCache``: the work and memory of a step do not
    depend on how long the context is. Greedy search, sampling (temperature, top-k, top-p,
    ...), beam search, repetition penalties, stop tokens, ``prefill_chunk_size``, batched
    left-padded prompts and continuing from a given cache work as for any transformers model.
    Not supported, with a one-line error: assisted / speculative decoding (a recurrent state
    cannot be rolled back), contrastive search and ``cache_implementation`` values other than
    "dynamic" (the cache has a fixed size already). See ``MinRNNGenerationMixin``.
    """

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: MinRNNConfig):
        super().__init__(config)
        self.model = MinRNNModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @property
    def carries_state(self) -> bool:
        """Whether the cache is a state of fixed size that `MinRNNCache.to_tensors` can carry from
        one call to the next (every block recurrent; an attention block's keys grow instead)."""
        return not self.config.attention_layer_indices

    @_accept_cache_aliases
    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: Tensor | None = None,
        inputs_embeds: Tensor | None = None,
        cache: MinRNNCache | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        logits_to_keep: int | Tensor = 0,
        position_ids: Tensor | None = None,
        seq_idx: Tensor | None = None,
        cu_seq_lens_q: Tensor | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """Logits (B, T, vocab) for every position (or the last ``logits_to_keep``).

        Arguments as ``MinRNNModel.forward`` (packed documents included), plus ``labels`` (B, T):
        the token ids themselves (shifted inside; -100 is ignored) for the next-token
        cross-entropy ``loss``, and the loss's keywords (``num_items_in_batch``, ...).
        """
        _check_kwargs(kwargs, _IGNORED_KWARGS | _LOSS_KWARGS | _FLASH_KWARGS, "MinRNNForCausalLM.forward")
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                         cache=cache, use_cache=use_cache, output_hidden_states=output_hidden_states,
                         position_ids=position_ids, seq_idx=seq_idx, cu_seq_lens_q=cu_seq_lens_q,
                         output_attentions=kwargs.pop("output_attentions", None))
        for name in _IGNORED_KWARGS | _FLASH_KWARGS:
            kwargs.pop(name, None)
        hidden = _keep_positions(out.last_hidden_state, logits_to_keep)
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=out.cache, hidden_states=out.hidden_states)


def _keep_positions(hidden: Tensor, logits_to_keep: int | Tensor) -> Tensor:
    """generate()'s ``logits_to_keep``: 0 keeps every position, k > 0 the last k, a 1-D
    tensor the positions it lists. (Written here: transformers only exports its own helper
    from 5.2x on.)"""
    if isinstance(logits_to_keep, Tensor):
        return hidden[:, logits_to_keep]
    return hidden if logits_to_keep == 0 else hidden[:, -logits_to_keep:]


class MinRNNForSequenceClassification(MinRNNPreTrainedModel):
    """MinRNNModel + a linear head ``score`` (D -> num_labels) on the last real token.

    The last real token of a row is the rightmost position whose ``attention_mask`` is 1
    (left or right padding), else the rightmost token that is not ``pad_token_id``, else the
    last position. Since the model is causal, that position has read the whole sequence.
    ``from_pretrained`` on a language model's weights creates ``score`` fresh.
    """

    _new_head_modules = ("score",)

    def __init__(self, config: MinRNNConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.model = MinRNNModel(config)
        self.score = nn.Linear(config.hidden_size, config.num_labels, bias=False)
        self.post_init()

    @_accept_cache_aliases
    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: Tensor | None = None,
        inputs_embeds: Tensor | None = None,
        cache: MinRNNCache | None = None,
        labels: Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        **kwargs,
    ) -> SequenceClassifierOutputWithPast:
        """Logits (B, num_labels). ``labels``: (B,) class ids (cross-entropy), (B, num_labels)
        floats (multi-label BCE) or (B,) floats with num_labels = 1 (regression, MSE)."""
        _check_kwargs(kwargs, _IGNORED_KWARGS | {"num_items_in_batch"}, "MinRNNForSequenceClassification.forward")
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                         cache=cache, use_cache=use_cache, output_hidden_states=output_hidden_states,
                         output_attentions=kwargs.pop("output_attentions", None))
        hidden = out.last_hidden_state
        B, T = hidden.shape[:2]
        if T == 0:
            raise ValueError("the input has no positions: a sequence classifier needs at least one token per row")
        positions = torch.arange(T, device=hidden.device)
        if attention_mask is not None:
            real = _positions_mask(attention_mask, B, T)
        elif input_ids is not None and self.config.pad_token_id is not None:
            real = input_ids != self.config.pad_token_id
        else:
            real = None
        last = (torch.full((B,), T - 1, device=hidden.device) if real is None
                else torch.where(real, positions, -1).amax(-1).clamp_min(0))
        pooled_logits = self.score(hidden[torch.arange(B, device=hidden.device), last])
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=pooled_logits, labels=labels, pooled_logits=pooled_logits,
                                      config=self.config)
        return SequenceClassifierOutputWithPast(loss=loss, logits=pooled_logits, cache=out.cache,
                                                hidden_states=out.hidden_states)


__all__ = [
    "MinRNNBlock",
    "MinRNNPreTrainedModel",
    "MinRNNModel",
    "MinRNNForCausalLM",
    "MinRNNForSequenceClassification",
]
