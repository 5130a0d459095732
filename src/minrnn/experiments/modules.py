"""The modules a baseline is built as when no library class is one: a transformers causal LM seen
as ``forward(input_ids) -> logits`` (`LogitsOnly`), and torch's LSTM / GRU between an embedding
and a head (`TorchRNNLM`); with the parameter count every budget is matched on."""

from __future__ import annotations

import importlib.util

from torch import Tensor, nn

__all__ = ["LogitsOnly", "TorchRNNLM", "mambapy_available", "parameter_count"]


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
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor, position_ids: Tensor | None = None) -> Tensor:
        extra = {} if position_ids is None else {"position_ids": position_ids}
        return self.model(input_ids=input_ids, use_cache=False, **extra).logits


class TorchRNNLM(nn.Module):
    """Embedding -> dropout -> nn.LSTM or nn.GRU (``num_layers``, dropout between layers)
    -> dropout -> linear head (tied to the embedding unless ``tie_embeddings=False``).

    forward(input_ids (B, T)) -> logits (B, T, vocab_size). The cuDNN kernel runs on GPU.
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

    def forward(self, input_ids: Tensor) -> Tensor:
        y, _ = self.rnn(self.drop(self.embed(input_ids)))
        return self.head(self.drop(y))
