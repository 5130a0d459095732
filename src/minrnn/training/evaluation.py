"""Perplexity over a whole split: sliding windows (any model) and one stateful pass (recurrent models).

`sliding_window_loss` is the recipe of transformers' perplexity guide: windows of ``context``
tokens advance by ``stride``; the first window scores every target, each later one only the
targets no earlier window scored, so every token of the split is scored once, with up to
``context`` tokens before it. ``stride == context`` gives disjoint windows, each fully scored:
the windows `TextWorkload.evaluate` scores when they lie ``context`` apart.

`stateful_loss` runs a recurrent model once over the split in chunks of ``chunk`` tokens,
handing each chunk the state the previous one left (a MinRNNForCausalLM's cache: recurrent
state and conv window; or the state dict of a model with the state protocol, the compare
harness's nn.LSTM/GRU and minGRU/minLSTM): the same log-probabilities as one forward over the
whole split, in memory that does not grow with the split (one chunk's activations and
logits, and a state of fixed size).

Both return {"loss": mean nats per scored token, "tokens": tokens scored, "seconds",
"tokens_per_second"}; ``tokens`` is a 1-D int64 tensor or a prepared split's TokenStream.

`position_losses` reads windows far longer than training's and reports the mean loss at each
position bucket (0, 1, 2-3, 4-7, ...): whether a model's predictions keep improving with more
context, or degrade past the length it was trained on.
"""

from __future__ import annotations

import contextlib
import inspect
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..data.text import document_positions, token_source, windows

__all__ = ["plot_positions", "position_buckets", "position_losses", "sliding_window_loss", "spread_windows_loss",
           "stateful_loss", "stateful_refusal", "window_offsets"]


