"""The CPU kernels as ``torch.library`` custom ops: what ``torch.compile`` sees of them.

Dynamo cannot trace into numba (nor into an autograd.Function that hands numpy views to
it), so each kernel is registered as an opaque op with

- an implementation (the numba kernel, on real tensors),
- a fake implementation (``register_fake``): the outputs' shapes and dtypes from the inputs',
  which is all the compiler needs to trace around the op,
- a backward (``register_autograd``): itself a custom op for the backward kernel, plus the
  torch ops (matmuls, sums) around it, which AOTAutograd traces into the backward graph.

    minrnn::cpu_scan(a, b, h0?) -> h                                          h = a h + b
    minrnn::cpu_cell(pre, h0?, cell, options, reset?) -> h                    a fused cell
    minrnn::cpu_projected_cell(x, weight, bias?, h0?, cell, options, reset?)  x @ W.T -> cell
        -> (h, pre)                                                            (pre: for backward)
    minrnn::cpu_causal_conv(x, weight, bias?) -> y
    minrnn::cpu_rms_norm(x, weight, eps) -> (y, r)                            r: 1/rms per row
    and their *_backward ops.

Shapes as in ``functions.py``, ``conv.py`` and ``norm.py``; ``cell`` is a name in
``FUSED_CELLS`` and ``options`` its option values (booleans) in ``option_names`` order;
``reset`` (B, T) bool, True where a document starts, or None.

The eager path does not go through these ops: the autograd Functions there cost less per call
and the projected cell's backward writes dL/dpre over the buffer its forward kept, which a
functional op may not do. ``cpu_scan`` and the others switch to these ops when
``torch.compiler.is_compiling()``; docs/design.md ("Custom ops") has the whole picture.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..cells import get_cell
from .conv import conv_backward, conv_forward
from .functions import _cell_backward, _cell_forward, _check_dtype, _projection, _scan_backward, _scan_forward, _start
from .norm import _forward as _norm_forward
from .norm import _rows, norm_backward


def _state(h0: Tensor | None, like: Tensor) -> Tensor:
    """The (B, C) start state of a (B, T, C) ``like``: h0, or zeros."""
    return like.new_zeros(like.shape[0], like.shape[2]) if h0 is None else h0


def _empty_state(h0: Tensor | None, like: Tensor) -> Tensor:
    return like.new_empty(like.shape[0], like.shape[2]) if h0 is None else torch.empty_like(h0)


# --- the scan -----------------------------------------------------------------------------


@torch.library.custom_op("minrnn::cpu_scan", mutates_args=(), device_types="cpu")
def scan_op(a: Tensor, b: Tensor, h0: Tensor | None) -> Tensor:
    _check_dtype(a.dtype)
    return _scan_forward(a, b, _start(h0, a))


@scan_op.register_fake
def _(a, b, h0):
    return a.new_empty(a.shape)


@torch.library.custom_op("minrnn::cpu_scan_backward", mutates_args=(), device_types="cpu")
def scan_backward_op(a: Tensor, h: Tensor, h0: Tensor | None, dh: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    return _scan_backward(a, h, _start(h0, a), dh)


@scan_backward_op.register_fake
def _(a, h, h0, dh):
    return a.new_empty(a.shape), a.new_empty(a.shape), _empty_state(h0, a)


def _scan_setup(ctx, inputs, output):
    a, _, h0 = inputs
    ctx.has_h0 = h0 is not None
    ctx.save_for_backward(a, output, h0)


def _scan_grad(ctx, dh):
    a, h, h0 = ctx.saved_tensors
    da, db, dh0 = scan_backward_op(a, h, h0, dh)
    return da, db, (dh0 if ctx.has_h0 else None)


scan_op.register_autograd(_scan_grad, setup_context=_scan_setup)


# --- the fused cells ----------------------------------------------------------------------


@torch.library.custom_op("minrnn::cpu_cell", mutates_args=(), device_types="cpu")
def cell_op(pre: Tensor, h0: Tensor | None, cell: str, options: list[bool], reset: Tensor | None) -> Tensor:
    return _cell_forward(pre, None, h0, get_cell(cell), tuple(options), keep=False, reset=reset)[0]


@cell_op.register_fake
def _(pre, h0, cell, options, reset):
    B, T, nC = pre.shape
    return pre.new_empty(B, T, nC // get_cell(cell).n_pre)


@torch.library.custom_op("minrnn::cpu_cell_backward", mutates_args=(), device_types="cpu")
def cell_backward_op(pre: Tensor, bias: Tensor | None, h: Tensor, h0: Tensor | None, dh: Tensor, cell: str,
                     options: list[bool], reset: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """(dL/dpre (B, T, n*C), dL/dbias per batch row (B, n*C), dL/dh0 (B, C)); ``pre`` the
    pre-activations without the bias, as the forward read them."""
    return _cell_backward(pre, bias, h, _start(h0, h), dh, get_cell(cell), tuple(options), reset=reset)


@cell_backward_op.register_fake
def _(pre, bias, h, h0, dh, cell, options, reset):
    return pre.new_empty(pre.shape), pre.new_empty(pre.shape[0], pre.shape[2]), _empty_state(h0, h)


def _cell_setup(ctx, inputs, output):
    pre, h0, cell, options, reset = inputs
    ctx.cell, ctx.options, ctx.has_h0 = cell, options, h0 is not None
    ctx.save_for_backward(pre, output, h0, reset)


def _cell_grad(ctx, dh):
    pre, h, h0, reset = ctx.saved_tensors
    dpre, _, dh0 = cell_backward_op(pre, None, h, h0, dh, ctx.cell, ctx.options, reset)
    return dpre, (dh0 if ctx.has_h0 else None), None, None, None


cell_op.register_autograd(_cell_grad, setup_context=_cell_setup)


@torch.library.custom_op("minrnn::cpu_projected_cell", mutates_args=(), device_types="cpu")
def projected_cell_op(x: Tensor, weight: Tensor, bias: Tensor | None, h0: Tensor | None, cell: str,
                      options: list[bool], reset: Tensor | None) -> tuple[Tensor, Tensor]:
    """(h (B, T, C), the pre-activations x @ weight.T (B, T, n*C), without the bias, which the
    backward reads)."""
    pre = _projection(x, weight)
    h, _ = _cell_forward(pre, bias, h0, get_cell(cell), tuple(options), keep=False, reset=reset)
    return h, pre


@projected_cell_op.register_fake
def _(x, weight, bias, h0, cell, options, reset):
    B, T, _ = x.shape
    nC = weight.shape[0]
    return x.new_empty(B, T, nC // get_cell(cell).n_pre), x.new_empty(B, T, nC)


def _projected_setup(ctx, inputs, output):
    x, weight, bias, h0, cell, options, reset = inputs
    ctx.cell, ctx.options, ctx.has_h0, ctx.has_bias = cell, options, h0 is not None, bias is not None
    ctx.save_for_backward(x, weight, bias, h0, reset, *output)


def _projected_grad(ctx, dh, _dpre):
    x, weight, bias, h0, reset, h, pre = ctx.saved_tensors
    dpre, dbias, dh0 = cell_backward_op(pre, bias, h, h0, dh, ctx.cell, ctx.options, reset)
    B, T, I = x.shape
    dpre2 = dpre.view(B * T, -1)
    dx = torch.mm(dpre2, weight).view(B, T, I)
    dw = torch.mm(dpre2.t(), x.reshape(B * T, I))
    return dx, dw, (dbias.sum(0) if ctx.has_bias else None), (dh0 if ctx.has_h0 else None), None, None, None


projected_cell_op.register_autograd(_projected_grad, setup_context=_projected_setup)


# --- the causal conv ----------------------------------------------------------------------


@torch.library.custom_op("minrnn::cpu_causal_conv", mutates_args=(), device_types="cpu")
def causal_conv_op(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return conv_forward(x, weight, bias)[0]


@causal_conv_op.register_fake
def _(x, weight, bias):
    return x.new_empty(x.shape)


@torch.library.custom_op("minrnn::cpu_causal_conv_backward", mutates_args=(), device_types="cpu")
def causal_conv_backward_op(x: Tensor, weight: Tensor, dy: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(dL/dx (B, T, C), dL/dweight in weight's shape, dL/dbias (C,))."""
    C, K = x.shape[-1], weight.shape[-1]
    dx, dwt, db = conv_backward(x.contiguous(), weight.detach().reshape(C, K).t().contiguous(), dy)
    return dx, dwt.t().contiguous().view(weight.shape), db


