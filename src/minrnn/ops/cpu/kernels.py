"""The CPU kernels of the scan and of the fused cells, compiled by numba.

Layout: (B, T, C) with C contiguous. Every (B, T, C) array arrives as a flat 1-D view of its
storage plus its (batch, time) strides (the channel stride is 1), so element (i, t, c) is at
i*s0 + t*s1 + c: column slices of a wider tensor (the chunks of one Linear's output) need no
copy. Work items are (batch row, block of channels), run in parallel (prange); each walks the
whole sequence, and the inner loop over a block of channels is what LLVM vectorises. Inner
loops run over 1-D row slices (row[c], not flat[p + c]) and touch few arrays each: LLVM
vectorises a loop only when its run-time aliasing checks are few, which is why the backward
runs in two passes per step.

The backward is the reverse recurrence

    G_t = dL/dh_t + a_{t+1} G_{t+1},   dL/db_t = G_t,   dL/da_t = G_t h_{t-1},   dL/dh0 = a_1 G_1

The cell kernels take document starts: ``reset`` (B, T) uint8, 1 where a document starts
(a = 0 there: the state before it is forgotten), or a (0, 0) array for none. At a start the
forward runs the step from a zero state (h_t = b_t) and the backward reads h_{t-1} as 0 (so a,
a constant there, passes no gradient) and carries nothing to t - 1. The test is one per
(row, step), outside the loops over channels, which stay vectorised.

The cell kernels add the projection's bias as they read each pre-activation and sum
dL/dbias per batch row as they write dL/d(pre). With ``keep`` the forward overwrites the
pre-activations with the forms the backward reads (``_math``: the exps, bias added), and the
``*_bwd_in_place`` kernels write dL/d(pre) over those. They are kernels of their own: with
outputs passed as aliases of the inputs, LLVM's run-time overlap checks fail and the
out-of-place kernel runs unvectorised.

Arguments are flat (arrays, their strides, then sizes) because numba dispatches a call with
plain arguments several times faster than one with tuples; ``functions.py`` builds them.
"""

import math

import numpy as np
from numba import njit, prange

from ._math import (
    JIT,
    PARALLEL_JIT,
    _const,
    _exp,
    g_and_slope,
    g_from_kept,
    g_kept_form,
    g_slope_below,
    lstm_gates_from_any,
    lstm_gates_from_kept,
    lstm_kept_forms,
    lstm_kept_is_raw,
    sigmoid_pair,
    sigmoid_pair_of,
)


@njit(inline="always", **JIT)
def _work_item(job, nblk, blk, C):
    """(batch row, first channel, channel count) of work item ``job``."""
    c0 = (job % nblk) * blk
    return job // nblk, c0, min(blk, C - c0)


@njit(inline="always", **JIT)
def _row(flat, strides, i, t, c0, n):
    """Channels c0 .. c0+n of element (i, t) of a flat (B, T, C) array, as a 1-D view."""
    p = i * strides[0] + t * strides[1] + c0
    return flat[p : p + n]


@njit(inline="always", **JIT)
def _starts(reset, i, t):
    """Whether a document starts at step t of batch row i (``reset`` (0, 0): never)."""
    return reset.shape[0] != 0 and reset[i, t] != 0


@njit(inline="always", **JIT)
def _previous(h, h_strides, h0, zeros, reset, i, t, c0, n):
    """h_{t-1} of a work item's channels as the backward reads it: h0 before the first step,
    and zeros where a document starts at t."""
    if _starts(reset, i, t):
        return zeros
    return _row(h, h_strides, i, t - 1, c0, n) if t > 0 else h0[i, c0 : c0 + n]


@njit(**PARALLEL_JIT)
def scan_fwd(a, a_strides, b, b_strides, h0, out, out_strides, B, T, C, blk):
    nblk = (C + blk - 1) // blk
    for job in prange(B * nblk):
        i, c0, n = _work_item(job, nblk, blk, C)
        h = h0[i, c0 : c0 + n].copy()
        for t in range(T):
            ar, br, orow = (
                _row(a, a_strides, i, t, c0, n),
                _row(b, b_strides, i, t, c0, n),
                _row(out, out_strides, i, t, c0, n),
            )
            for c in range(n):
                v = ar[c] * h[c] + br[c]
                h[c] = v
                orow[c] = v


