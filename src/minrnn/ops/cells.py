"""The cells, each described once: what every backend, ``minrnn.functional``, the layers and
the model read instead of testing a cell's name.

A cell turns n pre-activations per channel into the decay a and input b of the scan
h_t = a_t h_{t-1} + b_t (Feng et al. 2024, gates depending on x_t only):

    minGRU:   [hidden | gate]            z = sigmoid(gate);  a = 1 - z,  b = z g(hidden)
    minLSTM:  [hidden | forget | input]  f = sigmoid(forget), i = sigmoid(input)
              normalize: a = f / (f + i), i' = i / (f + i)     else a = f, i' = i
              b = i' g(hidden)

    g(x) = x + 0.5 (x >= 0),  sigmoid(x) (x < 0)       -- continuous, positive

and their signed variants (Grazzi et al. 2024, arXiv 2411.12537), which keep b and map the
transition a in (0, 1) to 2a - 1 in (-1, 1):

    minGRU signed:   a = 1 - 2z = (1 - z) - z,   b = z g(hidden)
    minLSTM signed:  a = 2f' - 1 = f' - (1 - f'), b = i' g(hidden)

A transition in (0, 1) can only shrink a state towards the input; at a = -1 the step
h -> -h + b is a reflection, which is what counting modulo 2 (parity) needs. The log
backend cannot hold a negative a and refuses these cells (``CellSpec.signed``).

Adding a cell: write its gates in log form below and ``register_cell`` one ``CellSpec`` (from
anywhere: the registry is read when a config or layer is validated, not copied at import);
every backend then runs it (the fused kernels only know the cells they were written for,
and the others go through the backend's scan).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


def g(x: Tensor) -> Tensor:
    """g(x) = x + 0.5 for x >= 0, sigmoid(x) for x < 0 (the paper's positive candidate map)."""
    return torch.where(x >= 0, x + 0.5, torch.sigmoid(x))


def log_g(x: Tensor) -> Tensor:
    """log g(x), computed without a log of a sigmoid (relu keeps the unused branch finite)."""
    return torch.where(x >= 0, torch.log(F.relu(x) + 0.5), -F.softplus(-x))


# Each cell defines its two gates in log form, (log a, log i), from logsigmoid/softplus.
# The plain gates are exp() of those, not sigmoid(): autograd's sigmoid backward is
# y (1 - y), which rounds to 0 once y rounds to 1 (|x| > ~17 in float32), while
# exp(logsigmoid(x)) differentiates to sigmoid(x) sigmoid(-x) computed from two accurate
# factors. Saturated gates thus keep exact tiny gradients, not zeros.


def _mingru_log_az(gate: Tensor) -> tuple[Tensor, Tensor]:
    # log(1 - z) = logsigmoid(-gate) = -softplus(gate);  log z = logsigmoid(gate)
    return -F.softplus(gate), F.logsigmoid(gate)


def _minlstm_log_fi(forget: Tensor, input: Tensor, normalize: bool) -> tuple[Tensor, Tensor]:
    if normalize:
        # f / (f + i) = sigmoid(log f - log i), without forming f + i
        d = F.logsigmoid(forget) - F.logsigmoid(input)
        return F.logsigmoid(d), F.logsigmoid(-d)
    return F.logsigmoid(forget), F.logsigmoid(input)


def mingru_gates(hidden: Tensor, gate: Tensor) -> tuple[Tensor, Tensor]:
    """(a, b) = (1 - z, z g(hidden)), z = sigmoid(gate)."""
    log_a, log_z = _mingru_log_az(gate)
    return torch.exp(log_a), torch.exp(log_z) * g(hidden)


def mingru_log_gates(hidden: Tensor, gate: Tensor) -> tuple[Tensor, Tensor]:
    """(log a, log b) of ``mingru_gates``."""
    log_a, log_z = _mingru_log_az(gate)
    return log_a, log_z + log_g(hidden)


def minlstm_gates(hidden: Tensor, forget: Tensor, input: Tensor, normalize: bool = True) -> tuple[Tensor, Tensor]:
    """(a, b) = (f', i' g(hidden)) with f', i' normalised or not."""
    log_f, log_i = _minlstm_log_fi(forget, input, normalize)
    return torch.exp(log_f), torch.exp(log_i) * g(hidden)


def minlstm_log_gates(hidden: Tensor, forget: Tensor, input: Tensor, normalize: bool = True) -> tuple[Tensor, Tensor]:
    """(log a, log b) of ``minlstm_gates``."""
    log_f, log_i = _minlstm_log_fi(forget, input, normalize)
    return log_f, log_i + log_g(hidden)


def _signed(log_a: Tensor, log_not_a: Tensor) -> Tensor:
    # 2a - 1 as a - (1 - a), each from its own log form: exact near both ends of (-1, 1), and
    # saturated gates keep tiny non-zero gradients (tanh's 1 - y^2 would round them to 0)
    return torch.exp(log_a) - torch.exp(log_not_a)


def mingru_signed_gates(hidden: Tensor, gate: Tensor) -> tuple[Tensor, Tensor]:
    """(a, b) = (1 - 2z, z g(hidden)), z = sigmoid(gate): a in (-1, 1)."""
    log_a, log_z = _mingru_log_az(gate)
    return _signed(log_a, log_z), torch.exp(log_z) * g(hidden)


def minlstm_signed_gates(hidden: Tensor, forget: Tensor, input: Tensor,
                         normalize: bool = True) -> tuple[Tensor, Tensor]:
    """(a, b) = (2f' - 1, i' g(hidden)) with f', i' as in ``minlstm_gates``: a in (-1, 1)."""
    log_f, log_i = _minlstm_log_fi(forget, input, normalize)
    # 1 - f': i' when normalised (f' + i' = 1), else sigmoid(-forget)
    log_not_f = log_i if normalize else F.logsigmoid(-forget)
    return _signed(log_f, log_not_f), torch.exp(log_i) * g(hidden)


@dataclass(frozen=True)
class CellSpec:
    """One cell: its pre-activations, its gates and its options.

    ``gates(*pre, *options) -> (a, b)`` and ``log_gates(*pre, *options) -> (log a, log b)``
    take the pre-activations (any shape, one per name in ``pre_names``) followed by the
    option values in the order of ``option_names``. ``decay_slot`` is the pre-activation
    whose bias sets how much the cell remembers, ``decay_bias_sign`` the sign with which
    a "remember more" bias goes on it (minGRU: a = 1 - sigmoid(gate), so -1) and
    ``default_decay_bias`` the amount a model gives it at init unless told otherwise
    (minGRU 0, the paper's; minLSTM 3, the official code's). ``signed``:
    a ranges over (-1, 1), so the cell has no log form (``log_gates`` is None) and only the
    backends that take values of any sign (``Backend.signed``) run it.
    """

    name: str
    pre_names: tuple[str, ...]
    gates: Callable[..., tuple[Tensor, Tensor]]
    log_gates: Callable[..., tuple[Tensor, Tensor]] | None
    decay_slot: int
    decay_bias_sign: float
    option_names: tuple[str, ...] = ()
    option_defaults: tuple = ()
    doc: str = ""
    signed: bool = False
    default_decay_bias: float = 0.0

    @property
    def n_pre(self) -> int:
        """Pre-activations per channel (the input projection is n_pre * hidden_size wide)."""
        return len(self.pre_names)

    def options(self, **given) -> tuple:
        """The option values in ``option_names`` order, defaults filled in; an unknown name
        is a one-line error."""
        for key in given:
            if key not in self.option_names:
                expected = ", ".join(self.option_names) or "none"
                raise TypeError(f"cell {self.name!r} has no option {key!r} (its options: {expected})")
        return tuple(bool(given.get(k, d)) if isinstance(d, bool) else given.get(k, d)
                     for k, d in zip(self.option_names, self.option_defaults))

    def step(self, pre: tuple[Tensor, ...], h: Tensor | None, options: tuple = (),
             mask: Tensor | None = None, reset: Tensor | None = None) -> Tensor:
        """One step h = a h + b on (B, C) pre-activations (h None: zeros); where ``mask``
        (B,) is False the step is the identity (a = 1, b = 0) and h passes unchanged; where
        ``reset`` (B,) is True the state is forgotten first (a = 0: a document starts)."""
        a, b = apply_boundaries(*self.gates(*pre, *options), mask, reset)
        return b if h is None else a * h + b


def identity_where_masked(a: Tensor, b: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """(a, b) with a = 1 and b = 0 where ``mask`` (a's shape without the channels) is False."""
    m = mask.unsqueeze(-1)
    return (torch.where(m, a, torch.ones((), dtype=a.dtype, device=a.device)),
            torch.where(m, b, torch.zeros((), dtype=b.dtype, device=b.device)))


def apply_boundaries(a: Tensor, b: Tensor, mask: Tensor | None, reset: Tensor | None) -> tuple[Tensor, Tensor]:
    """(a, b) with padding and document starts applied, both masks of a's shape without the
    channels: where ``mask`` is False the step is the identity (a = 1, b = 0); then where
    ``reset`` is True the state before the step is forgotten (a = 0, so h = b: the step
    starts from zero, as if its document were run alone)."""
    if mask is not None:
        a, b = identity_where_masked(a, b, mask)
    if reset is not None:
        a = torch.where(reset.unsqueeze(-1), torch.zeros((), dtype=a.dtype, device=a.device), a)
    return a, b


CELLS: dict[str, CellSpec] = {}


def register_cell(spec: CellSpec) -> None:
    """Add ``spec`` to ``CELLS`` under its name (a later spec of the same name replaces it)."""
    CELLS[spec.name] = spec


def get_cell(cell: str | CellSpec) -> CellSpec:
    """The CellSpec named ``cell`` (a CellSpec passes through)."""
    if isinstance(cell, CellSpec):
        return cell
    if not isinstance(cell, str) or cell not in CELLS:
        raise ValueError(f"cell must be one of {sorted(CELLS)}, got {cell!r}")
    return CELLS[cell]


register_cell(CellSpec("mingru", ("hidden", "gate"), mingru_gates, mingru_log_gates,
                       decay_slot=1, decay_bias_sign=-1.0, doc="a = 1 - sigmoid(gate), b = sigmoid(gate) g(hidden)"))
register_cell(CellSpec("minlstm", ("hidden", "forget", "input"), minlstm_gates, minlstm_log_gates,
                       decay_slot=1, decay_bias_sign=1.0, option_names=("normalize",), option_defaults=(True,), default_decay_bias=3.0,
                       doc="a = f', b = i' g(hidden), f' and i' normalised to sum 1 when normalize"))
register_cell(CellSpec("mingru_signed", ("hidden", "gate"), mingru_signed_gates, None,
                       decay_slot=1, decay_bias_sign=-1.0, signed=True,
                       doc="a = 1 - 2 sigmoid(gate) in (-1, 1), b = sigmoid(gate) g(hidden)"))
register_cell(CellSpec("minlstm_signed", ("hidden", "forget", "input"), minlstm_signed_gates, None,
                       decay_slot=1, decay_bias_sign=1.0, option_names=("normalize",), option_defaults=(True,),
                       signed=True, default_decay_bias=3.0, doc="a = 2f' - 1 in (-1, 1), b = i' g(hidden), f' and i' as minlstm's"))