@causal_conv_backward_op.register_fake
def _(x, weight, dy):
    return x.new_empty(x.shape), weight.new_empty(weight.shape), x.new_empty(x.shape[-1])


def _conv_setup(ctx, inputs, output):
    x, weight, bias = inputs
    ctx.has_bias = bias is not None
    ctx.save_for_backward(x, weight)


def _conv_grad(ctx, dy):
    x, weight = ctx.saved_tensors
    dx, dw, db = causal_conv_backward_op(x, weight, dy)
    return dx, dw, (db if ctx.has_bias else None)


causal_conv_op.register_autograd(_conv_grad, setup_context=_conv_setup)


# --- RMSNorm -------------------------------------------------------------------------------


@torch.library.custom_op("minrnn::cpu_rms_norm", mutates_args=(), device_types="cpu")
def rms_norm_op(x: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """(y (..., D), r: 1 / rms of each row, (N,) for the N = x.numel() / D rows)."""
    y, r = _norm_forward(*_rows(x, weight), eps)
    return y.view(x.shape), r


@rms_norm_op.register_fake
def _(x, weight, eps):
    return x.new_empty(x.shape), x.new_empty(x.numel() // x.shape[-1])


@torch.library.custom_op("minrnn::cpu_rms_norm_backward", mutates_args=(), device_types="cpu")
def rms_norm_backward_op(x: Tensor, weight: Tensor, r: Tensor, dy: Tensor) -> tuple[Tensor, Tensor]:
    """(dL/dx (..., D), dL/dweight (D,))."""
    x2, w = _rows(x, weight)
    dx, dw = norm_backward(x2, w, r, dy)
    return dx.view(x.shape), dw


@rms_norm_backward_op.register_fake
def _(x, weight, r, dy):
    return x.new_empty(x.shape), weight.new_empty(weight.shape)


def _norm_setup(ctx, inputs, output):
    x, weight, _ = inputs
    ctx.save_for_backward(x, weight, output[1])


def _norm_grad(ctx, dy, _dr):
    x, weight, r = ctx.saved_tensors
    dx, dw = rms_norm_backward_op(x, weight, r, dy)
    return dx, dw, None


rms_norm_op.register_autograd(_norm_grad, setup_context=_norm_setup)

#: every op registered here, for the tests (``torch.library.opcheck``) and the docs
OPS = (scan_op, scan_backward_op, cell_op, cell_backward_op, projected_cell_op, causal_conv_op,
       causal_conv_backward_op, rms_norm_op, rms_norm_backward_op)
