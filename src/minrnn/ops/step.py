"""One decoding step's elementwise parts, each as a plain torch reference and as a fused
kernel (numba, ``ops/cpu/step.py``) used where it applies: float32/float64 CPU tensors with
no gradient to record, outside torch.compile. Anything else (a GPU, half precision, autograd,
a traced graph) runs the reference.

    conv_norm_step(x, mask, window, weight, bias, norm_weight, eps)
        -> (x + conv, RMSNorm(x + conv), new window)
    rms_norm(x, weight, eps) -> RMSNorm(x)
    cell_step(spec, pre, h, options, mask) -> the cell's new state

Shapes: x (B, D); mask (B,) bool (False: padding) or None, as ``minrnn.functional``'s;
window (B, D, k - 1), the conv's past inputs, oldest first; weight (D, k); pre (B, n E), a
cell's pre-activations side by side; h (B, E) or None (zeros). A padded row feeds the conv a zero and leaves h unchanged,
as the block's sequence path does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from . import cpu
from .cells import CellSpec
from .checks import state_dtype
from .reference import rms_norm_reference

_FUSED_DTYPES = (torch.float32, torch.float64)

if cpu.HAVE_NUMBA:
    from .cpu import step as _kernels

    _STEP_KERNELS = _kernels.STEP_KERNELS
else:  # pragma: no cover - exercised only where numba is absent
    _kernels, _STEP_KERNELS = None, {}


def fused_applies(*tensors: Tensor | None) -> bool:
    """Whether the fused kernels can take these tensors: numba present, all on the CPU in one
    float32/float64 dtype, and no gradient to record."""
    if _kernels is None or torch.compiler.is_compiling():
        # under torch.compile the references are traced: the compiler fuses them itself
        return False
    first = tensors[0]
    grad = torch.is_grad_enabled()
    for t in tensors:
        if t is None:
            continue
        if t.device.type != "cpu" or t.dtype is not first.dtype or (grad and t.requires_grad):
            return False
    return first.dtype in _FUSED_DTYPES


def _np(t: Tensor):
    return t.detach().numpy()


# --- references ----------------------------------------------------------------------


def conv_norm_step_reference(x: Tensor, mask: Tensor | None, window: Tensor, weight: Tensor, bias: Tensor | None,
                             norm_weight: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    xin = x if mask is None else x * mask.unsqueeze(-1).to(x.dtype)
    full = torch.cat([window.to(x.dtype), xin.unsqueeze(-1)], dim=-1)  # (B, D, k), oldest first
    # torch's depthwise conv, as the sequence path's reference conv: the same rounding in half precision
    out = x + F.conv1d(full, weight.unsqueeze(1), bias, groups=x.shape[1])[..., 0]
    return out, rms_norm_reference(out, norm_weight, eps), full[..., 1:]


def cell_step_reference(spec: CellSpec, pre: Tensor, h: Tensor | None, options: tuple,
                        mask: Tensor | None) -> Tensor:
    parts = pre.chunk(spec.n_pre, dim=-1)
    return spec.step(parts, h, options, mask)


# --- fused where it applies ------------------------------------------------------------


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    if not (fused_applies(x, weight) and x.is_contiguous()):
        return rms_norm_reference(x, weight, eps)
    B, D = x.shape
    out = torch.empty_like(x)
    _kernels.norm_step(_np(x), _np(weight), float(eps), out.numpy(), B, D)
    return out


def conv_norm_step(x: Tensor, mask: Tensor | None, window: Tensor, weight: Tensor, bias: Tensor | None,
                   norm_weight: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    if not fused_applies(x, window, weight, bias, norm_weight) or bias is None or not x.is_contiguous():
        return conv_norm_step_reference(x, mask, window, weight, bias, norm_weight, eps)
    B, D = x.shape
    W = window.shape[-1]
    out = torch.empty((2, B, D), dtype=x.dtype)  # x + conv, and its norm
    new_window = torch.empty((B, D, W), dtype=x.dtype)
    o = out.numpy()
    kv = o.reshape(-1) if mask is None else mask.to(x.dtype).numpy()
    _kernels.conv_norm_step(_np(x), kv, mask is not None, _np(window.contiguous()), _np(weight.contiguous()),
                            _np(bias), _np(norm_weight), float(eps), o[0], o[1], new_window.numpy(), B, D, W)
    return out[0], out[1], new_window


def cell_step(spec: CellSpec, pre: Tensor, h: Tensor | None, options: tuple = (),
              mask: Tensor | None = None) -> Tensor:
    """The new state (B, E) in the accumulation dtype (float32 for half ``pre``), or h's
    dtype if wider."""
    cdt = state_dtype(pre.dtype, h)
    kernel = _STEP_KERNELS.get(spec.name)  # the other cells run the reference
    if kernel is None or not (fused_applies(pre, h) and pre.dtype is cdt and pre.is_contiguous()):
        return cell_step_reference(spec, pre.to(cdt), None if h is None else h.to(cdt), options, mask)
    B, E = pre.shape[0], pre.shape[1] // spec.n_pre
    out = torch.empty((B, E), dtype=pre.dtype)
    o = out.numpy()
    hv = o if h is None else _np(h.contiguous())
    kv = o.reshape(-1) if mask is None else mask.to(pre.dtype).numpy()
    kernel(_np(pre), hv, h is not None, kv, mask is not None, o, B, E, *options)
    return out


__all__ = ["fused_applies", "rms_norm", "conv_norm_step", "cell_step", "rms_norm_reference",
           "conv_norm_step_reference", "cell_step_reference"]
