"""The scan as Triton kernels, forward and backward: the GPU backend.

    h_t = a_t * h_{t-1} + b_t                                   (forward)
    G_t = dh_t + a_{t+1} G_{t+1},  G_T = dh_T                   (backward, in reverse)
    db_t = G_t,  da_t = G_t h_{t-1} (h_0 = h0 or 0),  dh0 = a_1 G_1

Parallel over batch x channel blocks, sequential over time inside each program, a
tile of steps at a time (see ``_triton_kernels``). float16/bfloat16 inputs are
accumulated in float32 and h is stored in the input dtype; float32 and float64 are
computed in their own precision. Backward keeps a and h (as stored, in the input dtype)
and h0, not b.

The kernels run compiled on CUDA tensors. With TRITON_INTERPRET=1 set before triton is
first imported, they run under Triton's interpreter instead (numpy, slow), which also
takes CPU tensors: that is how the tests hold them to the reference without a GPU (in a
subprocess, as the setting holds for the whole process). ``minrnn.scan(...,
backend="triton")`` accepts CUDA tensors only; call ``triton_scan`` for CPU tensors.

triton is imported on first use, never by ``import minrnn``.
"""

from __future__ import annotations

import contextlib
import functools
import importlib

import torch
from torch import Tensor

from .cells import get_cell
from .packing import pack_chunks

DEFAULT_BLOCK_T = 32


@functools.cache
def _triton_importable() -> bool:
    try:
        importlib.import_module("triton")
    except Exception:  # absent, or broken (a driver mismatch): unavailable, not a crash at import
        return False
    return True


def available() -> bool:
    """True when triton imports and a CUDA device is present."""
    # CUDA first: on a machine without a GPU this never imports triton
    return torch.cuda.is_available() and _triton_importable()


def _kernels():
    if not _triton_importable():
        raise RuntimeError("the triton backend needs the 'triton' package (pip install triton)")
    from . import _triton_kernels

    return _triton_kernels


def _pow2(name: str, value: int) -> int:
    if not isinstance(value, int) or value < 2 or value & (value - 1):
        raise ValueError(f"{name} must be a power of two >= 2, got {value!r}")
    return value