@njit(**PARALLEL_JIT)
def scan_bwd(a, a_strides, h, h_strides, h0, dh, dh_strides, da, db, out_strides, dh0, B, T, C, blk):
    nblk = (C + blk - 1) // blk
    for job in prange(B * nblk):
        i, c0, n = _work_item(job, nblk, blk, C)
        carry = np.zeros(n, dtype=a.dtype)  # a_{t+1} G_{t+1}
        for t in range(T - 1, -1, -1):
            ar, dhr = _row(a, a_strides, i, t, c0, n), _row(dh, dh_strides, i, t, c0, n)
            dar, dbr = _row(da, out_strides, i, t, c0, n), _row(db, out_strides, i, t, c0, n)
            prev = _row(h, h_strides, i, t - 1, c0, n) if t > 0 else h0[i, c0 : c0 + n]
            for c in range(n):
                G = dhr[c] + carry[c]
                dbr[c] = G
                carry[c] = ar[c] * G
            for c in range(n):
                dar[c] = dbr[c] * prev[c]
        dh0[i, c0 : c0 + n] = carry


@njit(**PARALLEL_JIT)
def mingru_fwd(x, x_strides, k, k_strides, bias, h0, reset, keep, out, out_strides, B, T, C, blk):
    """keep: overwrite x and k with what mingru_bwd_in_place reads (see g_from_kept)."""
    nblk = (C + blk - 1) // blk
    zero = _const(bias[0], 0.0)
    for job in prange(B * nblk):
        i, c0, n = _work_item(job, nblk, blk, C)
        h = h0[i, c0 : c0 + n].copy()
        bx, bk = bias[c0 : c0 + n], bias[C + c0 : C + c0 + n]
        for t in range(T):
            xr, kr, orow = (
                _row(x, x_strides, i, t, c0, n),
                _row(k, k_strides, i, t, c0, n),
                _row(out, out_strides, i, t, c0, n),
            )
            if _starts(reset, i, t):
                h[:] = 0
            for c in range(n):
                kc, xc = kr[c] + bk[c], xr[c] + bx[c]
                ek, ex = _exp(-abs(kc)), _exp(min(xc, zero))
                z, a = sigmoid_pair_of(kc, ek)
                gx, _ = g_slope_below(ex)
                if xc >= zero:
                    gx = xc + _const(xc, 0.5)
                v = a * h[c] + z * gx
                h[c] = v
                orow[c] = v
                if keep:
                    kr[c] = math.copysign(ek, kc)
                    xr[c] = g_kept_form(xc, ex)


@njit(inline="always", **JIT)
def _mingru_reverse_step(dhr, carry, A, dkr, dxr, sk, sx):
    """One step of the reverse recurrence on a row whose dkr, dxr hold d/d(pre) per unit
    of G: G = dh + carry, scale them by G, carry = a G, and add them to the bias sums."""
    for c in range(carry.size):
        G = dhr[c] + carry[c]
        dkr[c] *= G
        dxr[c] *= G
        carry[c] = A[c] * G
    for c in range(carry.size):  # this row's share of dL/dbias
        sx[c] += dxr[c]
        sk[c] += dkr[c]


@njit(inline="always", **JIT)
def _stop_at_start(carry, reset, i, t):
    """Where a document starts at t, nothing flows to step t - 1 (nor to h0): a_t = 0."""
    if _starts(reset, i, t):
        carry[:] = 0


