"""minGRU and minLSTM as functions of their pre-activations (no parameters).

Feng et al. 2024 ("Were RNNs All We Needed?", arXiv 2410.01201), with the gates
depending on x_t only, so both cells are the scan h_t = a_t h_{t-1} + b_t:

    minGRU:   z = sigmoid(gate)
              a = 1 - z,  b = z * g(hidden)
    minLSTM:  f = sigmoid(forget), i = sigmoid(input)
              normalize: a = f / (f + i),  i' = i / (f + i)     else a = f, i' = i
              b = i' * g(hidden)

    g(x) = x + 0.5 (x >= 0),  sigmoid(x) (x < 0)       -- continuous, positive

Layout: hidden, gate, forget, input are (B, T, C); h0 is (B, C). h0 is a state, a value
of h: it is never passed through g (that is the usual bug that makes parallel and step
mode disagree once a state is carried between calls).

Numerics: the normalised minLSTM gates are computed as sigmoid(logsigmoid(f) -
logsigmoid(i)), which is f/(f+i) without forming f + i; the log-space path uses
softplus/logsigmoid forms throughout and never takes the log of a sigmoid, so
saturated pre-activations (|x| ~ 50) give no inf or NaN.

float16/bfloat16 inputs are computed in float32; h comes back in the input dtype and
the final state stays float32 so that a state carried across calls is not rounded.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .ops import accumulation_dtype, check_sequences, resolve_backend
from .ops.log import scan_from_logs

_MODES = ("parallel", "sequential")


def g(x: Tensor) -> Tensor:
    """g(x) = x + 0.5 for x >= 0, sigmoid(x) for x < 0 (the paper's positive candidate map)."""
    return torch.where(x >= 0, x + 0.5, torch.sigmoid(x))


def log_g(x: Tensor) -> Tensor:
    """log g(x), computed without a log of a sigmoid (relu keeps the unused branch finite)."""
    return torch.where(x >= 0, torch.log(F.relu(x) + 0.5), -F.softplus(-x))


# --- gates: pre-activations -> (a, b) or (log a, log b) -------------------------------
#
# Each cell defines its two gates in log form, (log a, log i), from logsigmoid/softplus.
# The plain gates are exp() of those, not sigmoid(): autograd's sigmoid backward is
# y (1 - y), which rounds to 0 once y rounds to 1 (|x| > ~17 in float32), while
# exp(logsigmoid(x)) differentiates to sigmoid(x) sigmoid(-x) computed from two
# accurate factors. Saturated gates thus keep exact tiny gradients, not zeros.


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


# --- whole sequences -----------------------------------------------------------------


class _RecomputeGates(torch.autograd.Function):
    """Any scan backend as a cell whose backward recomputes the gates instead of storing them.

    Saved for backward: the pre-activations, h0 and h, as a fused kernel would. The
    backward is itself a scan, run in reverse with the same backend:
    G_t = dL/dh_t + a_{t+1} G_{t+1}, then dL/da_t = G_t h_{t-1}, dL/db_t = G_t, dL/dh0 = a_1 G_1,
    and autograd carries (dL/da, dL/db) back through the recomputed gates.
    """

    @staticmethod
    def forward(ctx, gates, scan_fn, h0, *pre):
        a, b = gates(*pre)
        h = scan_fn(a, b, h0)
        ctx.gates, ctx.scan_fn = gates, scan_fn
        ctx.save_for_backward(h, h0, *pre)
        return h

    @staticmethod
    def backward(ctx, dh):
        h, h0, *pre = ctx.saved_tensors
        with torch.enable_grad():
            pre_ = [p.detach().requires_grad_(need) for p, need in zip(pre, ctx.needs_input_grad[3:])]
            a, b = ctx.gates(*pre_)
        a_next = torch.cat([a[:, 1:], torch.zeros_like(a[:, :1])], dim=1).detach()
        G = ctx.scan_fn(a_next.flip(1), dh.flip(1), None).flip(1)
        start = torch.zeros_like(h[:, :1]) if h0 is None else h0.unsqueeze(1)
        h_prev = torch.cat([start, h[:, :-1]], dim=1)
        dh0 = a[:, 0].detach() * G[:, 0] if h0 is not None and ctx.needs_input_grad[2] else None
        wanted = [p for p in pre_ if p.requires_grad]
        grads = iter(torch.autograd.grad((a, b), wanted, (G * h_prev, G)) if wanted else ())
        return (None, None, dh0, *[next(grads) if p.requires_grad else None for p in pre_])


def _run(gates, log_gates, pre: tuple[Tensor, ...], names, h0, mode, backend, fused=None):
    check_sequences(names, pre, h0, h0_dtypes=(accumulation_dtype(pre[0].dtype),) if isinstance(pre[0], torch.Tensor) else ())
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
    in_dtype = pre[0].dtype
    cdt = accumulation_dtype(in_dtype)
    pre = tuple(p.to(cdt) for p in pre)
    if h0 is not None:
        h0 = h0.to(cdt)
    if mode == "sequential":
        h = torch.zeros_like(pre[0][:, 0]) if h0 is None else h0
        out = []
        for step in zip(*(p.unbind(1) for p in pre)):  # unbind: see ops/reference.py
            a, b = gates(*step)
            h = a * h + b
            out.append(h)
        h = torch.stack(out, dim=1)
    else:
        be = resolve_backend(backend, pre[0].device)
        if be.name == "log":
            if h0 is not None and not bool((h0 >= 0).all()):
                raise ValueError(
                    "h0 has negative entries, which backend='log' cannot represent; "
                    "use backend='chunked' (or 'auto')"
                )
            h = scan_from_logs(*log_gates(*pre), h0)
        elif be.name == "sequential":
            h = be.fn(*gates(*pre), h0)  # plain autograd through the loop: the reference
        elif fused is not None and getattr(be, fused[0]) is not None:
            h = getattr(be, fused[0])(*pre, h0, *fused[1:])
        else:
            h = _RecomputeGates.apply(gates, be.fn, h0, *pre)
    return h.to(in_dtype), h[:, -1]


def mingru(hidden: Tensor, gate: Tensor, h0: Tensor | None = None, *, mode: str = "parallel",
           backend: str = "auto") -> tuple[Tensor, Tensor]:
    """minGRU over a sequence.

    Args:
        hidden: (B, T, C) candidate pre-activation h~ (g() is applied here).
        gate: (B, T, C) update-gate pre-activation (z = sigmoid(gate)).
        h0: (B, C) start state (a value of h, not passed through g), zeros when None.
        mode: "parallel" (a scan backend) or "sequential" (the step loop).
        backend: scan backend for mode="parallel"; see ``minrnn.scan``.
    Returns:
        (h, h_last): h (B, T, C) every state, h_last (B, C) the final one.
    """
    return _run(mingru_gates, mingru_log_gates, (hidden, gate), ("hidden", "gate"), h0, mode, backend,
                fused=("mingru",))


def minlstm(hidden: Tensor, forget: Tensor, input: Tensor, h0: Tensor | None = None, *,
            normalize: bool = True, mode: str = "parallel", backend: str = "auto") -> tuple[Tensor, Tensor]:
    """minLSTM over a sequence.

    Args:
        hidden: (B, T, C) candidate pre-activation (g() is applied here).
        forget, input: (B, T, C) forget- and input-gate pre-activations.
        h0: (B, C) start state (not passed through g), zeros when None.
        normalize: use f/(f+i), i/(f+i) (the paper's equations) rather than f, i.
        mode, backend: as in ``mingru``.
    Returns:
        (h, h_last): h (B, T, C), h_last (B, C).
    """
    return _run(
        lambda h, f, i: minlstm_gates(h, f, i, normalize),
        lambda h, f, i: minlstm_log_gates(h, f, i, normalize),
        (hidden, forget, input), ("hidden", "forget", "input"), h0, mode, backend, fused=("minlstm", normalize),
    )


def projected_cell(cell: str, x: Tensor, weight: Tensor, bias: Tensor | None = None, h0: Tensor | None = None, *,
                   normalize: bool = True, backend: str = "auto") -> tuple[Tensor, Tensor]:
    """A layer: the input projection ``F.linear(x, weight, bias)``, split into the cell's
    pre-activations, then the cell.

    Args:
        cell: "mingru" (pre-activations [hidden | gate], n = 2) or "minlstm"
            ([hidden | forget | input], n = 3).
        x: (B, T, I) inputs.
        weight: (n*C, I); bias: (n*C,) or None.
        h0: (B, C) start state, zeros when None.
        normalize: minLSTM's gate normalisation (ignored for minGRU).
        backend: as in ``mingru``.
    Returns:
        (h, h_last): h (B, T, C), h_last (B, C).

    Same values as ``mingru(*F.linear(x, weight, bias).chunk(2, -1), h0)`` (or minlstm's).
    A backend with a fused projected cell (``cpu``) runs the matmul and the cell as one
    autograd Function whose kernels add the bias and sum its gradient, which saves two
    passes over the pre-activations; float32/float64 without autocast only, anything
    else takes the composed path.
    """
    if cell not in ("mingru", "minlstm"):
        raise ValueError(f"cell must be 'mingru' or 'minlstm', got {cell!r}")
    n = 2 if cell == "mingru" else 3
    for name, t in (("x", x), ("weight", weight)) + ((("bias", bias),) if bias is not None else ()):
        if not isinstance(t, Tensor) or not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point torch.Tensor, got "
                            f"{t.dtype if isinstance(t, Tensor) else type(t).__name__}")
    if x.dim() != 3:
        raise ValueError(f"x must be (batch, time, input_size), got shape {tuple(x.shape)}")
    if weight.dim() != 2 or weight.shape[1] != x.shape[-1] or weight.shape[0] % n:
        raise ValueError(f"weight must be ({n} * hidden_size, input_size={x.shape[-1]}) for {cell}, "
                         f"got shape {tuple(weight.shape)}")
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(f"bias must be ({weight.shape[0]},) to match weight, got shape {tuple(bias.shape)}")
    be = resolve_backend(backend, x.device)
    dt = x.dtype
    if (be.projected_cell is not None and dt in (torch.float32, torch.float64) and weight.dtype == dt
            and (bias is None or bias.dtype == dt) and weight.device == x.device
            and (bias is None or bias.device == x.device) and not torch.is_autocast_enabled(x.device.type)):
        B, T, _ = x.shape
        # h0 is checked as the composed path would check it, against a (B, T, C) stand-in
        # that owns no memory
        check_sequences(("x",), (x.new_empty(()).expand(B, T, weight.shape[0] // n),), h0)
        h = be.projected_cell(cell, x, weight, bias, h0, normalize)
        return h, h[:, -1]
    return cell_on_pre_activations(cell, F.linear(x, weight, bias), h0, normalize=normalize, backend=backend)


def cell_on_pre_activations(cell: str, pre: Tensor, h0: Tensor | None = None, *, normalize: bool = True,
                            backend: str = "auto") -> tuple[Tensor, Tensor]:
    """The cell on one packed tensor of pre-activations (B, T, n*C), split into its n chunks."""
    chunks = pre.chunk(2 if cell == "mingru" else 3, dim=-1)
    if cell == "mingru":
        return mingru(*chunks, h0, backend=backend)
    return minlstm(*chunks, h0, normalize=normalize, backend=backend)


# --- one step (decoding) -------------------------------------------------------------


def _check_step(names, tensors, h):
    for name, x in zip(names, tensors):
        if not isinstance(x, Tensor) or not x.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor")
        if x.dim() != 2 or x.shape != tensors[0].shape:
            raise ValueError(f"{name} must be (batch, channels) like {names[0]} {tuple(tensors[0].shape)}, "
                             f"got {tuple(x.shape)}")
    if h is not None and (not isinstance(h, Tensor) or h.shape != tensors[0].shape):
        raise ValueError(f"h must be (batch, channels) = {tuple(tensors[0].shape)}, "
                         f"got {tuple(h.shape) if isinstance(h, Tensor) else type(h).__name__}")


def _step(gates, pre, h):
    cdt = accumulation_dtype(pre[0].dtype)
    if h is not None:
        cdt = torch.promote_types(cdt, h.dtype)
    a, b = gates(*(p.to(cdt) for p in pre))
    return b if h is None else a * h.to(cdt) + b


def mingru_step(hidden_t: Tensor, gate_t: Tensor, h: Tensor | None = None) -> Tensor:
    """One minGRU step. hidden_t, gate_t, h: (B, C) (h None means zeros). Returns the new h (B, C)."""
    _check_step(("hidden_t", "gate_t"), (hidden_t, gate_t), h)
    return _step(mingru_gates, (hidden_t, gate_t), h)


def minlstm_step(hidden_t: Tensor, forget_t: Tensor, input_t: Tensor, h: Tensor | None = None, *,
                 normalize: bool = True) -> Tensor:
    """One minLSTM step. All (B, C); returns the new h (B, C)."""
    _check_step(("hidden_t", "forget_t", "input_t"), (hidden_t, forget_t, input_t), h)
    return _step(lambda x, f, i: minlstm_gates(x, f, i, normalize), (hidden_t, forget_t, input_t), h)
