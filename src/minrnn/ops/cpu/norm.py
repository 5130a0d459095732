"""RMSNorm on the CPU: numba kernels, forward and backward, and their autograd
Function (``minrnn.ops.norm`` is the front that picks it).

    y = w * (x * r),   r = 1 / sqrt(mean(x^2) + eps)        per row of D values, float32
    dL/dx = r (w g) - x r^3 mean(w g x),   dL/dw = sum over rows of g (x r)

Why a kernel: in torch the norm is a chain of small ops (pow, mean, add, rsqrt, two muls)
and its backward twice as many; at a small model's shapes they cost several times the
arithmetic. Here one pass reads x and writes y (saving r, one float per row), and one pass
reads x, r and g and writes dL/dx and the partial sums of dL/dw.

The row sums are accumulated in float64 and compiled with "reassoc" so that they vectorise; the
order they are added in then changes nothing a float32 result shows. "reassoc" also lets a
product of three float32 factors be formed in another order (an ulp or so; the tests hold both
outputs to the float64 formula). Work items are stretches of rows; dL/dw
is summed per work item into a (jobs, D) float64 array that torch then adds up (no two threads
write one address).
"""

import numpy as np
import torch
from numba import njit, prange
from torch import Tensor
from torch.autograd.function import once_differentiable

from ._math import PARALLEL_JIT, inv_rms
from .launch import SERIAL_BELOW, launch, new_output, worker_count
from .step import norm_step

# the row sums may be reordered (vectorised): they are float64 sums (see the module docstring)
_REDUCE_JIT = dict(PARALLEL_JIT, fastmath={"contract", "reassoc"})


@njit(**_REDUCE_JIT)
def rms_norm_fwd(x, w, eps, y, r, N, D, span):
    for job in prange((N + span - 1) // span):
        for n in range(job * span, min(job * span + span, N)):
            xr, yr = x[n], y[n]
            ss = 0.0
            for d in range(D):
                v = np.float64(xr[d])
                ss += v * v
            rn = inv_rms(ss, D, eps)
            r[n] = rn
            for d in range(D):
                yr[d] = w[d] * (xr[d] * rn)


@njit(**_REDUCE_JIT)
def rms_norm_bwd(x, w, r, dy, dx, dw_part, N, D, span):
    for job in prange((N + span - 1) // span):
        dw = dw_part[job]
        for n in range(job * span, min(job * span + span, N)):
            xr, gr, dxr = x[n], dy[n], dx[n]
            rn = r[n]
            s = 0.0
            for d in range(D):
                s += np.float64(w[d] * gr[d]) * np.float64(xr[d])
            c = np.float32(s / D * (np.float64(rn) * rn * rn))
            for d in range(D):
                dxr[d] = rn * (w[d] * gr[d]) - xr[d] * c
                dw[d] += np.float64(gr[d]) * np.float64(xr[d] * rn)


def rows_per_job(N: int) -> int:
    """Rows per work item: two items per thread (or one row each when there are fewer rows)."""
    return max(1, -(-N // worker_count()))


def _rows(x: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
    """x as contiguous rows (N, D) and the weight, as the kernels read them."""
    return x.detach().reshape(-1, x.shape[-1]).contiguous(), weight.detach().contiguous()


def _forward(x2: Tensor, w: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """The parallel forward kernel on rows x2 (N, D): (y (N, D), r (N,))."""
    N, D = x2.shape
    y = new_output((N, D), x2.dtype)
    r = torch.empty(N, dtype=x2.dtype)
    launch(rms_norm_fwd, x2.numel(), x2.numpy(), w.numpy(), float(eps), y.numpy(), r.numpy(), N, D, rows_per_job(N))
    return y, r


def norm_backward(x2: Tensor, w: Tensor, r: Tensor, dy: Tensor) -> tuple[Tensor, Tensor]:
    """The parallel backward kernel on rows x2 (N, D), r (N,) and dL/dy (any shape of N*D):
    (dL/dx (N, D), dL/dw (D,))."""
    N, D = x2.shape
    dy2 = dy.reshape(N, D).contiguous()
    span = rows_per_job(N)
    dx = new_output((N, D), x2.dtype)
    dw_part = torch.zeros(-(-N // span), D, dtype=torch.float64)
    launch(rms_norm_bwd, x2.numel(), x2.numpy(), w.numpy(), r.numpy(), dy2.numpy(), dx.numpy(), dw_part.numpy(),
           N, D, span)
    return dx, dw_part.sum(0).to(x2.dtype)


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        x2, w = _rows(x, weight)
        y, r = _forward(x2, w, eps)
        ctx.save_for_backward(x2, w, r)
        ctx.shape = x.shape
        return y.view(x.shape)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x2, w, r = ctx.saved_tensors
        dx, dw = norm_backward(x2, w, r, dy)
        return dx.view(ctx.shape), (dw if ctx.needs_input_grad[1] else None), None


def _rms_norm_no_grad(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """The forward alone, without an autograd Function: a decoding step's few rows through the
    serial step kernel (whose call costs less than the Function's), more through the
    parallel one."""
    x2, w = _rows(x, weight)
    if x2.numel() >= SERIAL_BELOW:
        return _forward(x2, w, eps)[0].view(x.shape)
    y = new_output(tuple(x2.shape), x2.dtype)
    norm_step(x2.numpy(), w.numpy(), float(eps), y.numpy(), *x2.shape)
    return y.view(x.shape)


def cpu_rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """RMSNorm over the last axis: x (..., D), weight (D,), both float32 CPU tensors ->
    y (..., D) = weight * x / sqrt(mean(x^2) + eps). Differentiable in x and weight.

    Saved for backward: x (made contiguous), the weight and one float per row. Under
    torch.compile it is the custom op ``minrnn::cpu_rms_norm`` (``library.py``)."""
    if torch.compiler.is_compiling():
        return torch.ops.minrnn.cpu_rms_norm(x, weight, eps)[0]
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return _RMSNorm.apply(x, weight, eps)
    return _rms_norm_no_grad(x, weight, eps)


__all__ = ["cpu_rms_norm", "rms_norm_fwd", "rms_norm_bwd"]
