"""The CPU kernels as autograd Functions, and the public ops built on them.

Why fused: a minGRU layer is one matmul plus elementwise work. Done as separate torch ops,
the gates cost a dozen passes over memory and autograd stores every intermediate. Here one
forward kernel reads the pre-activations and writes h; one backward kernel reads the
pre-activations, h and dL/dh and writes dL/d(pre-activations), recomputing the gates on the
fly. A layer goes one step further (``cpu_projected_cell``): its matmul runs without the
bias, the kernels add the bias as they read each pre-activation and sum dL/dbias as they
write dL/dpre, so neither costs a pass of its own, and the pre-activations, which the
Function owns, are its only (B, T, n*C) buffer: the forward kernel overwrites them with the
forms the backward reads, and the backward kernel writes dL/dpre over those.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ..cells import get_cell
from ..packing import pack_chunks
from . import kernels
from .launch import channel_block, contiguous_strides, flat_view, launch, new_output

_NP_DTYPES = {torch.float32: np.float32, torch.float64: np.float64}


@dataclass(frozen=True)
class _CellKernels:
    """A cell's three kernels. Their arguments, in order: the pre-activation columns (each
    followed by the strides they share), then per kernel

    forward:           bias, h0, reset, *options, keep, h, h strides, B, T, C, block
    backward:          bias, h, h strides, h0, reset, dh, dh strides, *options, dpre columns,
                       dpre strides, dh0, dbias, B, T, C, block
    backward_in_place: h, h strides, h0, reset, dh, dh strides, *options, dh0, dbias, B, T, C, block

    reset: the document starts as ``_reset_array`` gives them.
    """

    forward: Callable
    backward: Callable
    backward_in_place: Callable


_CELL_KERNELS = {
    "mingru": _CellKernels(kernels.mingru_fwd, kernels.mingru_bwd, kernels.mingru_bwd_in_place),
    "minlstm": _CellKernels(kernels.minlstm_fwd, kernels.minlstm_bwd, kernels.minlstm_bwd_in_place),
}
#: The cells these kernels compute (the others run through ``cpu_scan``).
FUSED_CELLS = frozenset(_CELL_KERNELS)


def _check_dtype(dtype: torch.dtype) -> None:
    if dtype not in _NP_DTYPES:
        raise TypeError(f"backend 'cpu' computes float32 and float64, got {dtype}")


def _start(h0: Tensor | None, like: Tensor) -> Tensor:
    """The start state as the kernels read it: h0, or zeros (B, C)."""
    return like.new_zeros(like.shape[0], like.shape[2]) if h0 is None else h0.detach().contiguous()


def _dims(B: int, T: int, C: int) -> tuple[int, int, int, int]:
    return B, T, C, channel_block(B, C)


def _column_args(pre: Tensor, n: int) -> list:
    """Packed (B, T, n*C) ``pre`` as the cell kernels take it: each column block's flat view
    followed by the strides they share."""
    flat, strides = flat_view(pre)
    C = pre.shape[-1] // n
    return [a for j in range(n) for a in (flat[j * C:], strides)]


# the kernels' "no document starts": one array of one type for every call, so that both
# cases share one compiled kernel
_NO_RESETS = np.zeros((0, 0), dtype=np.uint8)


def _reset_array(reset: Tensor | None) -> np.ndarray:
    """Document starts (B, T) bool, or None, as the kernels read them: (B, T) uint8, 1 where
    a document starts, or a (0, 0) array for none."""
    return _NO_RESETS if reset is None else reset.detach().contiguous().view(torch.uint8).numpy()


def _bias_array(bias: Tensor | None, size: int, dtype: torch.dtype):
    return np.zeros(size, dtype=_NP_DTYPES[dtype]) if bias is None else bias.detach().contiguous().numpy()


def _scan_forward(a: Tensor, b: Tensor, start: Tensor) -> Tensor:
    """The scan's forward kernel: a, b (B, T, C), start (B, C) contiguous -> h (B, T, C)."""
    h = new_output(tuple(a.shape), a.dtype)
    launch(kernels.scan_fwd, a.numel(), *flat_view(a), *flat_view(b), start.numpy(),
           h.view(-1).numpy(), contiguous_strides(*a.shape), *_dims(*a.shape))
    return h


