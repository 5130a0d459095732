"""Layer suite: one training step (forward + backward) of a recurrent layer, per length.

Candidates, in two families that share the input x (B, T, D) and hidden width H = D:

    minGRU[<backend>]  minrnn.MinGRU(D, D, backend=...) for every backend registered and
                       runnable on the device (``minrnn.available_backends()``), so a new
                       backend is benchmarked as soon as it registers
    paper-minGRU       the paper's log-space form in plain autograd (``PaperMinGRU`` below):
                       what running the paper's equations as stock PyTorch ops costs
    nn.GRU             torch's GRU (batch_first)
    Linear(D,2D)       the layer's own input projection alone: the floor, since every
                       minGRU layer must at least run it
    minLSTM[...], nn.LSTM, Linear(D,3D)    the same for minLSTM

A step is ``torch.autograd.backward(layer(x), dy)`` with x requiring grad (a layer inside
a network must return dx), the upstream gradient dy fixed and preallocated, and the
gradients of the previous step dropped (untimed) before it, so each step allocates its
gradients afresh. Per candidate and T the suite records the median ms, the ratios to
the family's floor and to its torch RNN, the peak and saved-for-backward memory
(``bench.measure``) and, for the minrnn forms, the float32 output's max abs error
against the same layer run in float64 by the sequential loop.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..functional import log_g
from ..layers import MinGRU, MinLSTM
from ..ops import BACKENDS, available_backends, resolve_backend
from .runner import Case, Result, progress, run_cases
from .settings import Settings

FAMILIES = {
    # family: (minrnn layer, torch RNN, pre-activations per unit)
    "minGRU": (MinGRU, nn.GRU, 2),
    "minLSTM": (MinLSTM, nn.LSTM, 3),
}


def floor_name(family: str) -> str:
    return f"Linear(D,{FAMILIES[family][2]}D)"


def rnn_name(family: str) -> str:
    return f"nn.{FAMILIES[family][1].__name__}"


def paper_mingru(hidden: Tensor, gate: Tensor, h0: Tensor | None = None) -> Tensor:
    """minGRU by the paper's log-space parallel form (Feng et al. 2024 with Heinsen's scan,
    arXiv 2311.06281), written from the equations with stock ops that autograd differentiates:

        log(1-z_t) = -softplus(k_t),   log b_t = -softplus(-k_t) + log g(h~_t)
        a*_t = cumsum_t log(1-z),      h_t = exp(a*_t + logcumsumexp_t(log b - a*))

    a* grows like T, so float32 loses precision at long T (what the ``log`` backend avoids).

    Args:
        hidden: (B, T, C) candidate pre-activation h~ (g() applied here).
        gate: (B, T, C) update-gate pre-activation k (z = sigmoid(k)).
        h0: (B, C) start state, strictly positive (it enters as step 0 with decay 1), or None for zeros.
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
    h = torch.exp(a_star + torch.logcumsumexp(log_values - a_star, dim=1))
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


class _Output(nn.Module):
    """An RNN whose forward returns (output, state), reduced to the output."""

    def __init__(self, rnn: nn.Module):
        super().__init__()
        self.rnn = rnn

    def forward(self, x: Tensor) -> Tensor:
        return self.rnn(x)[0]


@dataclass(frozen=True)
class LayerCandidate:
    name: str
    family: str  # "minGRU" | "minLSTM"
    role: str  # "minrnn" | "paper" | "rnn" | "floor"
    #: (width, device, dtype) -> a module with forward(x (B, T, width)) -> (B, T, out)
    build: Callable[[int, torch.device, torch.dtype], nn.Module]
    backend: str | None = None
    default: bool = False  # the backend "auto" resolves to on this device
    #: the module's input projection, for the float64 reference (minrnn forms only)
    projection: Callable[[nn.Module], nn.Linear] | None = None


def runnable_backends(device: torch.device) -> list[str]:
    """Registered backends whose dependencies are present and that run on ``device``."""
    return [n for n in available_backends() if BACKENDS[n].supports(device)]