def window_offsets(n_tokens: int, context: int, stride: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(offsets (W,) int64, first scored position in each window (W,) int64) of the sliding
    windows over a split of ``n_tokens`` tokens: window w reads tokens ``[o, o + L)`` and
    predicts ``[o + 1, o + L + 1)`` with L = min(context, n_tokens - 1). Windows start every
    ``stride`` tokens; the last starts where the split's last target is its last target."""
    if context < 1 or stride < 1:
        raise ValueError(f"context and stride must be positive, got context={context}, stride={stride}")
    if stride > context:
        raise ValueError(f"stride ({stride}) must not exceed context ({context}): tokens between windows "
                         "would go unscored")
    predictions = n_tokens - 1
    if predictions < 1:
        raise ValueError(f"the split has {n_tokens} token(s); scoring needs at least 2")
    length = min(context, predictions)
    last = predictions - length
    offsets = list(range(0, last, stride)) + [last]
    # each window scores the targets after the previous window's last one
    ends = [o + length for o in offsets]
    first = [0] + [prev_end - o for prev_end, o in zip(ends[:-1], offsets[1:])]
    return torch.tensor(offsets, dtype=torch.long), torch.tensor(first, dtype=torch.long)


Logits = Callable[..., torch.Tensor]


@torch.no_grad()
def sliding_window_loss(logits_of: Logits, tokens, context: int, stride: int, device, batch_size: int = 8,
                        pack_documents: bool = False, autocast=None) -> dict:
    """Mean next-token loss over every target of ``tokens`` with the sliding-window recipe.

    ``logits_of(x, **extras)``: x (B, L) int64 -> logits (B, L, V); ``extras`` holds the
    windows' position_ids (B, L) when ``pack_documents`` (documents restart at 0, as training
    saw them). ``autocast``: a context-manager factory (bfloat16 runs). Loss summed in float64."""
    start = time.perf_counter()
    source = token_source(tokens)
    offsets, first = window_offsets(len(source), context, stride)
    length = min(context, len(source) - 1)
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = 0
    for i in range(0, len(offsets), batch_size):
        o, f = offsets[i:i + batch_size], first[i:i + batch_size]
        x, y = windows(tokens, o, length)
        extras = {"position_ids": document_positions(source, o, length).to(device)} if pack_documents else {}
        with autocast() if autocast else contextlib.nullcontext():
            logits = logits_of(x.to(device), **extras)
        nll = F.cross_entropy(logits.float().flatten(0, 1), y.to(device).flatten(), reduction="none")
        scored = (torch.arange(length)[None, :] >= f[:, None]).flatten().to(device)
        total += nll[scored].double().sum()
        count += int(scored.sum())
    return _result(total.item(), count, start)


@torch.no_grad()
def spread_windows_loss(logits_of: Logits, tokens, seq_len: int, count: int, device, batch_size: int = 8,
                        pack_documents: bool = False, autocast=None) -> float:
    """The figure training logs as val_loss, for any ``logits_of`` (as `sliding_window_loss`'s):
    the mean next-token loss over ``count`` windows of ``seq_len`` tokens spread evenly over
    ``tokens``, the evaluation windows of `TextWorkload`."""
    from .workloads import TextWorkload

    work = TextWorkload({"train": tokens, "valid": tokens}, 0, seq_len, batch_size, eval_windows=count,
                        pack_documents=pack_documents)
    return work.evaluate(logits_of, device, autocast)["loss"]


def position_buckets(length: int) -> list[tuple[int, int]]:
    """[(first, last + 1)] of positions 0 .. length - 1 in buckets doubling in width:
    [0, 1), [1, 2), [2, 4), [4, 8), ..., the last cut at ``length``."""
    if length < 1:
        raise ValueError(f"length must be positive, got {length}")
    edges = [0] + [2 ** k for k in range(length.bit_length()) if 2 ** k < length] + [length]
    return list(zip(edges[:-1], edges[1:]))


@torch.no_grad()
def position_losses(logits_of: Logits, tokens, length: int, count: int, device, batch_size: int = 8,
                    pack_documents: bool = False, autocast=None) -> dict:
    """Mean next-token loss at each position of ``count`` windows of ``length`` tokens spread
    evenly over ``tokens`` (each window read from its start: position p predicts with p + 1
    tokens of context), grouped by `position_buckets`.

    Returns {"windows": windows read, "length", "buckets": [{"from", "to", "loss"}], "loss"
    (over every position), "seconds", "tokens_per_second"}. ValueError (one line) when the split
    is shorter than one window."""
    from ..data.text import eval_offsets

    start = time.perf_counter()
    source = token_source(tokens)
    if len(source) < length + 1:
        raise ValueError(f"the split has {len(source)} tokens; a window of {length} needs {length + 1}")
    offsets = eval_offsets(len(source), length, count)
    per_position = torch.zeros(length, dtype=torch.float64, device=device)
    for i in range(0, len(offsets), batch_size):
        o = offsets[i:i + batch_size]
        x, y = windows(tokens, o, length)
        extras = {"position_ids": document_positions(source, o, length).to(device)} if pack_documents else {}
        with autocast() if autocast else contextlib.nullcontext():
            logits = logits_of(x.to(device), **extras)
        nll = F.cross_entropy(logits.float().transpose(1, 2), y.to(device), reduction="none")  # (B, length)
        per_position += nll.double().sum(0)
    per_position /= len(offsets)
    buckets = [{"from": a, "to": b, "loss": per_position[a:b].mean().item()} for a, b in position_buckets(length)]
    out = _result(per_position.sum().item() * len(offsets), length * len(offsets), start)
    return {**out, "windows": len(offsets), "length": length, "buckets": buckets}


def plot_positions(results: dict[str, dict], out, train_length: int | None = None):
    """Draw the loss of each bucket against its last position (log scale) for each of
    ``results`` ({label: a `position_losses` result}) into the PNG ``out``; a dashed line at
    ``train_length``. Returns ``out``. ImportError (one line) without matplotlib."""
    import os
    from pathlib import Path

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("plotting needs matplotlib: pip install 'minrnn[train]'") from None
    out = Path(out)
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, result in results.items():
        ax.plot([b["to"] for b in result["buckets"]], [b["loss"] for b in result["buckets"]], "o-", label=label)
    if train_length:
        ax.axvline(train_length, ls="--", color="gray", label=f"training length {train_length}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("position (bucket's last + 1)")
    ax.set_ylabel("loss (nats / token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name("." + out.name + ".tmp.png")  # a reader never sees a half-written plot
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, out)
    return out


def stateful_refusal(model) -> str | None:
    """Why ``model`` cannot be evaluated statefully (one line), or None when it can: a
    MinRNNForCausalLM of recurrent blocks, or a model of the state protocol (``carries_state``
    true: ``model(input_ids, state=S, return_state=True) -> (logits, new S)``, the compare
    harness's nn.LSTM/GRU and minGRU/minLSTM); only these carry a fixed-size state."""
    from ..models import MinRNNForCausalLM

    inner = model
    if not isinstance(model, MinRNNForCausalLM) and hasattr(model, "carries_state"):
        if model.carries_state:
            return None
        inner = getattr(model, "model", model)  # a wrapper that refuses: name the model it wraps
    if not isinstance(inner, MinRNNForCausalLM):
        return (f"--stateful needs a recurrent model (minGRU, minLSTM, nn.LSTM/GRU); {type(inner).__name__} carries "
                "no recurrent state (use --context and --stride)")
    config = inner.config
    if config.attention_layers or config.attention_every:
        return ("--stateful needs a model of recurrent blocks only; this one has attention layers, whose cache "
                "grows with the split (use --context and --stride)")
    return None


@torch.no_grad()
def stateful_loss(model, tokens, chunk: int, device, pack_documents: bool = False, autocast=None) -> dict:
    """Mean next-token loss of ``model`` over every target of ``tokens``, read in one pass in
    chunks of ``chunk`` tokens with the state carried: a MinRNNForCausalLM of recurrent blocks
    (its cache), or a model of the state protocol (see `stateful_refusal`; the state a dict of
    batch-first tensors).

    With ``pack_documents`` the state is reset where a document starts (position_ids 0 there
    and only there), as in training; a protocol model must then take ``position_ids``.
    ValueError (one line) for a model that cannot carry its state."""
    from ..models import MinRNNForCausalLM

    reason = stateful_refusal(model)
    if reason:
        raise ValueError(reason)
    if chunk < 1:
        raise ValueError(f"chunk must be positive, got {chunk}")
    cached = isinstance(model, MinRNNForCausalLM)
    if pack_documents and not cached and "position_ids" not in inspect.signature(model.forward).parameters:
        raise ValueError(f"{type(model).__name__} cannot reset its state at a document start (no position_ids); "
                         "packed documents need a minGRU/minLSTM model")
    start = time.perf_counter()
    source = token_source(tokens)
    predictions = len(source) - 1
    if predictions < 1:
        raise ValueError(f"the split has {len(source)} token(s); scoring needs at least 2")
    state = None
    total = torch.zeros((), dtype=torch.float64, device=device)
    for s in range(0, predictions, chunk):
        n = min(chunk, predictions - s)
        x, y = windows(tokens, torch.tensor([s]), n)
        extras = {"position_ids": _carried_positions(source, s, n).to(device)} if pack_documents else {}
        with autocast() if autocast else contextlib.nullcontext():
            if cached:
                out = model(input_ids=x.to(device), cache=state, use_cache=True, **extras)
                logits, state = out.logits, out.cache
            else:
                logits, state = model(x.to(device), state=state, return_state=True, **extras)
        total += F.cross_entropy(logits.float()[0], y.to(device)[0], reduction="sum").double()
    return _result(total.item(), predictions, start)


def _carried_positions(stream, start: int, length: int) -> torch.Tensor:
    """position_ids (1, length) int64 of a chunk at ``start``: 0 exactly where a document starts
    (the state resets there), a positive distance elsewhere, so a chunk that begins inside a
    document continues its state instead of restarting it."""
    begins = torch.zeros(length, dtype=torch.bool)
    begins[torch.from_numpy(stream.document_starts(start, start + length) - start)] = True
    index = torch.arange(length)
    return (index - torch.where(begins, index, -1).cummax(0).values)[None]


def _result(total: float, count: int, start: float) -> dict:
    seconds = time.perf_counter() - start
    return {"loss": total / count, "tokens": count, "seconds": seconds,
            "tokens_per_second": count / seconds if seconds > 0 else float("inf")}
