"""The causal depthwise conv of the LM block on the CPU: numba kernels and their autograd
Function (``minrnn.ops.conv`` is the front that picks it).

    y_t = bias + sum_j w_j * x_{t-K+1+j},   x_s = 0 for s < 0      (channels-last, (B, T, C))

Work items are (batch row, stretch of time); the weight arrives transposed, wt (K, C), so that
each tap is a contiguous row. dL/dw and dL/dbias are summed per work item into partial
(jobs, K, C) and (jobs, C) arrays that torch then adds up (no two threads write one address).
"""

import torch
from numba import njit, prange
from torch import Tensor
from torch.autograd.function import once_differentiable

from ._math import PARALLEL_JIT
from .launch import launch, new_output, worker_count


@njit(**PARALLEL_JIT)
def conv_fwd(x, wt, bias, out, B, T, C, K, span):
    nspan = (T + span - 1) // span
    for job in prange(B * nspan):
        i, t0 = job // nspan, (job % nspan) * span
        for t in range(t0, min(t0 + span, T)):
            orow = out[i, t]
            for c in range(C):
                orow[c] = bias[c]
            for j in range(max(0, K - 1 - t), K):
                xr, wr = x[i, t - K + 1 + j], wt[j]
                for c in range(C):
                    orow[c] += wr[c] * xr[c]

@njit(**PARALLEL_JIT)
def conv_bwd(x, wt, dy, dx, dwt_part, db_part, B, T, C, K, span):
    nspan = (T + span - 1) // span
    for job in prange(B * nspan):
        i, t0 = job // nspan, (job % nspan) * span
        dw, db = dwt_part[job], db_part[job]
        for t in range(t0, min(t0 + span, T)):
            dxr, dyr = dx[i, t], dy[i, t]
            for c in range(C):
                dxr[c] = 0
                db[c] += dyr[c]
            # x_t feeds y_{t+K-1-j} through tap j
            for j in range(max(0, K - T + t), K):
                gr, wr = dy[i, t + K - 1 - j], wt[j]
                for c in range(C):
                    dxr[c] += wr[c] * gr[c]
            # y_t reads x_{t-K+1+j} through tap j
            for j in range(max(0, K - 1 - t), K):
                xr, dwr = x[i, t - K + 1 + j], dw[j]
                for c in range(C):
                    dwr[c] += dyr[c] * xr[c]


def time_span(B: int, T: int) -> int:
    """Time steps per work item of the conv kernels: the whole row unless that leaves threads idle."""
    want = worker_count()
    return T if B >= want else max(1, -(-T // -(-want // B)))


def conv_forward(x: Tensor, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """The forward kernel: (y (B, T, C), x made contiguous, the transposed weight (K, C))."""
    B, T, C = x.shape
    K = weight.shape[-1]
    x = x.detach().contiguous()
    wt = weight.detach().reshape(C, K).t().contiguous()
    b = x.new_zeros(C) if bias is None else bias.detach().contiguous()
    y = new_output((B, T, C), x.dtype)
    launch(conv_fwd, x.numel(), x.numpy(), wt.numpy(), b.numpy(), y.numpy(), B, T, C, K, time_span(B, T))
    return y, x, wt


def conv_backward(x: Tensor, wt: Tensor, dy: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The backward kernel: (dL/dx (B, T, C), dL/dwt (K, C), dL/dbias (C,)) for contiguous x and
    the transposed weight wt (K, C)."""
    B, T, C = x.shape
    K = wt.shape[0]
    dy = dy.contiguous()
    span = time_span(B, T)
    jobs = B * -(-T // span)
    dx = new_output((B, T, C), x.dtype)
    dwt_part = x.new_zeros(jobs, K, C)
    db_part = x.new_zeros(jobs, C)
    launch(conv_bwd, x.numel(), x.numpy(), wt.numpy(), dy.numpy(), dx.numpy(), dwt_part.numpy(), db_part.numpy(),
           B, T, C, K, span)
    return dx, dwt_part.sum(0), db_part.sum(0)


class _CausalConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        y, x, wt = conv_forward(x, weight, bias)
        ctx.save_for_backward(x, wt)
        ctx.weight_shape, ctx.has_bias = weight.shape, bias is not None
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, wt = ctx.saved_tensors
        dx, dwt, db = conv_backward(x, wt, dy)
        return dx, dwt.t().reshape(ctx.weight_shape), (db if ctx.has_bias else None)


def cpu_causal_conv(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """Causal depthwise conv, channels-last: x (B, T, C), weight (C, 1, K) or (C, K), bias (C,)
    or None -> y (B, T, C), y_t = bias + sum_j weight[:, j] x_{t-K+1+j} (zeros before t = 0).

    float32/float64 CPU tensors. Saved for backward: x and the transposed weight. Under
    torch.compile it is the custom op ``minrnn::cpu_causal_conv`` (``library.py``)."""
    if torch.compiler.is_compiling():
        return torch.ops.minrnn.cpu_causal_conv(x, weight, bias)
    return _CausalConv.apply(x, weight, bias)
