"""The modules a baseline is built as when no library class is one: a transformers causal LM seen
as ``forward(input_ids) -> logits`` (`LogitsOnly`), and torch's LSTM / GRU between an embedding
and a head (`TorchRNNLM`); with the parameter count every budget is matched on."""

from __future__ import annotations

import importlib.util

from torch import Tensor, nn

__all__ = ["LogitsOnly", "TorchRNNLM", "mambapy_available", "parameter_count", "state_refusal"]


def parameter_count(model: nn.Module) -> int:
    """All parameters of ``model``, a tensor shared by several modules (tied embeddings) once."""
    return sum(p.numel() for p in model.parameters())


def mambapy_available() -> bool:
    return importlib.util.find_spec("mambapy") is not None


class LogitsOnly(nn.Module):
    """A transformers causal LM seen as ``forward(input_ids (B, T), position_ids=None) -> logits (B, T, V)``.

    ``position_ids`` (B, T), restarting at 0 at each document start, keep packed documents
    apart (transformers' padding-free convention: no attention mask and no cache are passed).
    ``.model`` is the transformers model itself (for ``generate``, ``save_pretrained``).
    No cache is built: the wrapper is for training and scoring whole sequences.

    A MinRNNForCausalLM of recurrent blocks also carries its state from call to call:
    ``forward(input_ids, state=S, return_state=True) -> (logits, new state)`` starts from ``S``
    (None: zeros), a dict of batch-first tensors (`MinRNNCache.to_tensors`); see `carries_state`.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    @property
    def carries_state(self) -> bool:
        return state_refusal(self.model) is None

    def forward(self, input_ids: Tensor, position_ids: Tensor | None = None, state: dict | None = None,
                return_state: bool = False):
        extra = {} if position_ids is None else {"position_ids": position_ids}
        if state is None and not return_state:
            return self.model(input_ids=input_ids, use_cache=False, **extra).logits
        reason = state_refusal(self.model)
        if reason:
            raise ValueError(reason)
        from ..training.loop import lm_stateful_logits

        logits, last = lm_stateful_logits(self.model, input_ids, state, **extra)
        return (logits, last) if return_state else logits


def state_refusal(model: nn.Module) -> str | None:
    """Why ``model`` (a transformers model) cannot carry a state between calls, one line, or None:
    only a MinRNNForCausalLM of recurrent blocks has a state of fixed size."""
    carries = getattr(model, "carries_state", None)
    if carries is None:
        return f"{type(model).__name__} carries no recurrent state between calls"
    if not carries:
        return ("a model with attention blocks carries no fixed-size state between calls (its cache of keys "
                "grows with the context)")
    return None


class TorchRNNLM(nn.Module):
    """Embedding -> dropout -> nn.LSTM or nn.GRU (``num_layers``, dropout between layers)
    -> dropout -> linear head (tied to the embedding unless ``tie_embeddings=False``).

    forward(input_ids (B, T)) -> logits (B, T, vocab_size); with ``return_state=True`` also the
    state after the last position, which ``state=`` hands to the next call. The cuDNN kernel
    runs on GPU.
    """

    def __init__(self, cell: str, vocab_size: int, hidden_size: int, num_layers: int = 2,
                 dropout: float = 0.0, tie_embeddings: bool = True):
        super().__init__()
        rnn = {"lstm": nn.LSTM, "gru": nn.GRU}.get(cell)
        if rnn is None:
            raise ValueError(f"cell must be 'lstm' or 'gru', got {cell!r}")
        self.cell = cell
        self.embed = nn.Embedding(vocab_size, hidden_size)
        self.rnn = rnn(hidden_size, hidden_size, num_layers, batch_first=True,
                       dropout=dropout if num_layers > 1 else 0.0)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(hidden_size, vocab_size, bias=False)
        if tie_embeddings:
            self.head.weight = self.embed.weight

    carries_state = True

    def forward(self, input_ids: Tensor, state: dict | None = None, return_state: bool = False):
        """``state``: {"h": (B, num_layers, hidden)[, "c": ... for the LSTM]} to start from (None:
        zeros); ``return_state``: also return the state after the last position, in that form."""
        hx = None
        if state:
            h = state["h"].transpose(0, 1).contiguous()
            hx = (h, state["c"].transpose(0, 1).contiguous()) if self.cell == "lstm" else h
        y, last = self.rnn(self.drop(self.embed(input_ids)), hx)
        logits = self.head(self.drop(y))
        if not return_state:
            return logits
        if self.cell == "lstm":
            return logits, {"h": last[0].transpose(0, 1), "c": last[1].transpose(0, 1)}
        return logits, {"h": last.transpose(0, 1)}