@njit(**PARALLEL_JIT)
def mingru_bwd(
    x, x_strides, k, k_strides, bias, h, h_strides, h0, reset, dh, dh_strides, dx, dk, out_strides, dh0, dbias, B, T, C, blk
):
    nblk = (C + blk - 1) // blk
    for job in prange(B * nblk):
        i, c0, n = _work_item(job, nblk, blk, C)
        carry, zeros = np.zeros(n, dtype=x.dtype), np.zeros(n, dtype=x.dtype)  # carry: a_{t+1} G_{t+1}
        A = np.empty(n, dtype=x.dtype)
        bx, bk = bias[c0 : c0 + n], bias[C + c0 : C + c0 + n]
        sx, sk = dbias[i, c0 : c0 + n], dbias[i, C + c0 : C + c0 + n]
        sx[:] = 0
        sk[:] = 0
        for t in range(T - 1, -1, -1):
            kr, xr = _row(k, k_strides, i, t, c0, n), _row(x, x_strides, i, t, c0, n)
            dxr, dkr = _row(dx, out_strides, i, t, c0, n), _row(dk, out_strides, i, t, c0, n)
            prev = _previous(h, h_strides, h0, zeros, reset, i, t, c0, n)
            for c in range(n):  # gates recomputed; d/d(pre) per unit of G
                z, a = sigmoid_pair(kr[c] + bk[c])
                gx, slope = g_and_slope(xr[c] + bx[c])
                dkr[c] = z * a * (gx - prev[c])  # da/dk = -z a, db/dk = g z a
                dxr[c] = z * slope
                A[c] = a
            _mingru_reverse_step(_row(dh, dh_strides, i, t, c0, n), carry, A, dkr, dxr, sk, sx)
            _stop_at_start(carry, reset, i, t)
        dh0[i, c0 : c0 + n] = carry


@njit(**PARALLEL_JIT)
def mingru_bwd_in_place(
    x, x_strides, k, k_strides, h, h_strides, h0, reset, dh, dh_strides, dh0, dbias, B, T, C, blk
):
    """mingru_bwd on what mingru_fwd(keep=True) left in x and k, writing dL/dx and dL/dk
    over it. Its own kernel: with outputs passed as aliases of the inputs, LLVM's run-time
    overlap checks fail and mingru_bwd runs unvectorised."""
    nblk = (C + blk - 1) // blk
    for job in prange(B * nblk):
        i, c0, n = _work_item(job, nblk, blk, C)
        carry, zeros = np.zeros(n, dtype=x.dtype), np.zeros(n, dtype=x.dtype)
        A = np.empty(n, dtype=x.dtype)
        sx, sk = dbias[i, c0 : c0 + n], dbias[i, C + c0 : C + c0 + n]
        sx[:] = 0
        sk[:] = 0
        for t in range(T - 1, -1, -1):
            kr, xr = _row(k, k_strides, i, t, c0, n), _row(x, x_strides, i, t, c0, n)
            prev = _previous(h, h_strides, h0, zeros, reset, i, t, c0, n)
            for c in range(n):
                z, a = sigmoid_pair_of(kr[c], abs(kr[c]))
                gx, slope = g_from_kept(xr[c])
                kr[c] = z * a * (gx - prev[c])
                xr[c] = z * slope
                A[c] = a
            _mingru_reverse_step(_row(dh, dh_strides, i, t, c0, n), carry, A, kr, xr, sk, sx)
            _stop_at_start(carry, reset, i, t)
        dh0[i, c0 : c0 + n] = carry


@njit(inline="always", **JIT)
def _minlstm_advance(a, ip, x_kept, h, orow, c):
    """h[c] <- a h[c] + i' g(x) and into the output row, x given in its kept form."""
    gx, _ = g_from_kept(x_kept)
    v = a * h[c] + ip * gx
    h[c] = v
    orow[c] = v


@njit(inline="always", **JIT)
def _minlstm_kept_row(xr, fr, inp_row, bx, bf, b_inp, normalize, x_kept, f_kept, inp_kept):
    """Kept forms of a row (plus bias) into x_kept, f_kept, inp_kept; returns how many are raw."""
    for c in range(x_kept.size):
        x_kept[c], f_kept[c], inp_kept[c] = lstm_kept_forms(
            xr[c] + bx[c], fr[c] + bf[c], inp_row[c] + b_inp[c], normalize
        )
    return _minlstm_raw_in_row(f_kept, inp_kept)


@njit(inline="always", **JIT)
def _minlstm_raw_in_row(f_kept, inp_kept):
    """How many elements of a row of kept forms are raw."""
    raw = 0
    for c in range(f_kept.size):
        raw += lstm_kept_is_raw(f_kept[c], inp_kept[c])
    return raw