def _scan_backward(a: Tensor, h: Tensor, start: Tensor, dh: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The scan's backward kernel: (dL/da, dL/db (B, T, C), dL/dh0 (B, C))."""
    da, db = new_output(tuple(h.shape), h.dtype), new_output(tuple(h.shape), h.dtype)
    dh0 = torch.empty_like(start)
    launch(kernels.scan_bwd, a.numel(), *flat_view(a), *flat_view(h), start.numpy(), *flat_view(dh),
           da.view(-1).numpy(), db.view(-1).numpy(), contiguous_strides(*a.shape), dh0.numpy(), *_dims(*a.shape))
    return da, db, dh0


class _Scan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, h0):
        _check_dtype(a.dtype)
        start = _start(h0, a)
        h = _scan_forward(a, b, start)
        ctx.save_for_backward(a, h, start)
        ctx.has_h0 = h0 is not None
        return h

    @staticmethod
    @once_differentiable
    def backward(ctx, dh):
        a, h, start = ctx.saved_tensors
        da, db, dh0 = _scan_backward(a, h, start, dh)
        return da, db, (dh0 if ctx.has_h0 else None)


def cpu_scan(a: Tensor, b: Tensor, h0: Tensor | None = None) -> Tensor:
    """h_t = a_t h_{t-1} + b_t with the CPU kernels; differentiable in a, b and h0.

    Args:
        a, b: (B, T, C) float32 or float64 CPU tensors, channel stride 1 (else copied).
        h0: (B, C) start state of their dtype, or None for zeros.
    Returns:
        h: (B, T, C), contiguous.

    Saved for backward: a, h and the start state (not b). Inputs are assumed validated
    (``minrnn.scan`` does it). Under torch.compile it is the custom op ``minrnn::cpu_scan``
    (``library.py``).
    """
    if torch.compiler.is_compiling():
        return torch.ops.minrnn.cpu_scan(a, b, h0)
    return _Scan.apply(a, b, h0)


