"""One decoding step on the CPU, compiled by numba: the pieces of a block that are not
matmuls, each one kernel instead of a chain of small torch calls (``minrnn.ops.step`` holds
their torch references and picks between the two).

    conv_norm_step   x + conv(window, x) (the causal depthwise conv on its k - 1 past inputs),
                     the shifted window, and the RMSNorm of the result
    norm_step        the RMSNorm alone (a block without a conv, the MLP's norm)
    mingru_step      h = (1 - z) h + z g(hidden), z = sigmoid(gate), padded rows unchanged
    minlstm_step     h = f' h + i' g(hidden)

Rows are (B, C) with a row stride (the cell reads column slices of one projection's output in
place); the conv window is (B, D, W), W = k - 1, oldest first. The kernels run on the calling
thread: a step's few thousand elements cost less than waking a thread pool.

The RMSNorm works in float32 whatever the model's dtype, as ``MinRNNRMSNorm`` does (its sum of
squares is accumulated in float64 here, then rounded).
"""

import numpy as np
from numba import njit

from ._math import JIT, _const, g_and_slope, inv_rms, lstm_gates, sigmoid_pair


@njit(inline="always", **JIT)
def _norm_row(xo, norm_w, eps, out, D):
    ss = 0.0
    for d in range(D):
        v = np.float32(xo[d])
        ss += np.float64(v) * np.float64(v)
    r = inv_rms(ss, D, eps)
    for d in range(D):
        out[d] = norm_w[d] * _const(norm_w[d], np.float32(xo[d]) * r)


@njit(**JIT)
def norm_step(x, norm_w, eps, out, B, D):
    for b in range(B):
        _norm_row(x[b], norm_w, eps, out[b], D)


@njit(**JIT)
def conv_norm_step(x, mask, has_mask, window, w, bias, norm_w, eps, x_out, normed, window_out, B, D, W):
    """x (B, D); mask (B,) 1 for a token, 0 for padding (a zero conv input), read only if
    has_mask; window (B, D, W);
    w (D, W + 1); bias (D,). Writes x_out = x + conv, window_out = the last W conv inputs and
    normed = RMSNorm(x_out)."""
    for b in range(B):
        xr, xo, win, wout = x[b], x_out[b], window[b], window_out[b]
        pad = has_mask and mask[b] == 0
        for d in range(D):
            xin = _const(xr[d], 0.0) if pad else xr[d]
            acc = bias[d] + w[d, W] * xin
            for j in range(W):
                acc += w[d, j] * win[d, j]
            for j in range(W - 1):
                wout[d, j] = win[d, j + 1]
            if W > 0:
                wout[d, W - 1] = xin
            xo[d] = xr[d] + acc
        _norm_row(xo, norm_w, eps, normed[b], D)


@njit(**JIT)
def _hold_row(o, h, b, has_h, E):
    """A padded row's step is the identity: its state (zeros without one) again."""
    for c in range(E):
        o[c] = h[b, c] if has_h else _const(o[c], 0.0)


@njit(**JIT)
def mingru_step(pre, h, has_h, mask, has_mask, out, B, E):
    """pre (B, >= 2E): [hidden | gate] at columns 0 and E; h (B, E) (read only if has_h)."""
    for b in range(B):
        row, o = pre[b], out[b]
        if has_mask and mask[b] == 0:
            _hold_row(o, h, b, has_h, E)
            continue
        for c in range(E):
            z, a = sigmoid_pair(row[E + c])
            gx, _ = g_and_slope(row[c])
            v = z * gx
            o[c] = a * h[b, c] + v if has_h else v


@njit(**JIT)
def minlstm_step(pre, h, has_h, mask, has_mask, out, B, E, normalize):
    """pre (B, >= 3E): [hidden | forget | input] at columns 0, E and 2E."""
    for b in range(B):
        row, o = pre[b], out[b]
        if has_mask and mask[b] == 0:
            _hold_row(o, h, b, has_h, E)
            continue
        for c in range(E):
            a, i, _, _ = lstm_gates(row[E + c], row[2 * E + c], normalize)
            gx, _ = g_and_slope(row[c])
            v = i * gx
            o[c] = a * h[b, c] + v if has_h else v


#: The cell steps by cell name, each called as kernel(pre, h, has_h, mask, has_mask, out, B, E, *options)
#: with the cell spec's options (as the sequence kernels in functions.py).
STEP_KERNELS = {"mingru": mingru_step, "minlstm": minlstm_step}

__all__ = ["conv_norm_step", "norm_step", "mingru_step", "minlstm_step", "STEP_KERNELS"]
