"""The paper's log-space scan (Heinsen, arXiv 2311.06281), made stable.

For positive values the recurrence h_t = a_t h_{t-1} + b_t has the closed form

    log h_t = logsumexp_{s <= t} ( log b_s + sum_{k = s+1}^{t} log a_k )      (h_0 = 0)

The paper evaluates it as ``a* = cumsum(log a); log h = a* + logcumsumexp(log b - a*)``.
That subtracts two cumulative sums which grow like T * |log a|: in float32 their
difference loses ~|a*| * 6e-8 in the log, i.e. that much relative error in h (and
nonsense once a gate saturates over a long sequence; docs/design.md has a figure).

Here every segment sum ``sum_{k=s+1}^{t} log a_k`` is accumulated directly (a masked
cumsum over an L x L block inside each chunk of L steps), never formed as a
difference, so the only rounding is that of adding like-signed numbers. Chunks are
joined by the same scan one level up (over per-chunk totals), recursively. Memory is
L times the input inside the chunk step; the backend is for checking and for
log-input use, not for speed.

The start state enters linearly, in plain space: h = scan_from_zero + (prod a) * h0.
That keeps h0 = 0 exact and its gradient finite (the gradient of log h0 is not).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .checks import accumulation_dtype, check_scan_inputs
from .registry import BACKENDS, check_backend_takes_cell

CHUNK = 8


def _segment_logsumexp(log_a: Tensor, log_b: Tensor) -> Tensor:
    """Zero-start log-scan inside chunks. log_a, log_b: (..., L, C) -> log h: (..., L, C)."""
    L = log_a.shape[-2]
    idx = torch.arange(L, device=log_a.device)
    later = (idx[:, None] > idx[None, :]).unsqueeze(-1)  # [t, s, 1]: step t lies after s
    # seg[t, s] = sum_{k=s+1}^{t} log a_k, accumulated in order (no cancellation)
    steps = torch.where(later, log_a.unsqueeze(-2), log_a.new_zeros(()))  # (..., L_t, L_s, C)
    seg = torch.cumsum(steps, dim=-3)
    causal = (idx[:, None] >= idx[None, :]).unsqueeze(-1)
    terms = torch.where(causal, seg + log_b.unsqueeze(-3), log_a.new_full((), float("-inf")))
    return torch.logsumexp(terms, dim=-2)


def _log_scan_from_zero(log_a: Tensor, log_b: Tensor, chunk: int = CHUNK) -> Tensor:
    """log_a, log_b: (B, T, C). Returns log h: (B, T, C) for h_0 = 0."""
    B, T, C = log_a.shape
    if T <= chunk:
        return _segment_logsumexp(log_a, log_b)
    n = -(-T // chunk)
    pad = n * chunk - T
    if pad:
        # identity steps (log a = 0, b = 0) at the end change nothing before them
        log_a = torch.cat([log_a, log_a.new_zeros(B, pad, C)], dim=1)
        log_b = torch.cat([log_b, log_b.new_full((B, pad, C), float("-inf"))], dim=1)
    la = log_a.view(B, n, chunk, C)
    local = _segment_logsumexp(la, log_b.view(B, n, chunk, C))  # (B, n, L, C)
    decay = torch.cumsum(la, dim=2)  # log of a_1 ... a_t inside each chunk
    ends = _log_scan_from_zero(decay[:, :, -1], local[:, :, -1], chunk)  # (B, n, C)
    entering = torch.cat([torch.full_like(ends[:, :1], float("-inf")), ends[:, :-1]], dim=1)
    log_h = torch.logaddexp(local, decay + entering.unsqueeze(2))
    return log_h.reshape(B, n * chunk, C)[:, :T]


def scan_from_logs(log_a: Tensor, log_b: Tensor, h0: Tensor | None = None) -> Tensor:
    """h from log a, log b (B, T, C) and a plain start state h0 (B, C) >= 0 or None."""
    h = torch.exp(_log_scan_from_zero(log_a, log_b))
    if h0 is not None:
        h = h + torch.exp(torch.cumsum(log_a, dim=1)) * h0.unsqueeze(1)
    return h


def log_scan(log_a: Tensor, log_b: Tensor, log_h0: Tensor | None = None) -> Tensor:
    """The scan h_t = a_t h_{t-1} + b_t given logarithms of positive a, b and h0.

    Args:
        log_a: (B, T, C) log of the decay a_t (any real value).
        log_b: (B, T, C) log of the input b_t (> -inf: b strictly positive).
        log_h0: (B, C) log of the start state, or None for h_0 = 0.
    Returns:
        h: (B, T, C) in plain space (not its log).
    """
    check_scan_inputs(log_a, log_b, log_h0, names=("log_a", "log_b", "log_h0"))
    acc = accumulation_dtype(log_a.dtype)
    h0 = None if log_h0 is None else torch.exp(log_h0.to(acc))
    return scan_from_logs(log_a.to(acc), log_b.to(acc), h0).to(log_a.dtype)


def log_space_scan(a: Tensor, b: Tensor, h0: Tensor | None = None) -> Tensor:
    """The registered "log" backend: the scan of plain inputs with a > 0, b > 0, h0 >= 0
    (a ValueError otherwise), computed in log space.

    Args:
        a, b: (B, T, C) floating; h0: (B, C) or None (zeros).
    Returns:
        h: (B, T, C).

    Plain torch ops: autograd saves their intermediates, including the (L x L) segment sums
    of each chunk of L = CHUNK steps.
    """
    # the value checks read the data, a host sync a compiled graph cannot hold: torch.compile skips them
    checked = not torch.compiler.is_compiling()
    if checked and (not bool((a > 0).all()) or not bool((b > 0).all())):
        raise ValueError(
            "backend='log' works in log space and needs a > 0 and b > 0 everywhere; "
            "use backend='chunked' (or 'auto') for zeros or negative values"
        )
    if checked and h0 is not None and not bool((h0 >= 0).all()):
        raise ValueError(
            "backend='log' needs h0 >= 0 (it is a log-space scan); "
            "use backend='chunked' (or 'auto') for a negative start state"
        )
    return scan_from_logs(torch.log(a), torch.log(b), h0)



def log_cell(spec, pre: tuple[Tensor, ...], h0: Tensor | None, options: tuple, mask: Tensor | None,
             reset: Tensor | None = None) -> Tensor:
    """The registered "log" backend's cells: the cell's log-gates (never a log of a sigmoid)
    into the log-space scan; a padded position is log a = 0, log b = -inf, a document start
    (``reset``) log a = -inf. A cell with transitions of either sign (no log form) is a ValueError."""
    check_backend_takes_cell(spec, BACKENDS["log"])
    if h0 is not None and not torch.compiler.is_compiling() and not bool((h0 >= 0).all()):
        raise ValueError("h0 has negative entries, which backend='log' cannot represent; "
                         "use backend='chunked' (or 'auto')")
    log_a, log_b = spec.log_gates(*pre, *options)
    if mask is not None:
        m = mask.unsqueeze(-1)
        log_a = torch.where(m, log_a, log_a.new_zeros(()))
        log_b = torch.where(m, log_b, log_b.new_full((), float("-inf")))
    if reset is not None:
        # only sums of like-signed logs are formed (never a difference), so -inf stays exact
        log_a = torch.where(reset.unsqueeze(-1), log_a.new_full((), float("-inf")), log_a)
    return scan_from_logs(log_a, log_b, h0)