def _config(a: Tensor, block_t: int | None, block_c: int | None, num_warps: int | None):
    """Tile (BLOCK_T, BLOCK_C) and warps for a (B, T, C) problem.

    Each program runs the whole sequence, so the batch x channel blocks are all the
    parallelism there is: narrow the channel block until there are about two programs
    per SM (not below 16 channels, 64 bytes of float32 per row of a tile). float64
    tiles start half as wide, so that the staged loads (3 tiles of up to 3 inputs) stay
    within about 72 KB of shared memory.
    """
    B, _, C = a.shape
    if block_c is None:
        sms = torch.cuda.get_device_properties(a.device).multi_processor_count if a.is_cuda else 1
        block_c = 32 if a.dtype == torch.float64 else 64
        while block_c > 16 and B * -(-C // block_c) < 2 * sms:
            block_c //= 2
    block_t = DEFAULT_BLOCK_T if block_t is None else block_t
    _pow2("block_t", block_t)
    _pow2("block_c", block_c)
    if num_warps is None:
        num_warps = max(1, min(8, block_t * block_c // 256))
    return block_t, block_c, num_warps


def _launch(kernel: str, device: torch.device, B: int, C: int, block_c: int, num_warps: int, *args, **meta):
    k = _kernels()
    if device.type != "cuda" and not k.INTERPRETED:
        raise RuntimeError(
            f"the triton backend runs on CUDA tensors, or on CPU tensors under Triton's interpreter "
            f"(TRITON_INTERPRET=1 set before triton is first imported); got {device.type} tensors"
        )
    n_cblocks = -(-C // block_c)
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        getattr(k, kernel)[(B * n_cblocks,)](*args, n_cblocks=n_cblocks, **meta, num_warps=num_warps)


def _acc(dtype: torch.dtype):
    import triton.language as tl

    return tl.float64 if dtype == torch.float64 else tl.float32


# --- the kernels as torch.library custom ops ------------------------------------------------
#
# Each kernel is one op with a fake implementation (its outputs' shapes and dtypes) and a
# registered backward (itself an op), so torch.compile traces a model on this backend whole,
# each kernel one node of the graph, without looking into Triton. The tile arguments are
# optional ints: None picks them inside the op from the shape and the device, so tracing
# never queries the GPU.
#
#     minrnn::triton_scan(a, b, h0?, block_t?, block_c?, num_warps?) -> h
#     minrnn::triton_scan_backward(a, h, h0?, dh, ...) -> (da, db, dh0)
#     minrnn::triton_cell(pre, h0?, reset?, cell, normalize, block_t?, block_c?, num_warps?) -> h
#     minrnn::triton_cell_backward(pre, h, h0?, reset?, dh, cell, ...) -> (dpre, dh0)
#
# Without h0 the backward's dh0 is zeros of (B, C) that the autograd formula drops (an op
# returns tensors, never None).


def _dh0_slot(h0: Tensor | None, like: Tensor) -> Tensor:
    """The (B, C) dh0 output of a backward op for a (B, T, C) ``like``."""
    shape = (like.shape[0], like.shape[2])
    return like.new_zeros(shape) if h0 is None else like.new_empty(shape)


@torch.library.custom_op("minrnn::triton_scan", mutates_args=())
def scan_op(a: Tensor, b: Tensor, h0: Tensor | None, block_t: int | None, block_c: int | None,
            num_warps: int | None) -> Tensor:
    a, b = a.contiguous(), b.contiguous()
    h0 = None if h0 is None else h0.contiguous()
    block_t, block_c, num_warps = _config(a, block_t, block_c, num_warps)
    B, T, C = a.shape
    h = torch.empty_like(a)
    if h.numel():
        # without h0 the kernel reads no h0 pointer: any tensor fills the slot
        _launch("scan_fwd", a.device, B, C, block_c, num_warps,
                a, b, a if h0 is None else h0, h, T, C,
                HAS_H0=h0 is not None, ACC=_acc(a.dtype), BLOCK_T=block_t, BLOCK_C=block_c)
    return h


@scan_op.register_fake
def _(a, b, h0, block_t, block_c, num_warps):
    return a.new_empty(a.shape)


@torch.library.custom_op("minrnn::triton_scan_backward", mutates_args=())
def scan_backward_op(a: Tensor, h: Tensor, h0: Tensor | None, dh: Tensor, block_t: int | None,
                     block_c: int | None, num_warps: int | None) -> tuple[Tensor, Tensor, Tensor]:
    block_t, block_c, num_warps = _config(a, block_t, block_c, num_warps)
    B, T, C = a.shape
    a, h, dh = a.contiguous(), h.contiguous(), dh.contiguous()  # dh: e.g. the expanded ones of h.sum()
    h0 = None if h0 is None else h0.contiguous()
    da, db, dh0 = torch.empty_like(a), torch.empty_like(a), _dh0_slot(h0, a)
    if a.numel():
        _launch("scan_bwd", a.device, B, C, block_c, num_warps,
                a, h, a if h0 is None else h0, dh, da, db, dh0,
                T, C, -(-T // block_t),
                HAS_H0=h0 is not None, ACC=_acc(a.dtype), BLOCK_T=block_t, BLOCK_C=block_c)
    else:
        dh0.zero_()
    return da, db, dh0


@scan_backward_op.register_fake
def _(a, h, h0, dh, block_t, block_c, num_warps):
    return a.new_empty(a.shape), a.new_empty(a.shape), a.new_empty(a.shape[0], a.shape[2])


def _scan_setup(ctx, inputs, output):
    a, _, h0, *config = inputs
    ctx.config, ctx.has_h0 = config, h0 is not None
    ctx.save_for_backward(a, output, h0)


def _scan_grad(ctx, dh):
    a, h, h0 = ctx.saved_tensors
    da, db, dh0 = scan_backward_op(a, h, h0, dh, *ctx.config)
    return da, db, (dh0 if ctx.has_h0 else None), None, None, None


scan_op.register_autograd(_scan_grad, setup_context=_scan_setup)


def triton_scan(a: Tensor, b: Tensor, h0: Tensor | None = None, *, block_t: int | None = None,
                block_c: int | None = None, num_warps: int | None = None) -> Tensor:
    """h_t = a_t h_{t-1} + b_t with Triton kernels; differentiable in a, b and h0.

    Args:
        a, b: (B, T, C), one floating dtype, on CUDA (or CPU: Triton's interpreter).
        h0: (B, C) start state of that dtype, or None for zeros.
        block_t, block_c: the tile of steps x channels one program handles per
            iteration (powers of two); None picks them from the shape and the GPU.
        num_warps: warps per program (CUDA only); None picks from the tile.
    Returns:
        h: (B, T, C) in the dtype of a; float16/bfloat16 are accumulated in float32.

    Inputs are assumed validated (``minrnn.scan`` does it).
    """
    return scan_op(a, b, h0, block_t, block_c, num_warps)


#: The cells the kernels compute, and the CELL_LSTM flag that selects each one's gates.
_CELL_IS_LSTM = {"mingru": False, "minlstm": True}
FUSED_CELLS = frozenset(_CELL_IS_LSTM)


@torch.library.custom_op("minrnn::triton_cell", mutates_args=())
def cell_op(pre: Tensor, h0: Tensor | None, reset: Tensor | None, cell: str, normalize: bool,
            block_t: int | None, block_c: int | None, num_warps: int | None) -> Tensor:
    """A fused cell over packed pre-activations (B, T, n*C) (``cell`` one of FUSED_CELLS:
    minGRU's hidden, gate or minLSTM's hidden, forget, input), with document starts ``reset``
    (B, T) bool or None -> h (B, T, C). One kernel, reading the pre-activations and computing
    the gates itself; the backward is one kernel too, from the pre-activations, h, h0 and the
    resets."""
    pre = pre.contiguous()
    h0 = None if h0 is None else h0.contiguous()
    B, T, nC = pre.shape
    h = pre.new_empty(B, T, nC // get_cell(cell).n_pre)
    if h.numel():
        _launch_cell("cell_fwd", pre, h0, reset, cell, normalize, (block_t, block_c, num_warps),
                     pre if h0 is None else h0, h)
    return h


@cell_op.register_fake
def _(pre, h0, reset, cell, normalize, block_t, block_c, num_warps):
    B, T, nC = pre.shape
    return pre.new_empty(B, T, nC // get_cell(cell).n_pre)


@torch.library.custom_op("minrnn::triton_cell_backward", mutates_args=())
def cell_backward_op(pre: Tensor, h: Tensor, h0: Tensor | None, reset: Tensor | None, dh: Tensor, cell: str,
                     normalize: bool, block_t: int | None, block_c: int | None,
                     num_warps: int | None) -> tuple[Tensor, Tensor]:
    """(dL/dpre (B, T, n*C), dL/dh0 (B, C); zeros without h0)."""
    pre, h, dh = pre.contiguous(), h.contiguous(), dh.contiguous()
    dpre, dh0 = torch.empty_like(pre), _dh0_slot(h0, h)
    if h.numel():
        # h0, dh0 and the resets' pointers: any tensor fills the slot of one the kernel will not read
        _launch_cell("cell_bwd", pre, h0, reset, cell, normalize, (block_t, block_c, num_warps),
                     h, pre if h0 is None else h0.contiguous(), dh, dpre, dh0, backward=True)
    else:
        dh0.zero_()
    return dpre, dh0


@cell_backward_op.register_fake
def _(pre, h, h0, reset, dh, cell, normalize, block_t, block_c, num_warps):
    return pre.new_empty(pre.shape), h.new_empty(h.shape[0], h.shape[2])


def _launch_cell(kernel: str, pre: Tensor, h0: Tensor | None, reset: Tensor | None, cell: str, normalize: bool,
                 tiles: tuple, *pointers: Tensor, backward: bool = False) -> None:
    """Launches cell_fwd (pointers: h0 slot, h) or cell_bwd (pointers: h, h0 slot, dh, dpre,
    dh0) on contiguous (B, T, n*C) pre-activations; the resets go in as uint8."""
    spec = get_cell(cell)
    B, T, nC = pre.shape
    C = nC // spec.n_pre
    block_t, block_c, num_warps = _config(pre, *tiles)
    meta = dict(N_PRE=spec.n_pre, CELL_LSTM=_CELL_IS_LSTM[cell], NORMALIZE=bool(normalize),
                HAS_H0=h0 is not None, HAS_RESET=reset is not None, ACC=_acc(pre.dtype), BLOCK_T=block_t,
                BLOCK_C=block_c)
    reset = pre if reset is None else reset.contiguous().view(torch.uint8)
    if backward:
        h, h0_slot, *rest = pointers
        _launch(kernel, pre.device, B, C, block_c, num_warps, pre, h, h0_slot, reset, *rest,
                T, C, -(-T // block_t), **meta)
    else:
        h0_slot, h = pointers
        _launch(kernel, pre.device, B, C, block_c, num_warps, pre, h0_slot, reset, h, T, C, **meta)


def _cell_setup(ctx, inputs, output):
    pre, h0, reset, *options = inputs
    ctx.options, ctx.has_h0 = options, h0 is not None
    ctx.save_for_backward(pre, output, h0, reset)


def _cell_grad(ctx, dh):
    pre, h, h0, reset = ctx.saved_tensors
    dpre, dh0 = cell_backward_op(pre, h, h0, reset, dh, *ctx.options)
    return dpre, (dh0 if ctx.has_h0 else None), None, None, None, None, None, None


cell_op.register_autograd(_cell_grad, setup_context=_cell_setup)


def _cell(parts: tuple[Tensor, ...], h0: Tensor | None, reset: Tensor | None, spec, normalize: bool, block_t,
          block_c, num_warps):
    return cell_op(pack_chunks(parts), h0, reset, spec.name, bool(normalize), block_t, block_c, num_warps)


#: every op registered here, for the tests (``torch.library.opcheck``) and the docs
OPS = (scan_op, scan_backward_op, cell_op, cell_backward_op)


def triton_cell(spec, pre: tuple[Tensor, ...], h0: Tensor | None, options: tuple, mask=None,
                reset: Tensor | None = None) -> Tensor:
    """The registered backend's fused cells: ``spec`` one of FUSED_CELLS, ``pre`` its (B, T, C)
    pre-activations, ``options`` its option values (minLSTM: (normalize,)), ``reset`` (B, T)
    bool, True where a document starts (a = 0: the state before it is forgotten), or None
    -> h (B, T, C). ``mask``: not supported (minrnn.functional sends masked calls through
    ``triton_scan``)."""
    if mask is not None:
        raise ValueError("backend 'triton' fused cells take no mask; minrnn.functional applies it")
    normalize = dict(zip(spec.option_names, options)).get("normalize", False)
    return _cell(pre, h0, reset, spec, bool(normalize), None, None, None)


def triton_mingru(hidden: Tensor, gate: Tensor, h0: Tensor | None = None, *, reset: Tensor | None = None,
                  block_t: int | None = None, block_c: int | None = None, num_warps: int | None = None) -> Tensor:
    """Fused minGRU: hidden, gate (B, T, C), h0 (B, C) or None, reset (B, T) bool or None (True
    where a document starts) -> h (B, T, C); see ``triton_scan`` for the devices and the tile
    arguments."""
    return _cell((hidden, gate), h0, reset, get_cell("mingru"), False, block_t, block_c, num_warps)


def triton_minlstm(hidden: Tensor, forget: Tensor, input: Tensor, h0: Tensor | None = None, normalize: bool = True,
                   *, reset: Tensor | None = None, block_t: int | None = None, block_c: int | None = None,
                   num_warps: int | None = None) -> Tensor:
    """Fused minLSTM: hidden, forget, input (B, T, C), h0 (B, C) or None, reset as in
    ``triton_mingru`` -> h (B, T, C)."""
    return _cell((hidden, forget, input), h0, reset, get_cell("minlstm"), bool(normalize), block_t, block_c,
                 num_warps)