@njit(**PARALLEL_JIT)
def minlstm_fwd(
    x, x_strides, f, f_strides, inp, inp_strides, bias, h0, reset, normalize, keep, out, out_strides, B, T, C, blk
):
    """keep: overwrite x, f and inp with their kept forms (what minlstm_bwd_in_place reads)."""
    nblk = (C + blk - 1) // blk
    for job in prange(B * nblk):
        i, c0, n = _work_item(job, nblk, blk, C)
        h = h0[i, c0 : c0 + n].copy()
        x_kept, f_kept, inp_kept = np.empty(n, dtype=x.dtype), np.empty(n, dtype=x.dtype), np.empty(n, dtype=x.dtype)
        bx, bf, b_inp = bias[c0 : c0 + n], bias[C + c0 : C + c0 + n], bias[2 * C + c0 : 2 * C + c0 + n]
        for t in range(T):
            xr, fr, inp_row = (
                _row(x, x_strides, i, t, c0, n),
                _row(f, f_strides, i, t, c0, n),
                _row(inp, inp_strides, i, t, c0, n),
            )
            orow = _row(out, out_strides, i, t, c0, n)
            if _starts(reset, i, t):
                h[:] = 0
            if _minlstm_kept_row(xr, fr, inp_row, bx, bf, b_inp, normalize, x_kept, f_kept, inp_kept) == 0:
                for c in range(n):  # the common row: no lstm_gates, no exp
                    a, ip, _, _ = lstm_gates_from_kept(f_kept[c], inp_kept[c], normalize)
                    _minlstm_advance(a, ip, x_kept[c], h, orow, c)
            else:
                for c in range(n):
                    a, ip, _, _ = lstm_gates_from_any(f_kept[c], inp_kept[c], normalize)
                    _minlstm_advance(a, ip, x_kept[c], h, orow, c)
            if keep:
                xr[:] = x_kept
                fr[:] = f_kept
                inp_row[:] = inp_kept


@njit(inline="always", **JIT)
def _minlstm_grads(a, ip, nf, ni, x_kept, prev, normalize):
    """(dh/dx, dh/df, dh/dinp, a) of h = a prev + i' g(x) for one element, x in its kept form."""
    gx, slope = g_from_kept(x_kept)
    if normalize:
        # a = sf/(sf+s_inp): da/df = a i' sigmoid(-f), da/dinp = -a i' sigmoid(-i); i' = 1 - a
        w = (prev - gx) * a * ip
        return ip * slope, w * nf, -w * ni, a
    return ip * slope, prev * a * nf, gx * ip * ni, a


@njit(inline="always", **JIT)
def _minlstm_grad_row(x_kept, f_kept, inp_kept, prev, normalize, raw, dxr, dfr, dinp_row, A):
    """A row's d/d(pre) per unit of G from its kept forms, and its decays a into A. The
    outputs may be the inputs themselves (in place). ``raw``: the row has raw elements."""
    if raw:
        for c in range(A.size):
            a, ip, nf, ni = lstm_gates_from_any(f_kept[c], inp_kept[c], normalize)
            dxr[c], dfr[c], dinp_row[c], A[c] = _minlstm_grads(a, ip, nf, ni, x_kept[c], prev[c], normalize)
    else:  # the common row: no lstm_gates, no exp
        for c in range(A.size):
            a, ip, nf, ni = lstm_gates_from_kept(f_kept[c], inp_kept[c], normalize)
            dxr[c], dfr[c], dinp_row[c], A[c] = _minlstm_grads(a, ip, nf, ni, x_kept[c], prev[c], normalize)


@njit(inline="always", **JIT)
def _minlstm_reverse_step(dhr, carry, A, dxr, dfr, dinp_row, sx, sf, s_inp):
    """_mingru_reverse_step for minLSTM's three pre-activations."""
    for c in range(carry.size):
        G = dhr[c] + carry[c]
        dfr[c] *= G
        dinp_row[c] *= G
        dxr[c] *= G
        carry[c] = A[c] * G
    for c in range(carry.size):
        sx[c] += dxr[c]
        sf[c] += dfr[c]
        s_inp[c] += dinp_row[c]