def layer_candidates(device: torch.device) -> list[LayerCandidate]:
    auto = resolve_backend("auto", device).name
    out = []
    for family, (cls, rnn_cls, n_pre) in FAMILIES.items():
        for be in runnable_backends(device):
            out.append(LayerCandidate(
                f"{family}[{be}]", family, "minrnn",
                lambda w, dev, dt, cls=cls, be=be: _Output(cls(w, w, backend=be, device=dev, dtype=dt)),
                backend=be, default=(be == auto), projection=lambda m: m.rnn.proj[0]))
        if family == "minGRU":
            out.append(LayerCandidate("paper-minGRU", family, "paper",
                                      lambda w, dev, dt: PaperMinGRU(w, w, device=dev, dtype=dt),
                                      projection=lambda m: m.proj))
        out.append(LayerCandidate(
            rnn_name(family), family, "rnn",
            lambda w, dev, dt, rnn_cls=rnn_cls: _Output(rnn_cls(w, w, batch_first=True, device=dev, dtype=dt))))
        out.append(LayerCandidate(
            floor_name(family), family, "floor",
            lambda w, dev, dt, n_pre=n_pre: nn.Linear(w, n_pre * w, device=dev, dtype=dt)))
    return out


def float64_error(cand: LayerCandidate, module: nn.Module, x: Tensor) -> float | None:
    """Max abs error of the module's output against the same weights in float64, scanned
    by the sequential loop; None for candidates that are not a minrnn form."""
    if cand.projection is None:
        return None
    cls = FAMILIES[cand.family][0]
    width = x.shape[-1]
    ref = cls(width, width, backend="sequential", device=x.device, dtype=torch.float64)
    ref.proj[0] = copy.deepcopy(cand.projection(module)).double()
    with torch.no_grad():
        y = module(x)
        y_ref, _ = ref(x.double())
    return (y.double() - y_ref).abs().max().item()


def _case(name: str, module: nn.Module, x: Tensor, dy: Tensor) -> Case:
    params = tuple(module.parameters())

    def step():
        torch.autograd.backward(module(x), dy)

    def reset():
        x.grad = None
        for p in params:
            p.grad = None

    return Case(name, step, reset, params)


def _row(batch, width, T, cand: LayerCandidate, res: Result) -> dict:
    return {
        "batch": batch, "width": width, "T": T, "candidate": cand.name, "family": cand.family,
        "role": cand.role, "backend": cand.backend, "default": cand.default,
        **res.fields(), "ratio_floor": None, "ratio_rnn": None, "max_abs_err": None,
    }


def _add_ratios(rows: list[dict]) -> None:
    """ratio_floor = ms / ms of the family's Linear; ratio_rnn = ms / ms of its torch RNN
    (rows of one batch, width and T, all timed in this process)."""
    by_name = {r["candidate"]: r for r in rows}
    for r in rows:
        for key, ref in (("ratio_floor", floor_name(r["family"])), ("ratio_rnn", rnn_name(r["family"]))):
            base = by_name.get(ref)
            if r["ms"] is not None and base is not None and base["ms"]:
                r[key] = r["ms"] / base["ms"]


def run(settings: Settings) -> dict:
    """Run the suite; returns {"configs": [...], "candidates": [...], "rows": [...]}."""
    dev, dt = settings.device, settings.dtype
    cands = layer_candidates(dev)
    rows: list[dict] = []
    for batch, width, lengths in settings.layer_configs():
        torch.manual_seed(settings.seed)
        modules = {c.name: c.build(width, dev, dt) for c in cands}
        previous: dict[str, Result] = {}
        prev_T = None
        for T in lengths:
            t0 = time.perf_counter()
            x = torch.randn(batch, T, width, device=dev, dtype=dt, requires_grad=True)
            dys: dict[int, Tensor] = {}
            cases = []
            for c in cands:
                with torch.no_grad():
                    out_width = modules[c.name](x[:1, :1].detach()).shape[-1]
                if out_width not in dys:
                    dys[out_width] = torch.randn(batch, T, out_width, device=dev, dtype=dt)
                cases.append(_case(c.name, modules[c.name], x, dys[out_width]))
            results = run_cases(cases, dev, settings.budget, previous, scale=T / prev_T if prev_T else 1.0)
            new = [_row(batch, width, T, c, results[c.name]) for c in cands]
            _add_ratios(new)
            for c, r in zip(cands, new):
                if r["ms"] is not None:
                    r["max_abs_err"] = float64_error(c, modules[c.name], x.detach())
            rows += new
            previous, prev_T = results, T
            del x, dys, cases
            progress(f"layers B={batch} D={width} T={T}: {time.perf_counter() - t0:.1f} s")
    return {
        "configs": [{"batch": b, "width": w, "lengths": ls} for b, w, ls in settings.layer_configs()],
        "candidates": [{"name": c.name, "family": c.family, "role": c.role, "backend": c.backend,
                        "default": c.default} for c in cands],
        "rows": rows,
    }