def _cell_forward(pre: Tensor, bias: Tensor | None, h0: Tensor | None, spec, options: tuple, keep: bool,
                  h: Tensor | None = None, reset: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The forward kernel on packed pre-activations (B, T, n*C) plus ``bias`` (n*C,) or None:
    (h (B, T, C), the start state it used (B, C)). ``keep``: overwrite ``pre`` with what
    ``_cell_backward(in_place=True)`` reads (the exps, bias added). ``h``: a buffer to write h
    into (a new one when None). ``reset``: (B, T) bool, True where a document starts, or None."""
    _check_dtype(pre.dtype)
    n = spec.n_pre
    B, T, nC = pre.shape
    C = nC // n
    start = _start(h0, pre[..., :C])
    if h is None:
        h = new_output((B, T, C), pre.dtype)
    launch(_CELL_KERNELS[spec.name].forward, h.numel(),
           *_column_args(pre, n), _bias_array(bias, nC, pre.dtype), start.numpy(), _reset_array(reset), *options,
           bool(keep),
           h.view(-1).numpy(), contiguous_strides(B, T, C), *_dims(B, T, C))
    return h, start


def _cell_backward(pre: Tensor, bias: Tensor | None, h: Tensor, start: Tensor, dh: Tensor, spec, options: tuple,
                   in_place: bool = False, reset: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """The backward kernel: (dL/dpre (B, T, n*C), dL/dbias per batch row (B, n*C), dL/dh0 (B, C)).

    ``in_place``: dL/dpre is written over ``pre`` (and returned), which holds what
    ``_cell_forward(keep=True)`` left there (``bias`` is then already in it, and unused).
    ``reset``: the forward's document starts."""
    n = spec.n_pre
    B, T, C = h.shape
    cell_kernels = _CELL_KERNELS[spec.name]
    dbias = torch.empty(B, n * C, dtype=pre.dtype)  # one row per batch row: no two threads share one
    dh0 = torch.empty_like(start)
    state_args = (*flat_view(h), start.numpy(), _reset_array(reset), *flat_view(dh), *options)
    if in_place:
        launch(cell_kernels.backward_in_place, h.numel(),
               *_column_args(pre, n), *state_args, dh0.numpy(), dbias.numpy(), *_dims(B, T, C))
        return pre, dbias, dh0
    dpre = new_output(tuple(pre.shape), pre.dtype)
    dpre_columns = _column_args(dpre, n)
    launch(cell_kernels.backward, h.numel(),
           *_column_args(pre, n), _bias_array(bias, n * C, pre.dtype), *state_args,
           *dpre_columns[0::2], dpre_columns[1], dh0.numpy(), dbias.numpy(), *_dims(B, T, C))
    return dpre, dbias, dh0


class _Cell(torch.autograd.Function):
    """A fused cell over packed pre-activations (B, T, n*C), left intact."""

    @staticmethod
    def forward(ctx, pre, h0, spec, options, reset):
        h, start = _cell_forward(pre, None, h0, spec, options, keep=False, reset=reset)
        ctx.save_for_backward(pre, h, start, reset)
        ctx.spec, ctx.options, ctx.has_h0 = spec, options, h0 is not None
        return h

    @staticmethod
    @once_differentiable
    def backward(ctx, dh):
        pre, h, start, reset = ctx.saved_tensors
        dpre, _, dh0 = _cell_backward(pre, None, h, start, dh, ctx.spec, ctx.options, reset=reset)
        return dpre, (dh0 if ctx.has_h0 else None), None, None, None


def cpu_cell(spec, pre: tuple[Tensor, ...], h0: Tensor | None, options: tuple, mask=None,
             reset: Tensor | None = None) -> Tensor:
    """A fused cell (``spec`` one of FUSED_CELLS) over its pre-activations.

    Args:
        spec: the CellSpec (minrnn.ops.cells).
        pre: its pre-activations, (B, T, C) each, float32 or float64 CPU tensors; the column
            chunks of one (B, T, n*C) tensor are read in place, others are concatenated once.
        h0: (B, C) start state of their dtype, or None for zeros.
        options: the cell's option values in ``spec.option_names`` order.
        mask: not supported (minrnn.functional sends masked calls through ``cpu_scan``).
        reset: (B, T) bool, True where a document starts (the state before it is forgotten:
            a = 0, h = b there; a start at t = 0 ignores h0), or None.
    Returns:
        h: (B, T, C).

    Saved for backward: the packed pre-activations, h, the start state and the resets; the
    backward recomputes the gates.
    """
    if mask is not None:
        raise ValueError("backend 'cpu' fused cells take no mask; minrnn.functional applies it")
    if torch.compiler.is_compiling():
        # pack_chunks reads storage offsets, which a traced tensor does not have: the compiler's cat
        return torch.ops.minrnn.cpu_cell(torch.cat(tuple(pre), -1), h0, spec.name, list(options), reset)
    return _Cell.apply(pack_chunks(tuple(pre)), h0, spec, tuple(options), reset)


class _ProjectedCell(torch.autograd.Function):
    """A whole layer, x -> Linear -> fused cell, as one Function (see ``cpu_projected_cell``).

    The pre-activations are this Function's own buffer and the only (B, T, n*C) one it
    touches: the forward kernel leaves its exps there, which the backward kernel reads and
    writes dL/dpre over, which the backward's matmuls then read. A second backward through
    the same graph (retain_graph=True) finds them consumed and first recomputes them.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, h0, spec, options, reset):
        pre = _projection(x, weight)
        ctx.consumed = False
        h, start = _cell_forward(pre, bias, h0, spec, options, keep=True, reset=reset)
        ctx.save_for_backward(x, weight, bias, pre, h, start, reset)
        ctx.spec, ctx.options, ctx.has_h0 = spec, options, h0 is not None
        return h

    @staticmethod
    @once_differentiable
    def backward(ctx, dh):
        x, weight, bias, pre, h, start, reset = ctx.saved_tensors
        if ctx.consumed:  # an earlier backward wrote its gradient over them: the forward again
            pre = _projection(x, weight)
            _cell_forward(pre, bias, start, ctx.spec, ctx.options, keep=True, h=new_output(tuple(h.shape), h.dtype),
                          reset=reset)
        dpre, dbias, dh0 = _cell_backward(pre, bias, h, start, dh, ctx.spec, ctx.options, in_place=True, reset=reset)
        ctx.consumed = True
        B, T, I = x.shape
        dpre2 = dpre.view(B * T, -1)
        dx = torch.mm(dpre2, weight.detach()).view(B, T, I) if ctx.needs_input_grad[0] else None
        dw = torch.mm(dpre2.t(), x.detach().reshape(B * T, I)) if ctx.needs_input_grad[1] else None
        db = dbias.sum(0) if bias is not None and ctx.needs_input_grad[2] else None
        return dx, dw, db, (dh0 if ctx.has_h0 else None), None, None, None


def _projection(x: Tensor, weight: Tensor) -> Tensor:
    """x @ weight.T into a new (B, T, n*C) buffer, without the bias (the kernels add it)."""
    B, T, I = x.shape
    pre = new_output((B, T, weight.shape[0]), x.dtype)
    torch.mm(x.detach().reshape(B * T, I), weight.detach().t(), out=pre.view(B * T, -1))
    return pre


def cpu_projected_cell(spec, x: Tensor, weight: Tensor, bias: Tensor | None, h0: Tensor | None,
                       options: tuple = (), reset: Tensor | None = None) -> Tensor:
    """A layer's projection and cell in one: ``spec`` (one of FUSED_CELLS) applied to
    ``x @ weight.T + bias`` split into its n pre-activations of C channels.

    Args:
        spec: the CellSpec (minrnn.ops.cells); n = spec.n_pre.
        x: (B, T, I); weight: (n*C, I); bias: (n*C,) or None; h0: (B, C) or None (zeros).
            float32 or float64, all on the CPU in one dtype.
        options: the cell's option values in ``spec.option_names`` order.
        reset: (B, T) bool, True where a document starts (as in ``cpu_cell``), or None.
    Returns:
        h: (B, T, C).

    Saved for backward: x, weight, bias, h, the start state, the resets and the
    pre-activations' buffer (holding the kept exps). Why one Function: nn.Linear writes its bias into the whole
    output and sums dL/dbias in another pass over dL/dpre; here the cell's kernels add the
    bias as they read the pre-activations and sum its gradient as they write theirs, which
    saves those passes over B*T*n*C values. Under torch.compile it is the custom op
    ``minrnn::cpu_projected_cell`` (``library.py``), which keeps the pre-activations intact
    instead (a functional op may not write over its own saved output).
    """
    if torch.compiler.is_compiling():
        return torch.ops.minrnn.cpu_projected_cell(x, weight, bias, h0, spec.name, list(options), reset)[0]
    return _ProjectedCell.apply(x, weight, bias, h0, spec, tuple(options), reset)


def cpu_mingru(hidden: Tensor, gate: Tensor, h0: Tensor | None = None) -> Tensor:
    """Fused minGRU: hidden, gate (B, T, C), h0 (B, C) or None -> h (B, T, C); see ``cpu_cell``."""
    return cpu_cell(get_cell("mingru"), (hidden, gate), h0, ())


def cpu_minlstm(hidden: Tensor, forget: Tensor, input: Tensor, h0: Tensor | None = None,
                normalize: bool = True) -> Tensor:
    """Fused minLSTM: hidden, forget, input (B, T, C), h0 (B, C) or None -> h (B, T, C)."""
    return cpu_cell(get_cell("minlstm"), (hidden, forget, input), h0, (bool(normalize),))
