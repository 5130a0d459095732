"""minGRU and minLSTM as functions of their pre-activations (no parameters).

The cells themselves (their gates, pre-activations and options) are described once, in
``minrnn.ops.cells``; this module runs any of them over a sequence or one step, on any
scan backend. See that module for the equations.

Layout: pre-activations are (B, T, C); h0 is (B, C); a padding mask is (B, T) bool with
False for padding. h0 is a state, a value of h: it is never passed through g (that is the
usual bug that makes parallel and step mode disagree once a state is carried between
calls). A padded position is the identity of the recurrence (a = 1, b = 0): the state
passes through it unchanged. A document start (``reset`` (B, T) bool, True at a document's
first token) forgets the state before it (a = 0, so h = b there): documents packed in one row
give what each gives alone. Both are masks of the same kind, applied to the gates
(``minrnn.ops.cells.apply_boundaries``) or inside a backend's kernels.

float16/bfloat16 inputs are computed in float32; h comes back in the input dtype and the
final state stays float32 so that a state carried across calls is not rounded.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .ops import check_backend_takes_cell, resolve_backend
from .ops.cells import (  # noqa: F401  (the gates are part of this module's API)
    CELLS,
    CellSpec,
    apply_boundaries,
    g,
    get_cell,
    identity_where_masked,
    log_g,
    mingru_gates,
    mingru_log_gates,
    minlstm_gates,
    minlstm_log_gates,
)
from .ops.checks import (
    accumulation_dtype,
    check_finite_state,
    check_float_tensor,
    check_mask,
    check_reset,
    check_sequences,
    state_dtype,
)

_MODES = ("parallel", "sequential")


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
        # a gate that depends on none of the wanted inputs (minGRU's a when only hidden is
        # wanted) has no graph: it is left out rather than differentiated
        outputs = [(t, dt) for t, dt in ((a, G * h_prev), (b, G)) if t.requires_grad]
        grads = iter(torch.autograd.grad([t for t, _ in outputs], wanted, [dt for _, dt in outputs],
                                         allow_unused=True) if wanted and outputs else ())
        grads = [next(grads, None) if p.requires_grad else None for p in pre_]
        grads = [torch.zeros_like(p) if p.requires_grad and gr is None else gr for p, gr in zip(pre_, grads)]
        return (None, None, dh0, *grads)


def _empty_result(pre: tuple[Tensor, ...], h0: Tensor | None, in_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """An empty batch or sequence: h (B, T, C) with nothing in it (still in the inputs' graph,
    so a backward through it runs), and the final state = h0 (zeros when None)."""
    B, T, C = pre[0].shape
    last = pre[0].new_zeros(B, C) if h0 is None else h0
    return sum(p * 0 for p in pre).to(in_dtype), last


def _cell_name(base: str, signed) -> str:
    if not isinstance(signed, bool):
        raise TypeError(f"signed must be True or False, got {signed!r}")
    return f"{base}_signed" if signed else base


def run_cell(cell: str | CellSpec, pre: tuple[Tensor, ...], h0: Tensor | None = None, *, mask: Tensor | None = None,
             reset: Tensor | None = None, mode: str = "parallel", backend: str = "auto",
             **options) -> tuple[Tensor, Tensor]:
    """Any cell over a sequence.

    Args:
        cell: a name in ``minrnn.ops.cells.CELLS`` ("mingru", "minlstm", "mingru_signed",
            "minlstm_signed") or a CellSpec.
        pre: the cell's pre-activations, one (B, T, C) tensor per name in its ``pre_names``.
        h0: (B, C) start state (a value of h), zeros when None; float32 beside half inputs.
        mask: (B, T) bool, False where a position is padding (an identity step), or None.
        reset: (B, T) bool, True where a document starts (the state before it is forgotten:
            a = 0), or None. A reset at t = 0 ignores h0.
        mode: "parallel" (a scan backend) or "sequential" (the step loop).
        backend: scan backend for mode="parallel"; see ``minrnn.scan``. A signed cell
            (transitions in (-1, 1)) on backend "log" is a ValueError.
        options: the cell's options (minLSTM: ``normalize``).
    Returns:
        (h, h_last): h (B, T, C) in the inputs' dtype, h_last (B, C) the final state in the
        accumulation dtype (float32 for half inputs).
    """
    spec = get_cell(cell)
    opts = spec.options(**options)
    pre = tuple(pre)
    if len(pre) != spec.n_pre:
        raise ValueError(f"cell {spec.name!r} takes {spec.n_pre} pre-activations {spec.pre_names}, got {len(pre)}")
    in_dtype = pre[0].dtype if isinstance(pre[0], Tensor) else None
    check_sequences(spec.pre_names, pre, h0, h0_dtypes=(accumulation_dtype(in_dtype),) if in_dtype else ())
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
    B, T, _ = pre[0].shape
    check_mask(mask, (B, T), pre[0].device, "(batch, time)")
    check_reset(reset, (B, T), pre[0].device, "(batch, time)")
    check_finite_state(h0)
    cdt = accumulation_dtype(in_dtype)
    pre = tuple(p.to(cdt) for p in pre)
    if h0 is not None:
        h0 = h0.to(cdt)
    if B == 0 or T == 0:
        return _empty_result(pre, h0, in_dtype)
    if mode == "sequential":
        h, out = h0, []
        masks = mask.unbind(1) if mask is not None else [None] * T
        resets = reset.unbind(1) if reset is not None else [None] * T
        for step, m, r in zip(zip(*(p.unbind(1) for p in pre)), masks, resets):  # unbind: see ops/reference.py
            h = spec.step(step, h, opts, m, r)
            out.append(h)
        h = torch.stack(out, dim=1)
    else:
        be = resolve_backend(backend, pre[0].device)
        check_backend_takes_cell(spec, be)
        if be.runs_cell(spec, masked=mask is not None, resets=reset is not None):
            # a backend that takes no resets is never handed the keyword
            h = be.cell(spec, pre, h0, opts, mask) if reset is None else be.cell(spec, pre, h0, opts, mask, reset=reset)
        else:
            def gates(*p):
                return apply_boundaries(*spec.gates(*p, *opts), mask, reset)

            if torch.compiler.is_compiling():
                # dynamo cannot trace the autograd.grad call in _RecomputeGates' backward; the
                # compiler traces the gates and the scan as they are (it fuses the gates itself)
                h = be.fn(*gates(*pre), h0)
            else:
                h = _RecomputeGates.apply(gates, be.fn, h0, *pre)
    return h.to(in_dtype), h[:, -1]


def mingru(hidden: Tensor, gate: Tensor, h0: Tensor | None = None, *, mask: Tensor | None = None,
           reset: Tensor | None = None, mode: str = "parallel", backend: str = "auto",
           signed: bool = False) -> tuple[Tensor, Tensor]:
    """minGRU over a sequence.

    Args:
        hidden: (B, T, C) candidate pre-activation h~ (g() is applied here).
        gate: (B, T, C) update-gate pre-activation (z = sigmoid(gate)).
        h0: (B, C) start state (a value of h, not passed through g), zeros when None.
        mask: (B, T) bool, False at padded positions (identity steps), or None.
        reset: (B, T) bool, True where a document starts (the state is forgotten), or None.
        mode: "parallel" (a scan backend) or "sequential" (the step loop).
        backend: scan backend for mode="parallel"; see ``minrnn.scan``.
        signed: the "mingru_signed" cell, a = 1 - 2z in (-1, 1) (not on backend "log").
    Returns:
        (h, h_last): h (B, T, C) every state, h_last (B, C) the final one.
    """
    return run_cell(_cell_name("mingru", signed), (hidden, gate), h0, mask=mask, reset=reset, mode=mode,
                    backend=backend)


def minlstm(hidden: Tensor, forget: Tensor, input: Tensor, h0: Tensor | None = None, *,
            normalize: bool = True, mask: Tensor | None = None, reset: Tensor | None = None,
            mode: str = "parallel", backend: str = "auto", signed: bool = False) -> tuple[Tensor, Tensor]:
    """minLSTM over a sequence.

    Args:
        hidden: (B, T, C) candidate pre-activation (g() is applied here).
        forget, input: (B, T, C) forget- and input-gate pre-activations.
        h0: (B, C) start state (not passed through g), zeros when None.
        normalize: use f/(f+i), i/(f+i) (the paper's equations) rather than f, i.
        mask, reset, mode, backend: as in ``mingru``.
        signed: the "minlstm_signed" cell, a = 2f' - 1 in (-1, 1) (not on backend "log").
    Returns:
        (h, h_last): h (B, T, C), h_last (B, C).
    """
    return run_cell(_cell_name("minlstm", signed), (hidden, forget, input), h0, mask=mask, reset=reset, mode=mode,
                    backend=backend, normalize=normalize)


def projected_cell(cell: str | CellSpec, x: Tensor, weight: Tensor, bias: Tensor | None = None,
                   h0: Tensor | None = None, *, mask: Tensor | None = None, reset: Tensor | None = None,
                   backend: str = "auto", **options) -> tuple[Tensor, Tensor]:
    """A layer: the input projection ``F.linear(x, weight, bias)``, split into the cell's
    pre-activations, then the cell.

    Args:
        cell: "mingru" (pre-activations [hidden | gate], n = 2), "minlstm"
            ([hidden | forget | input], n = 3) or any CellSpec.
        x: (B, T, I) inputs.
        weight: (n*C, I); bias: (n*C,) or None.
        h0: (B, C) start state, zeros when None.
        mask: (B, T) bool, False at padded positions (identity steps), or None.
        reset: (B, T) bool, True where a document starts (the state is forgotten), or None.
        backend: as in ``mingru``.
        options: the cell's options (minLSTM: ``normalize``).
    Returns:
        (h, h_last): h (B, T, C), h_last (B, C).

    Same values as ``run_cell(cell, F.linear(x, weight, bias).chunk(n, -1), h0)``. A backend
    with a fused projected cell (``cpu``) runs the matmul and the cell as one autograd
    Function whose kernels add the bias and sum its gradient, which saves two passes over the
    pre-activations; float32/float64 without autocast or mask (and without resets unless the
    backend's kernels take them), anything else takes the composed path.
    """
    spec = get_cell(cell)
    opts = spec.options(**options)
    n = spec.n_pre
    for name, t in (("x", x), ("weight", weight)) + ((("bias", bias),) if bias is not None else ()):
        check_float_tensor(name, t)
    if x.dim() != 3:
        raise ValueError(f"x must be (batch, time, input_size), got shape {tuple(x.shape)}")
    if weight.dim() != 2 or weight.shape[1] != x.shape[-1] or weight.shape[0] % n:
        raise ValueError(f"weight must be ({n} * hidden_size, input_size={x.shape[-1]}) for {spec.name}, "
                         f"got shape {tuple(weight.shape)}")
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(f"bias must be ({weight.shape[0]},) to match weight, got shape {tuple(bias.shape)}")
    be = resolve_backend(backend, x.device)
    check_backend_takes_cell(spec, be)
    dt = x.dtype
    B, T, _ = x.shape
    if (mask is None and be.projected_cell is not None and be.runs_cell(spec, resets=reset is not None) and B * T > 0
            and dt in (torch.float32, torch.float64) and weight.dtype == dt
            and (bias is None or bias.dtype == dt) and weight.device == x.device
            and (bias is None or bias.device == x.device) and not torch.is_autocast_enabled(x.device.type)):
        # h0 is checked as the composed path would check it, against a (B, T, C) stand-in
        # that owns no memory
        check_sequences(("x",), (x.new_empty(()).expand(B, T, weight.shape[0] // n),), h0)
        check_finite_state(h0)
        if reset is None:
            h = be.projected_cell(spec, x, weight, bias, h0, opts)
        else:
            check_reset(reset, (B, T), x.device, "(batch, time)")
            h = be.projected_cell(spec, x, weight, bias, h0, opts, reset=reset)
        return h, h[:, -1]
    return cell_on_pre_activations(spec, F.linear(x, weight, bias), h0, mask=mask, reset=reset, backend=backend,
                                   **options)


def cell_on_pre_activations(cell: str | CellSpec, pre: Tensor, h0: Tensor | None = None, *,
                            mask: Tensor | None = None, reset: Tensor | None = None, backend: str = "auto",
                            **options) -> tuple[Tensor, Tensor]:
    """The cell on one packed tensor of pre-activations (B, T, n*C), split into its n chunks."""
    spec = get_cell(cell)
    return run_cell(spec, pre.chunk(spec.n_pre, dim=-1), h0, mask=mask, reset=reset, backend=backend, **options)


# --- one step (decoding) -------------------------------------------------------------


def _check_step(names, tensors, h, mask):
    for name, x in zip(names, tensors):
        check_float_tensor(name, x)
        if x.dim() != 2 or x.shape != tensors[0].shape:
            raise ValueError(f"{name} must be (batch, channels) like {names[0]} {tuple(tensors[0].shape)}, "
                             f"got {tuple(x.shape)}")
    if h is not None and (not isinstance(h, Tensor) or h.shape != tensors[0].shape):
        raise ValueError(f"h must be (batch, channels) = {tuple(tensors[0].shape)}, "
                         f"got {tuple(h.shape) if isinstance(h, Tensor) else type(h).__name__}")
    check_mask(mask, tensors[0].shape[:1], tensors[0].device, "(batch,)")


def cell_step(cell: str | CellSpec, pre_t: tuple[Tensor, ...], h: Tensor | None = None, *,
              mask: Tensor | None = None, **options) -> Tensor:
    """One step of any cell: pre_t one (B, C) tensor per pre-activation, h (B, C) or None
    (zeros), mask (B,) bool (False: the step is the identity) -> the new h (B, C).

    The state is computed in the accumulation dtype (float32 for half inputs) or h's dtype
    if wider, and returned in it: a state carried across steps is never rounded to half."""
    spec = get_cell(cell)
    opts = spec.options(**options)
    pre_t = tuple(pre_t)
    if len(pre_t) != spec.n_pre:
        raise ValueError(f"cell {spec.name!r} takes {spec.n_pre} pre-activations {spec.pre_names}, got {len(pre_t)}")
    _check_step(tuple(n + "_t" for n in spec.pre_names), pre_t, h, mask)
    cdt = state_dtype(pre_t[0].dtype, h)
    return spec.step(tuple(p.to(cdt) for p in pre_t), None if h is None else h.to(cdt), opts, mask)


def mingru_step(hidden_t: Tensor, gate_t: Tensor, h: Tensor | None = None, *, mask: Tensor | None = None,
                signed: bool = False) -> Tensor:
    """One minGRU step (``signed``: mingru_signed's). hidden_t, gate_t, h: (B, C) (h None means
    zeros). Returns the new h (B, C)."""
    return cell_step(_cell_name("mingru", signed), (hidden_t, gate_t), h, mask=mask)


def minlstm_step(hidden_t: Tensor, forget_t: Tensor, input_t: Tensor, h: Tensor | None = None, *,
                 normalize: bool = True, mask: Tensor | None = None, signed: bool = False) -> Tensor:
    """One minLSTM step (``signed``: minlstm_signed's). All (B, C); returns the new h (B, C)."""
    return cell_step(_cell_name("minlstm", signed), (hidden_t, forget_t, input_t), h, mask=mask, normalize=normalize)
