"""The paper's log-space minGRU, as plain autograd: the baseline a fused kernel must beat.

Feng et al. 2024 (arXiv 2410.01201) train minGRU in log space with Heinsen's scan
(arXiv 2311.06281). Written here from the equations, not from any listing's code:

    log z_t    = log sigmoid(k_t)      = -softplus(-k_t)
    log(1-z_t) = log sigmoid(-k_t)     = -softplus(k_t)          (the decay, "log_coeffs")
    log b_t    = log z_t + log g(h~_t)                           ("log_values")
    a*_t       = sum_{s <= t} log(1 - z_s)                       (cumsum)
    log h_t    = a*_t + logcumsumexp_{s <= t}(log b_s - a*_s)
    h_t        = exp(log h_t)

A start state h0 > 0 enters as a step 0 with value log h0 and decay 1 (log 0), dropped
from the output. Every operation is a stock PyTorch op and autograd differentiates it:
this is what "use the paper's code" costs, in time, memory and float32 accuracy (a*
grows like T, so the subtraction loses precision at long T; minrnn's ``log`` backend
exists to avoid that).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..functional import log_g


def paper_mingru(hidden: Tensor, gate: Tensor, h0: Tensor | None = None) -> Tensor:
    """minGRU by the paper's log-space parallel form.

    Args:
        hidden: (B, T, C) candidate pre-activation h~ (g() applied here).
        gate: (B, T, C) update-gate pre-activation k (z = sigmoid(k)).
        h0: (B, C) start state, strictly positive, or None for zeros.
    Returns:
        h: (B, T, C).
    """
    log_coeffs = -F.softplus(gate)
    log_values = -F.softplus(-gate) + log_g(hidden)
    if h0 is not None:
        if h0.shape != hidden[:, 0].shape:
            raise ValueError(f"h0 must be (batch, channels) = {tuple(hidden[:, 0].shape)}, got {tuple(h0.shape)}")
        log_coeffs = torch.cat([torch.zeros_like(log_coeffs[:, :1]), log_coeffs], dim=1)
        log_values = torch.cat([torch.log(h0).unsqueeze(1), log_values], dim=1)
    a_star = torch.cumsum(log_coeffs, dim=1)
    log_h = a_star + torch.logcumsumexp(log_values - a_star, dim=1)
    h = torch.exp(log_h)
    return h if h0 is None else h[:, 1:]


class PaperMinGRU(nn.Module):
    """One minGRU layer in the paper's plain-autograd form: nn.Linear(input, 2 * hidden)
    -> [hidden | gate] (minrnn.MinGRU's layout) -> ``paper_mingru``.

    forward(x (B, T, input_size)) -> h (B, T, hidden_size).
    """

    def __init__(self, input_size: int, hidden_size: int, device=None, dtype=None):
        super().__init__()
        self.proj = nn.Linear(input_size, 2 * hidden_size, device=device, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        hidden, gate = self.proj(x).chunk(2, dim=-1)
        return paper_mingru(hidden, gate)