@njit(inline="always", **JIT)
def _minlstm_work_item_state(x, dbias, i, c0, n, C):
    """A backward work item's carry (a_{t+1} G_{t+1}, zeros), a row of zeros (h_{t-1} at a
    document start), its decay row and its zeroed dL/dbias slices."""
    sx, sf, s_inp = dbias[i, c0 : c0 + n], dbias[i, C + c0 : C + c0 + n], dbias[i, 2 * C + c0 : 2 * C + c0 + n]
    sx[:] = 0
    sf[:] = 0
    s_inp[:] = 0
    return np.zeros(n, dtype=x.dtype), np.zeros(n, dtype=x.dtype), np.empty(n, dtype=x.dtype), sx, sf, s_inp


@njit(**PARALLEL_JIT)
def minlstm_bwd(
    x,
    x_strides,
    f,
    f_strides,
    inp,
    inp_strides,
    bias,
    h,
    h_strides,
    h0,
    reset,
    dh,
    dh_strides,
    normalize,
    dx,
    df,
    dinp,
    out_strides,
    dh0,
    dbias,
    B,
    T,
    C,
    blk,
):
    """From the pre-activations (left intact): a row's kept forms, written into its rows
    of dx, df, dinp, then minlstm_bwd_in_place's backward on those, so that the two agree
    bit for bit (and with as few distinct arrays per loop as it has)."""
    nblk = (C + blk - 1) // blk
    for job in prange(B * nblk):
        i, c0, n = _work_item(job, nblk, blk, C)
        carry, zeros, A, sx, sf, s_inp = _minlstm_work_item_state(x, dbias, i, c0, n, C)
        bx, bf, b_inp = bias[c0 : c0 + n], bias[C + c0 : C + c0 + n], bias[2 * C + c0 : 2 * C + c0 + n]
        for t in range(T - 1, -1, -1):
            xr, fr, inp_row = (
                _row(x, x_strides, i, t, c0, n),
                _row(f, f_strides, i, t, c0, n),
                _row(inp, inp_strides, i, t, c0, n),
            )
            dxr, dfr, dinp_row = (
                _row(dx, out_strides, i, t, c0, n),
                _row(df, out_strides, i, t, c0, n),
                _row(dinp, out_strides, i, t, c0, n),
            )
            prev = _previous(h, h_strides, h0, zeros, reset, i, t, c0, n)
            raw = _minlstm_kept_row(xr, fr, inp_row, bx, bf, b_inp, normalize, dxr, dfr, dinp_row) > 0
            _minlstm_grad_row(dxr, dfr, dinp_row, prev, normalize, raw, dxr, dfr, dinp_row, A)
            _minlstm_reverse_step(_row(dh, dh_strides, i, t, c0, n), carry, A, dxr, dfr, dinp_row, sx, sf, s_inp)
            _stop_at_start(carry, reset, i, t)
        dh0[i, c0 : c0 + n] = carry


@njit(**PARALLEL_JIT)
def minlstm_bwd_in_place(
    x, x_strides, f, f_strides, inp, inp_strides, h, h_strides, h0, reset, dh, dh_strides, normalize, dh0, dbias,
    B, T, C, blk
):
    """minlstm_bwd on what minlstm_fwd(keep=True) left in x, f and inp, writing dL/d(pre)
    over it (its own kernel for the reason given at mingru_bwd_in_place)."""
    nblk = (C + blk - 1) // blk
    for job in prange(B * nblk):
        i, c0, n = _work_item(job, nblk, blk, C)
        carry, zeros, A, sx, sf, s_inp = _minlstm_work_item_state(x, dbias, i, c0, n, C)
        for t in range(T - 1, -1, -1):
            xr, fr, inp_row = (
                _row(x, x_strides, i, t, c0, n),
                _row(f, f_strides, i, t, c0, n),
                _row(inp, inp_strides, i, t, c0, n),
            )
            prev = _previous(h, h_strides, h0, zeros, reset, i, t, c0, n)
            raw = _minlstm_raw_in_row(fr, inp_row) > 0
            _minlstm_grad_row(xr, fr, inp_row, prev, normalize, raw, xr, fr, inp_row, A)
            _minlstm_reverse_step(_row(dh, dh_strides, i, t, c0, n), carry, A, xr, fr, inp_row, sx, sf, s_inp)
            _stop_at_start(carry, reset, i, t)
        dh0[i, c0 : c0 + n] = carry
