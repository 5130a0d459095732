"""Compiled CPU kernels (numba): the scan, minGRU / minLSTM fused with their gates, and the
LM block's causal depthwise conv (``ops/conv.py`` is its front).

Why fused: a minGRU layer is one matmul plus elementwise work. Done as separate torch
ops, the gates cost a dozen passes over memory and autograd stores every intermediate.
Here one forward kernel reads the pre-activations and writes h; one backward kernel
reads the pre-activations, h and dL/dh and writes dL/d(pre-activations), recomputing
the gates on the fly. Saved for backward: the pre-activations and h, nothing else.
A layer goes one step further (``cpu_projected_cell``): its matmul runs without the bias,
the kernels add the bias as they read each pre-activation and sum dL/dbias as they write
dL/dpre, so neither costs a pass of its own (nn.Linear spends one writing the bias into
its output and one summing the gradient). The pre-activations, which the layer owns, are
its only (B, T, n*C) buffer: the forward kernel overwrites them with their exps, so that
the backward recomputes no exp (see kept_g and lstm_keep), and the backward kernel writes
dL/dpre over those (mingru_bwd_in_place, minlstm_bwd_in_place).

Layout: (B, T, C) with C contiguous. Parallel over batch x channel blocks (prange),
sequential in time, and the inner loop over a block of channels is what LLVM
vectorises. The backward is the reverse recurrence

    G_t = dL/dh_t + a_{t+1} G_{t+1},   dL/db_t = G_t,   dL/da_t = G_t h_{t-1},   dL/dh0 = a_1 G_1

float32 uses a polynomial exp (Cephes' expf: Cody-Waite range reduction, degree-5
polynomial, about 1 ulp) built from arithmetic and a bit cast, so LLVM vectorises it;
libm's exp is a scalar call that would block vectorisation. Its argument is clamped to
[-87, 88], so below -87 it returns exp(-87) ~ 1.6e-38 instead of a subnormal or 0: a value
that small (a saturated gate, its derivative) may be off by about that much, absolutely.
float64 uses libm's exp.
The one fast-math flag is "contract": a * b + c may become one fused multiply-add (one
rounding instead of two, so no less accurate); it made the gate kernels roughly 20-35%
faster on this project's CPU (probes and benchmarks/cpu_cell_breakdown.py; noisy). Nothing is reordered and inf/NaN keep their IEEE meaning.

Gates are formed from e = exp(-|k|): sigmoid(|k|) = 1/(1+e), sigmoid(-|k|) = e/(1+e),
so both z and 1 - z are accurate even when one of them is ~1e-30, and their product
(the gate's derivative) is too.

Numba is optional: without it this backend is not registered as available.
"""

from __future__ import annotations

import collections
import contextlib
import math
import os
import threading
import weakref

import torch
from torch import Tensor

from .packing import pack_chunks

try:  # numba is an optional dependency (pip install minrnn[fast])
    import numba
    import numpy as np
    from llvmlite import ir
    from numba import njit, prange, types
    from numba.extending import intrinsic, overload

    HAVE_NUMBA = True
except ImportError:  # pragma: no cover - exercised only where numba is absent
    HAVE_NUMBA = False

# Work items are (batch row, block of channels); each walks the whole sequence. A block
# spans all C channels when there are enough batch rows to keep every thread busy: a
# whole (T, C) slab is then read and written as one sequential stream, which measured
# about twice as fast on long sequences as interleaving half-rows of two blocks.
MIN_BLOCK = 16
# Below this many elements a kernel runs on the calling thread only: waking the thread
# pool costs more than the work, and on a busy machine numba's and torch's OpenMP pools
# spinning against each other made small calls many times slower.
SERIAL_BELOW = 1 << 16
# A minLSTM element whose forget or input pre-activation is below -RAW_BELOW is kept as it
# is rather than as its exps (see lstm_keep): exp(-60) ~ 9e-27 leaves the kept form's
# products far inside the normal range of float32.
RAW_BELOW = 60.0


def available() -> bool:
    return HAVE_NUMBA


if HAVE_NUMBA:
    _CACHE = os.environ.get("MINRNN_NUMBA_CACHE", "1") != "0"
    _jit = dict(nogil=True, fastmath={"contract"}, cache=_CACHE, error_model="numpy")
    _pjit = dict(_jit, parallel=True)

    @intrinsic
    def _bits_to_float32(typingctx, bits):
        """Reinterpret an int32's bits as a float32 (a free bit cast that LLVM vectorises)."""
        sig = types.float32(types.int32)

        def codegen(context, builder, signature, args):
            return builder.bitcast(args[0], ir.FloatType())

        return sig, codegen

    _F = np.float32
    _LOG2E, _LN2_HI, _LN2_LO = _F(1.44269504088896341), _F(0.693359375), _F(-2.12194440e-4)
    _P0, _P1, _P2 = _F(1.9875691500e-4), _F(1.3981999507e-3), _F(8.3334519073e-3)
    _P3, _P4, _P5 = _F(4.1665795894e-2), _F(1.6666665459e-1), _F(5.0000001201e-1)
    _LO, _HI, _ONE, _ROUNDER = _F(-87.0), _F(88.0), _F(1.0), _F(12582912.0)

    @njit(inline="always", **_jit)
    def exp32(x):
        x = min(max(x, _LO), _HI)
        # n = round(x / ln 2): adding and subtracting 1.5 * 2^23 rounds to an integer in two
        # vector adds (about 10% faster than floor + convert here)
        n = (x * _LOG2E + _ROUNDER) - _ROUNDER
        r = x - n * _LN2_HI - n * _LN2_LO
        p = (((((_P0 * r + _P1) * r + _P2) * r + _P3) * r + _P4) * r + _P5) * r * r + r + _ONE
        return p * _bits_to_float32((np.int32(n) + np.int32(127)) << np.int32(23))

    @njit(inline="always", **_jit)
    def exp64(x):
        return np.exp(x)

    # dtype-generic helpers, resolved at compile time for each signature (module-level
    # functions rather than closures, so that numba's on-disk cache is hit)
    def _exp(x):
        raise NotImplementedError  # compiled only

    @overload(_exp, inline="always")
    def _exp_impl(x):
        return (lambda x: exp32(x)) if x == types.float32 else (lambda x: exp64(x))

    def _const(like, value):
        raise NotImplementedError  # compiled only

    @overload(_const, inline="always")
    def _const_impl(like, value):
        return (lambda like, value: np.float32(value)) if like == types.float32 else (lambda like, value: np.float64(value))

    @njit(inline="always", **_jit)
    def _sign_clear(v):
        """v's sign bit is clear: v >= 0 except that -0.0 counts as negative (see kept_g)."""
        return math.copysign(_const(v, 1.0), v) > _const(v, 0.0)

    @njit(inline="always", **_jit)
    def sigmoid_pair_of(k, e):
        """(sigmoid(k), sigmoid(-k)) given e = exp(-|k|); of k only its sign is read."""
        one = _const(k, 1.0)
        s = one / (one + e)
        if _sign_clear(k):
            return s, e * s
        return e * s, s

    @njit(inline="always", **_jit)
    def sigmoid_pair(k):
        """(sigmoid(k), sigmoid(-k)), each accurate to its own relative precision."""
        return sigmoid_pair_of(k, _exp(-abs(k)))

    @njit(inline="always", **_jit)
    def g_slope_below(e):
        """g(x) and g'(x) for x < 0 given e = exp(x): sigmoid(x) and sigmoid(x)(1 - sigmoid(x))."""
        s = e / (_const(e, 1.0) + e)
        return s, s * (_const(e, 1.0) - s)

    @njit(inline="always", **_jit)
    def g_and_slope(x):
        """g(x) and g'(x): x + 1/2 and 1 for x >= 0; sigmoid(x) and sigmoid(x)(1 - sigmoid(x)) below."""
        s, slope = g_slope_below(_exp(min(x, _const(x, 0.0))))
        if x >= 0:
            return x + _const(x, 0.5), _const(x, 1.0)
        return s, slope

    # What a layer's forward leaves in its pre-activations for the backward (cpu_projected_cell
    # owns them, so they may be overwritten): the exps, which are most of the backward's work
    # (its kernel ran about 1.8x faster without them in a probe). The gate slot gets
    # copysign(exp(-|k|), k), which sigmoid_pair_of decodes; the hidden slot gets g(x) where
    # x >= 0 (at least 1/2: positive) and -exp(x) below (sign bit set). Reading the sign bit
    # rather than comparing with 0 keeps the branch where exp underflowed to 0 (float64, |k|
    # or -x past ~745: the value is then -0.0). The backward's values are then exactly those
    # a recomputation gives.

    @njit(inline="always", **_jit)
    def keep_g(x, ex):
        """What kept_g reads for x, given ex = exp(min(x, 0))."""
        return x + _const(x, 0.5) if x >= _const(x, 0.0) else -ex

    @njit(inline="always", **_jit)
    def kept_g(v):
        """g(x) and g'(x) from what the forward kept of x."""
        if _sign_clear(v):
            return v, _const(v, 1.0)
        return g_slope_below(-v)

    @njit(inline="always", **_jit)
    def _work_item(job, nblk, blk, C):
        """(batch row, first channel, channel count) of work item ``job``."""
        c0 = (job % nblk) * blk
        return job // nblk, c0, min(blk, C - c0)

    @njit(inline="always", **_jit)
    def _row(flat, strides, i, t, c0, n):
        """Channels c0 .. c0+n of element (i, t) of a flat (B, T, C) array, as a 1-D view."""
        p = i * strides[0] + t * strides[1] + c0
        return flat[p:p + n]

    # Every (B, T, C) array arrives as a flat 1-D view of its storage plus its batch and
    # time strides (the channel stride is 1), so element (i, t, c) is at i*s0 + t*s1 + c.
    # That keeps column slices of a wider tensor (the chunks of one Linear's output)
    # copy-free. Inner loops run over 1-D row slices (rows[c], not flat[p + c]) and touch
    # few arrays each: LLVM vectorises them only then (it gives up when a loop needs too
    # many run-time aliasing checks), which is why the backward runs in two passes per step.

    @njit(**_pjit)
    def scan_fwd(a, as_, b, bs, h0, out, os_, B, T, C, blk):
        nblk = (C + blk - 1) // blk
        for job in prange(B * nblk):
            i, c0, n = _work_item(job, nblk, blk, C)
            h = h0[i, c0:c0 + n].copy()
            for t in range(T):
                ar, br, orow = _row(a, as_, i, t, c0, n), _row(b, bs, i, t, c0, n), _row(out, os_, i, t, c0, n)
                for c in range(n):
                    v = ar[c] * h[c] + br[c]
                    h[c] = v
                    orow[c] = v

    @njit(**_pjit)
    def scan_bwd(a, as_, h, hs, h0, dh, dhs, da, db, os_, dh0, B, T, C, blk):
        nblk = (C + blk - 1) // blk
        for job in prange(B * nblk):
            i, c0, n = _work_item(job, nblk, blk, C)
            carry = np.zeros(n, dtype=a.dtype)  # a_{t+1} G_{t+1}
            for t in range(T - 1, -1, -1):
                ar, dhr = _row(a, as_, i, t, c0, n), _row(dh, dhs, i, t, c0, n)
                dar, dbr = _row(da, os_, i, t, c0, n), _row(db, os_, i, t, c0, n)
                prev = _row(h, hs, i, t - 1, c0, n) if t > 0 else h0[i, c0:c0 + n]
                for c in range(n):
                    G = dhr[c] + carry[c]
                    dbr[c] = G
                    carry[c] = ar[c] * G
                for c in range(n):
                    dar[c] = dbr[c] * prev[c]
            dh0[i, c0:c0 + n] = carry

    @njit(**_pjit)
    def mingru_fwd(x, xs, k, ks, bias, h0, keep, out, os_, B, T, C, blk):
        """keep: overwrite x and k with what mingru_bwd_in_place reads (see kept_g)."""
        nblk = (C + blk - 1) // blk
        zero = _const(bias[0], 0.0)
        for job in prange(B * nblk):
            i, c0, n = _work_item(job, nblk, blk, C)
            h = h0[i, c0:c0 + n].copy()
            bx, bk = bias[c0:c0 + n], bias[C + c0:C + c0 + n]
            for t in range(T):
                xr, kr, orow = _row(x, xs, i, t, c0, n), _row(k, ks, i, t, c0, n), _row(out, os_, i, t, c0, n)
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
                        xr[c] = keep_g(xc, ex)

    @njit(inline="always", **_jit)
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

    @njit(**_pjit)
    def mingru_bwd(x, xs, k, ks, bias, h, hs, h0, dh, dhs, dx, dk, os_, dh0, dbias, B, T, C, blk):
        nblk = (C + blk - 1) // blk
        for job in prange(B * nblk):
            i, c0, n = _work_item(job, nblk, blk, C)
            carry = np.zeros(n, dtype=x.dtype)  # a_{t+1} G_{t+1}
            A = np.empty(n, dtype=x.dtype)
            bx, bk = bias[c0:c0 + n], bias[C + c0:C + c0 + n]
            sx, sk = dbias[i, c0:c0 + n], dbias[i, C + c0:C + c0 + n]
            sx[:] = 0
            sk[:] = 0
            for t in range(T - 1, -1, -1):
                kr, xr = _row(k, ks, i, t, c0, n), _row(x, xs, i, t, c0, n)
                dxr, dkr = _row(dx, os_, i, t, c0, n), _row(dk, os_, i, t, c0, n)
                prev = _row(h, hs, i, t - 1, c0, n) if t > 0 else h0[i, c0:c0 + n]
                for c in range(n):  # gates recomputed; d/d(pre) per unit of G
                    z, a = sigmoid_pair(kr[c] + bk[c])
                    gx, slope = g_and_slope(xr[c] + bx[c])
                    dkr[c] = z * a * (gx - prev[c])  # da/dk = -z a, db/dk = g z a
                    dxr[c] = z * slope
                    A[c] = a
                _mingru_reverse_step(_row(dh, dhs, i, t, c0, n), carry, A, dkr, dxr, sk, sx)
            dh0[i, c0:c0 + n] = carry

    @njit(**_pjit)
    def mingru_bwd_in_place(x, xs, k, ks, h, hs, h0, dh, dhs, dh0, dbias, B, T, C, blk):
        """mingru_bwd on what mingru_fwd(keep=True) left in x and k, writing dL/dx and dL/dk
        over it. Its own kernel: with outputs passed as aliases of the inputs, LLVM's run-time
        overlap checks fail and mingru_bwd runs unvectorised (5x slower in a probe)."""
        nblk = (C + blk - 1) // blk
        for job in prange(B * nblk):
            i, c0, n = _work_item(job, nblk, blk, C)
            carry = np.zeros(n, dtype=x.dtype)
            A = np.empty(n, dtype=x.dtype)
            sx, sk = dbias[i, c0:c0 + n], dbias[i, C + c0:C + c0 + n]
            sx[:] = 0
            sk[:] = 0
            for t in range(T - 1, -1, -1):
                kr, xr = _row(k, ks, i, t, c0, n), _row(x, xs, i, t, c0, n)
                prev = _row(h, hs, i, t - 1, c0, n) if t > 0 else h0[i, c0:c0 + n]
                for c in range(n):
                    z, a = sigmoid_pair_of(kr[c], abs(kr[c]))
                    gx, slope = kept_g(xr[c])
                    kr[c] = z * a * (gx - prev[c])
                    xr[c] = z * slope
                    A[c] = a
                _mingru_reverse_step(_row(dh, dhs, i, t, c0, n), carry, A, kr, xr, sk, sx)
            dh0[i, c0:c0 + n] = carry

    @njit(inline="always", **_jit)
    def lstm_gates(f, ig, normalize):
        """(a, i', sigmoid(-f), sigmoid(-i)): a = sigmoid(f), i' = sigmoid(i), or, if normalize,
        a = sigmoid(f) / (sigmoid(f) + sigmoid(i)) and i' = 1 - a.

        The normalised pair is not formed from the two sigmoids: below f, i ~ -87 (float32)
        both underflow (or, with exp's range clamped, both become the same tiny number), and
        the quotient is 0/0 or 1/2 where the answer is sigmoid(i - f) or so. Instead, with
        F = max(-f, 0), u_f = 1 + exp(-|f|) (likewise I, u_i), sigmoid(f) = exp(-F) / u_f
        exactly, so multiplying through by u_f u_i exp(min(F, I)) gives

            a = p / (p + q),  i' = q / (p + q),  (p, q) = (u_i, E u_f) if F <= I else (E u_i, u_f)

        with E = exp(-|F - I|) <= 1: accurate for any f and i, and one division for both. The
        last two values are the backward's only (the forward's compiled code drops them).
        """
        one, zero = _const(f, 1.0), _const(f, 0.0)
        if normalize:
            ef, ei = _exp(-abs(f)), _exp(-abs(ig))
            uf, ui = one + ef, one + ei
            d = max(-f, zero) - max(-ig, zero)  # F - I
            e = _exp(-abs(d))
            if d <= zero:
                p, q = ui, e * uf
            else:
                p, q = e * ui, uf
            inv = one / (p + q)
            nf = (ef if f >= zero else one) / uf  # sigmoid(-f) = exp(-max(f, 0)) / u_f
            ni = (ei if ig >= zero else one) / ui
            return p * inv, q * inv, nf, ni
        sf, nf = sigmoid_pair(f)
        si, ni = sigmoid_pair(ig)
        return sf, si, nf, ni

    # What minLSTM's forward leaves in its three slots, and what its backward reads: per
    # element (f, i, x, bias added), the forget and input slots get copysign(exp(-|k|), k)
    # and the hidden slot g's kept form (kept_g). From those two exps alone the gates are
    #
    #     a = P / (P + Q),  i' = Q / (P + Q),  P = s_f u_i,  Q = s_i u_f
    #
    # with u = 1 + exp(-|k|) and s = 1 for k >= 0, exp(-|k|) below (sigmoid(k) = s / u), and
    # sigmoid(-k) is likewise a quotient by u: no exp, three divisions. P and Q are normal
    # numbers, hence the quotients accurate, as long as neither f nor i is below -RAW_BELOW
    # (exp(-60) ~ 9e-27). An element past that keeps f and i as they are ("raw": then one
    # of the two slots holds a value of magnitude > 60, which no kept exp can be) and is
    # decoded by lstm_gates, whose third exp keeps the ratio of two underflowing sigmoids
    # accurate. Raw elements are rare (no gate pre-activation is ever that negative in a
    # sane training run), so a row of channels is checked first and takes the loop without
    # lstm_gates in it whenever it has none: the exps that loop would otherwise compute for
    # every lane (LLVM evaluates both sides of a branch to vectorise it) are what the kept
    # form saves.

    @njit(inline="always", **_jit)
    def lstm_keep(x, f, ig, normalize):
        """(kept x, kept f, kept i) for one element, bias added (see above). Not normalised,
        the sigmoids' exps are all the gates need at any k, and no element is raw."""
        zero = _const(f, 0.0)
        ex, ef, ei = _exp(min(x, zero)), _exp(-abs(f)), _exp(-abs(ig))
        kx = keep_g(x, ex)
        if normalize and min(f, ig) < _const(f, -RAW_BELOW):
            return kx, f, ig
        return kx, math.copysign(ef, f), math.copysign(ei, ig)

    @njit(inline="always", **_jit)
    def lstm_gates_kept(kf, ki, normalize):
        """lstm_gates' (a, i', sigmoid(-f), sigmoid(-i)) from kept, not raw, slots."""
        one = _const(kf, 1.0)
        ef, ei = abs(kf), abs(ki)
        uf, ui = one + ef, one + ei
        f_pos, i_pos = _sign_clear(kf), _sign_clear(ki)
        sf, nf = (one, ef) if f_pos else (ef, one)  # sigmoid(+-f) times u_f
        si, ni = (one, ei) if i_pos else (ei, one)
        if normalize:
            p, q = sf * ui, si * uf
            inv = one / (p + q)
            return p * inv, q * inv, nf / uf, ni / ui
        rf, ri = one / uf, one / ui
        return sf * rf, si * ri, nf * rf, ni * ri

    @njit(inline="always", **_jit)
    def lstm_is_raw(kf, ki):
        """Whether an element's kept forget and input slots hold f and i themselves: a kept
        exp is at most 1 in magnitude, a raw element has one below -RAW_BELOW."""
        return max(abs(kf), abs(ki)) > _const(kf, 1.0)

    @njit(inline="always", **_jit)
    def lstm_gates_any(kf, ki, normalize):
        """lstm_gates_kept, or lstm_gates for a raw element. Only for rows that have one: a
        loop over this computes lstm_gates' exps for every lane (a loop-invariant flag
        choosing between the two per element measured as slow: LLVM did not split the loop)."""
        if lstm_is_raw(kf, ki):
            return lstm_gates(kf, ki, normalize)
        return lstm_gates_kept(kf, ki, normalize)

    @njit(inline="always", **_jit)
    def _minlstm_advance(a, ip, kx, h, orow, c):
        """h[c] <- a h[c] + i' g(x) and into the output row, x given in its kept form."""
        gx, _ = kept_g(kx)
        v = a * h[c] + ip * gx
        h[c] = v
        orow[c] = v

    @njit(inline="always", **_jit)
    def _minlstm_keep_row(xr, fr, ir_, bx, bf, bi, normalize, kx, kf, ki):
        """Kept forms of a row (plus bias) into kx, kf, ki; returns how many are raw."""
        for c in range(kx.size):
            kx[c], kf[c], ki[c] = lstm_keep(xr[c] + bx[c], fr[c] + bf[c], ir_[c] + bi[c], normalize)
        return _minlstm_raw_in_row(kf, ki)

    @njit(inline="always", **_jit)
    def _minlstm_raw_in_row(kf, ki):
        """How many elements of a row of kept forms are raw."""
        raw = 0
        for c in range(kf.size):
            raw += lstm_is_raw(kf[c], ki[c])
        return raw

    @njit(**_pjit)
    def minlstm_fwd(x, xs, f, fs, ig, is_, bias, h0, normalize, keep, out, os_, B, T, C, blk):
        """keep: overwrite x, f and ig with their kept forms (what minlstm_bwd_in_place reads)."""
        nblk = (C + blk - 1) // blk
        for job in prange(B * nblk):
            i, c0, n = _work_item(job, nblk, blk, C)
            h = h0[i, c0:c0 + n].copy()
            kx, kf, ki = np.empty(n, dtype=x.dtype), np.empty(n, dtype=x.dtype), np.empty(n, dtype=x.dtype)
            bx, bf, bi = bias[c0:c0 + n], bias[C + c0:C + c0 + n], bias[2 * C + c0:2 * C + c0 + n]
            for t in range(T):
                xr, fr, ir_ = _row(x, xs, i, t, c0, n), _row(f, fs, i, t, c0, n), _row(ig, is_, i, t, c0, n)
                orow = _row(out, os_, i, t, c0, n)
                if _minlstm_keep_row(xr, fr, ir_, bx, bf, bi, normalize, kx, kf, ki) == 0:
                    for c in range(n):  # the common row: no lstm_gates, no exp
                        a, ip, _, _ = lstm_gates_kept(kf[c], ki[c], normalize)
                        _minlstm_advance(a, ip, kx[c], h, orow, c)
                else:
                    for c in range(n):
                        a, ip, _, _ = lstm_gates_any(kf[c], ki[c], normalize)
                        _minlstm_advance(a, ip, kx[c], h, orow, c)
                if keep:
                    xr[:] = kx
                    fr[:] = kf
                    ir_[:] = ki

    @njit(inline="always", **_jit)
    def _minlstm_grads(a, ip, nf, ni, kx, prev, normalize):
        """(dh/dx, dh/df, dh/di, a) of h = a prev + i' g(x) for one element, x in its kept form."""
        gx, slope = kept_g(kx)
        if normalize:
            # a = sf/(sf+si): da/df = a i' sigmoid(-f), da/di = -a i' sigmoid(-i); i' = 1 - a
            w = (prev - gx) * a * ip
            return ip * slope, w * nf, -w * ni, a
        return ip * slope, prev * a * nf, gx * ip * ni, a

    @njit(inline="always", **_jit)
    def _minlstm_grad_row(kx, kf, ki, prev, normalize, raw, dxr, dfr, dir_, A):
        """A row's d/d(pre) per unit of G from its kept forms, and its decays a into A. The
        outputs may be the inputs themselves (in place). ``raw``: the row has raw elements."""
        if raw:
            for c in range(A.size):
                a, ip, nf, ni = lstm_gates_any(kf[c], ki[c], normalize)
                dxr[c], dfr[c], dir_[c], A[c] = _minlstm_grads(a, ip, nf, ni, kx[c], prev[c], normalize)
        else:  # the common row: no lstm_gates, no exp
            for c in range(A.size):
                a, ip, nf, ni = lstm_gates_kept(kf[c], ki[c], normalize)
                dxr[c], dfr[c], dir_[c], A[c] = _minlstm_grads(a, ip, nf, ni, kx[c], prev[c], normalize)

    @njit(inline="always", **_jit)
    def _minlstm_reverse_step(dhr, carry, A, dxr, dfr, dir_, sx, sf, si):
        """_mingru_reverse_step for minLSTM's three pre-activations."""
        for c in range(carry.size):
            G = dhr[c] + carry[c]
            dfr[c] *= G
            dir_[c] *= G
            dxr[c] *= G
            carry[c] = A[c] * G
        for c in range(carry.size):
            sx[c] += dxr[c]
            sf[c] += dfr[c]
            si[c] += dir_[c]

    @njit(inline="always", **_jit)
    def _minlstm_work_item_state(x, dbias, i, c0, n, C):
        """A backward work item's carry (a_{t+1} G_{t+1}, zeros), decay row and its zeroed
        dL/dbias slices."""
        sx, sf, si = dbias[i, c0:c0 + n], dbias[i, C + c0:C + c0 + n], dbias[i, 2 * C + c0:2 * C + c0 + n]
        sx[:] = 0
        sf[:] = 0
        si[:] = 0
        return np.zeros(n, dtype=x.dtype), np.empty(n, dtype=x.dtype), sx, sf, si

    @njit(**_pjit)
    def minlstm_bwd(x, xs, f, fs, ig, is_, bias, h, hs, h0, dh, dhs, normalize, dx, df, di, os_, dh0, dbias, B, T, C, blk):
        """From the pre-activations (left intact): a row's kept forms, written into its rows
        of dx, df, di, then minlstm_bwd_in_place's backward on those, so that the two agree
        bit for bit (and with as few distinct arrays per loop as it has)."""
        nblk = (C + blk - 1) // blk
        for job in prange(B * nblk):
            i, c0, n = _work_item(job, nblk, blk, C)
            carry, A, sx, sf, si = _minlstm_work_item_state(x, dbias, i, c0, n, C)
            bx, bf, bi = bias[c0:c0 + n], bias[C + c0:C + c0 + n], bias[2 * C + c0:2 * C + c0 + n]
            for t in range(T - 1, -1, -1):
                xr, fr, ir_ = _row(x, xs, i, t, c0, n), _row(f, fs, i, t, c0, n), _row(ig, is_, i, t, c0, n)
                dxr, dfr, dir_ = _row(dx, os_, i, t, c0, n), _row(df, os_, i, t, c0, n), _row(di, os_, i, t, c0, n)
                prev = _row(h, hs, i, t - 1, c0, n) if t > 0 else h0[i, c0:c0 + n]
                raw = _minlstm_keep_row(xr, fr, ir_, bx, bf, bi, normalize, dxr, dfr, dir_) > 0
                _minlstm_grad_row(dxr, dfr, dir_, prev, normalize, raw, dxr, dfr, dir_, A)
                _minlstm_reverse_step(_row(dh, dhs, i, t, c0, n), carry, A, dxr, dfr, dir_, sx, sf, si)
            dh0[i, c0:c0 + n] = carry

    @njit(**_pjit)
    def minlstm_bwd_in_place(x, xs, f, fs, ig, is_, h, hs, h0, dh, dhs, normalize, dh0, dbias, B, T, C, blk):
        """minlstm_bwd on what minlstm_fwd(keep=True) left in x, f and ig, writing dL/d(pre)
        over it (its own kernel for the reason given at mingru_bwd_in_place)."""
        nblk = (C + blk - 1) // blk
        for job in prange(B * nblk):
            i, c0, n = _work_item(job, nblk, blk, C)
            carry, A, sx, sf, si = _minlstm_work_item_state(x, dbias, i, c0, n, C)
            for t in range(T - 1, -1, -1):
                xr, fr, ir_ = _row(x, xs, i, t, c0, n), _row(f, fs, i, t, c0, n), _row(ig, is_, i, t, c0, n)
                prev = _row(h, hs, i, t - 1, c0, n) if t > 0 else h0[i, c0:c0 + n]
                raw = _minlstm_raw_in_row(fr, ir_) > 0
                _minlstm_grad_row(xr, fr, ir_, prev, normalize, raw, xr, fr, ir_, A)
                _minlstm_reverse_step(_row(dh, dhs, i, t, c0, n), carry, A, xr, fr, ir_, sx, sf, si)
            dh0[i, c0:c0 + n] = carry

    # The causal depthwise conv of the LM block (kernel K along time, one filter per channel),
    # channels-last: y_t = bias + sum_j w_j * x_{t-K+1+j}, x_s = 0 for s < 0. Work items are
    # (batch row, stretch of time); the weight arrives transposed, wt (K, C), so that each tap
    # is a contiguous row. dL/dw and dL/dbias are summed per work item into partial (jobs, K, C)
    # and (jobs, C) arrays that torch then adds up (no two threads write one address).

    @njit(**_pjit)
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

    @njit(**_pjit)
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

    _KERNELS = dict(scan_fwd=scan_fwd, scan_bwd=scan_bwd, mingru_fwd=mingru_fwd, mingru_bwd=mingru_bwd,
                    mingru_bwd_in_place=mingru_bwd_in_place, minlstm_bwd_in_place=minlstm_bwd_in_place,
                    minlstm_fwd=minlstm_fwd, minlstm_bwd=minlstm_bwd, conv_fwd=conv_fwd, conv_bwd=conv_bwd)


# --- output buffers --------------------------------------------------------------------------
#
# Why a cache: a kernel's outputs are large (B*T*C floats) and short-lived (h lives until the
# backward, dL/d(pre) until the projection's backward has read it). glibc serves allocations of
# that size with a fresh mmap and unmaps them on free, so every training step page-faults its
# outputs in again; on this project's 2-core VM that costs about as much as the kernel itself at
# T = 4096 (a (16, 4096, 128) float32 output: ~8 ms of faults against a ~9 ms forward). The cache
# keeps freed output blocks, keyed by size, and hands them out again; like CUDA's caching
# allocator it trades held memory for speed, within a limit.


_ALIGN = 64


class OutputCache:
    """Freed kernel outputs kept for reuse, up to ``limit_bytes`` held idle.

    A block goes back to the cache only when the last tensor viewing it is freed: the tensor
    handed out is built on a numpy view of the block, and that view's finalizer returns it.
    Blocks under ``min_bytes`` are left to the allocator (small ones are cheap and reused by it).

    When a returned block does not fit, idle blocks of a size nobody has asked for in the last
    ``stale_after`` requests are dropped (oldest first) to make room, and if that is not
    enough the returned block itself is dropped. Why not simply drop the oldest: a training
    step frees its outputs in the same order every step, so the oldest idle block is the next
    one to be asked for; with more outputs than the limit holds, dropping the oldest missed on
    every request (a minGRU and a minLSTM layer at T = 16384 in one process: 3x slower per
    step than with a cache that held both). Sizes still being asked for are kept; sizes of a
    finished workload make way.
    """

    def __init__(self, limit_bytes: int, min_bytes: int = 1 << 20, stale_after: int = 64):
        self.limit_bytes, self.min_bytes, self.stale_after = int(limit_bytes), int(min_bytes), int(stale_after)
        self._idle: collections.OrderedDict = collections.OrderedDict()  # id -> block, oldest first
        self._held = 0
        self._requests = 0  # cacheable requests so far: the clock for staleness
        self._asked: dict[int, int] = {}  # block size -> the request count when it was last asked for
        self._lock = threading.RLock()

    @property
    def held_bytes(self) -> int:
        """Bytes held idle for reuse (not counting blocks in use)."""
        return self._held

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
        """An uninitialised contiguous CPU tensor, from the cache when a block of its size is idle."""
        nbytes = dtype.itemsize
        for d in shape:
            nbytes *= d
        if nbytes < self.min_bytes or self.limit_bytes <= 0:
            return torch.empty(shape, dtype=dtype)
        block = None
        with self._lock:
            self._requests += 1
            self._asked[nbytes] = self._requests
            for key, cand in reversed(self._idle.items()):  # the most recently freed: warmest in cache
                if cand.nbytes == nbytes:
                    block = self._idle.pop(key)
                    self._held -= nbytes
                    break
        if block is None:
            # 64-byte aligned, as torch's own allocations are: numpy aligns to 16 bytes only,
            # and vector stores that straddle cache lines made the kernels ~3% slower in a probe
            raw = np.empty(nbytes + _ALIGN - 1, dtype=np.uint8)
            start = -raw.ctypes.data % _ALIGN
            block = raw[start:start + nbytes]
        view = block.view(_NP_DTYPES[dtype])
        weakref.finalize(view, self._release, block).atexit = False
        return torch.from_numpy(view).view(shape)

    def _release(self, block) -> None:
        with self._lock:
            if block.nbytes > self.limit_bytes:
                return
            if self._held + block.nbytes > self.limit_bytes:
                fresh = self._requests - self.stale_after
                for key in [k for k, b in self._idle.items() if self._asked.get(b.nbytes, 0) < fresh]:
                    if self._held + block.nbytes <= self.limit_bytes:
                        break
                    self._held -= self._idle.pop(key).nbytes
                if self._held + block.nbytes > self.limit_bytes:
                    return  # full of sizes still asked for: keep them, drop this one
            self._idle[id(block)] = block
            self._held += block.nbytes

    def clear(self) -> None:
        """Drop every idle block (blocks in use are dropped when freed, unless re-enabled)."""
        with self._lock:
            self._idle.clear()
            self._held = 0
            self._asked.clear()


def _default_limit() -> int:
    text = os.environ.get("MINRNN_CPU_CACHE_MB", "1024")
    try:
        mb = float(text)
    except ValueError:
        raise ValueError(f"MINRNN_CPU_CACHE_MB must be a number of MiB (0 turns the cache off), got {text!r}") from None
    return int(mb * (1 << 20))


#: The cache the CPU kernels allocate their outputs from. Its limit is MINRNN_CPU_CACHE_MB
#: (MiB of idle blocks, default 1024; 0 turns it off); change it with ``output_cache_limit``.
OUTPUT_CACHE = OutputCache(_default_limit() if HAVE_NUMBA else 0)
if HAVE_NUMBA:
    _NP_DTYPES = {torch.float32: np.float32, torch.float64: np.float64}


@contextlib.contextmanager
def output_cache_limit(limit_bytes: int):
    """Within the block, the cache holds at most ``limit_bytes`` idle (0: off, every output a
    fresh allocation, which PyTorch's profiler then sees); the old limit is restored after."""
    before = OUTPUT_CACHE.limit_bytes
    OUTPUT_CACHE.limit_bytes = int(limit_bytes)
    if limit_bytes <= 0:
        OUTPUT_CACHE.clear()
    try:
        yield OUTPUT_CACHE
    finally:
        OUTPUT_CACHE.limit_bytes = before


def empty_output_cache() -> None:
    """Give the idle blocks of the CPU kernels' output cache back to the allocator."""
    OUTPUT_CACHE.clear()


# --- torch glue -------------------------------------------------------------------------

def _flat(x: Tensor):
    """(flat 1-D numpy view of x's storage span, (batch stride, time stride)) for a (B, T, C)
    CPU tensor whose channel stride is 1 (copied once if it is not)."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    strides = np.array(x.stride()[:2], dtype=np.int64)
    if x.is_contiguous():  # the common case, and the cheaper view (this runs on every call)
        return x.detach().view(-1).numpy(), strides
    B, T, C = x.shape
    span = (B - 1) * x.stride(0) + (T - 1) * x.stride(1) + C
    return torch.as_strided(x.detach(), (span,), (1,), x.storage_offset()).numpy(), strides


def _launch(kernel, numel: int, *args) -> None:
    threads = numba.get_num_threads()
    if numel >= SERIAL_BELOW or threads == 1:
        kernel(*args)
        return
    numba.set_num_threads(1)
    try:
        kernel(*args)
    finally:
        numba.set_num_threads(threads)


def _block(B: int, C: int) -> int:
    """Channels per work item: all of them, unless that leaves threads idle."""
    want = 2 * numba.get_num_threads()  # work items, for load balance
    if B >= want:
        return C
    blocks = min(-(-want // B), max(1, C // MIN_BLOCK))
    return -(-C // blocks)


def _kernels(dtype: torch.dtype) -> dict:
    if dtype not in (torch.float32, torch.float64):
        raise TypeError(f"backend 'cpu' computes float32 and float64, got {dtype}")
    return _KERNELS


def _start(h0: Tensor | None, like: Tensor) -> Tensor:
    return like.new_zeros(like.shape[0], like.shape[2]) if h0 is None else h0.detach().contiguous()


def _outputs(like: Tensor, n: int):
    """n new contiguous (B, T, C) tensors, their flat numpy views and their strides."""
    ts = [OUTPUT_CACHE.empty(tuple(like.shape), like.dtype) for _ in range(n)]
    strides = np.array([like.shape[1] * like.shape[2], like.shape[2]], dtype=np.int64)
    return ts, [t.view(-1).numpy() for t in ts], strides


class _Scan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, h0):
        start = _start(h0, a)
        (h,), (h_np,), os_ = _outputs(a, 1)
        _launch(_kernels(a.dtype)["scan_fwd"], a.numel(), *_flat(a), *_flat(b), start.numpy(), h_np, os_, *a.shape, _block(a.shape[0], a.shape[2]))
        ctx.save_for_backward(a, h, start)
        ctx.has_h0 = h0 is not None
        return h

    @staticmethod
    def backward(ctx, dh):
        a, h, start = ctx.saved_tensors
        (da, db), (da_np, db_np), os_ = _outputs(h, 2)
        dh0 = torch.empty_like(start)
        _launch(_kernels(a.dtype)["scan_bwd"], a.numel(), *_flat(a), *_flat(h), start.numpy(), *_flat(dh), da_np, db_np, os_,
                                      dh0.numpy(), *a.shape, _block(a.shape[0], a.shape[2]))
        return da, db, (dh0 if ctx.has_h0 else None)


def cpu_scan(a: Tensor, b: Tensor, h0: Tensor | None = None) -> Tensor:
    """The scan backend: a, b (B, T, C), h0 (B, C) or None -> h (B, T, C)."""
    return _Scan.apply(a, b, h0)


def _columns(pre: Tensor, n: int):
    """Flat numpy views of the n channel blocks of packed (B, T, n*C) ``pre``, and its strides."""
    flat, strides = _flat(pre)
    C = pre.shape[-1] // n
    return [flat[j * C:] for j in range(n)], strides


class _Cell(torch.autograd.Function):
    """A fused cell over packed pre-activations (B, T, n*C): ``kind`` is "mingru" (n = 2:
    hidden, gate) or "minlstm" (n = 3: hidden, forget, input)."""

    @staticmethod
    def forward(ctx, pre, h0, kind, normalize):
        h, start = _cell_forward(pre, None, h0, kind, normalize, keep=False)  # pre is the caller's: kept intact
        ctx.save_for_backward(pre, h, start)
        ctx.kind, ctx.normalize, ctx.has_h0 = kind, normalize, h0 is not None
        return h

    @staticmethod
    def backward(ctx, dh):
        pre, h, start = ctx.saved_tensors
        dpre, _, dh0 = _cell_backward(pre, None, h, start, dh, ctx.kind, ctx.normalize)
        return dpre, (dh0 if ctx.has_h0 else None), None, None


def _cell_forward(pre: Tensor, bias: Tensor | None, h0: Tensor | None, kind: str, normalize: bool, keep: bool,
                  h: Tensor | None = None):
    """The forward kernel on packed pre-activations (B, T, n*C) plus ``bias`` (n*C,) or None:
    (h (B, T, C), the start state it used (B, C)). ``keep``: overwrite ``pre`` with what
    ``_cell_backward(in_place=True)`` reads instead of recomputing (the exps, bias added). ``h``: a
    buffer to write h into (a new one when None)."""
    n = 2 if kind == "mingru" else 3
    B, T, nC = pre.shape
    C = nC // n
    start = _start(h0, pre[..., :C])
    if h is None:
        h = OUTPUT_CACHE.empty((B, T, C), pre.dtype)
    cols, ps = _columns(pre, n)
    args = [a for col in cols for a in (col, ps)] + [_bias(bias, nC, pre.dtype), start.numpy()]
    args += [bool(normalize), bool(keep)] if kind == "minlstm" else [bool(keep)]
    _launch(_kernels(pre.dtype)[kind + "_fwd"], h.numel(), *args, h.view(-1).numpy(),
            np.array([T * C, C], dtype=np.int64), B, T, C, _block(B, C))
    return h, start


def _cell_backward(pre: Tensor, bias: Tensor | None, h: Tensor, start: Tensor, dh: Tensor, kind: str, normalize: bool,
                   in_place: bool = False):
    """The backward kernel: (dL/dpre (B, T, n*C), dL/dbias per batch row (B, n*C), dL/dh0 (B, C)).

    ``in_place``: dL/dpre is written over ``pre`` (and returned), which holds what
    ``_cell_forward(keep=True)`` left there (``bias`` is then already in it, and unused)."""
    n = 2 if kind == "mingru" else 3
    B, T, C = h.shape
    dbias = torch.empty(B, n * C, dtype=pre.dtype)  # one row per batch row: no two threads share one
    cols, ps = _columns(pre, n)
    dh0 = torch.empty_like(start)
    if in_place:
        args = [a for col in cols for a in (col, ps)] + [*_flat(h), start.numpy(), *_flat(dh)]
        if kind == "minlstm":
            args.append(normalize)
        _launch(_kernels(h.dtype)[kind + "_bwd_in_place"], h.numel(), *args, dh0.numpy(), dbias.numpy(), B, T, C, _block(B, C))
        return pre, dbias, dh0
    dpre = OUTPUT_CACHE.empty(tuple(pre.shape), pre.dtype)
    dcols, dps = _columns(dpre, n)
    args = [a for col in cols for a in (col, ps)] + [_bias(bias, n * C, pre.dtype), *_flat(h), start.numpy(), *_flat(dh)]
    if kind == "minlstm":
        args.append(normalize)
    _launch(_kernels(h.dtype)[kind + "_bwd"], h.numel(), *args, *dcols, dps, dh0.numpy(), dbias.numpy(), B, T, C, _block(B, C))
    return dpre, dbias, dh0


def _bias(bias: Tensor | None, size: int, dtype: torch.dtype):
    return np.zeros(size, dtype=np.float32 if dtype == torch.float32 else np.float64) if bias is None else bias.detach().contiguous().numpy()


class _ProjectedCell(torch.autograd.Function):
    """A whole layer, x -> Linear -> fused cell, as one Function (see ``cpu_projected_cell``).

    The pre-activations are this Function's own buffer and the only (B, T, n*C) one it
    touches: the backward kernel writes dL/dpre over them, which the backward's matmuls then
    read (the forward kernel has left its exps there, which the backward reads instead of
    the pre-activations). A second backward through the same graph
    (retain_graph=True) finds them consumed and first recomputes them from x and weight.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, h0, kind, normalize):
        pre = _projection(x, weight)
        ctx.consumed = False
        h, start = _cell_forward(pre, bias, h0, kind, normalize, keep=True)
        ctx.save_for_backward(x, weight, bias, pre, h, start)
        ctx.kind, ctx.normalize, ctx.has_h0 = kind, normalize, h0 is not None
        return h

    @staticmethod
    def backward(ctx, dh):
        x, weight, bias, pre, h, start = ctx.saved_tensors
        if ctx.consumed:  # an earlier backward wrote its gradient over them: the forward again
            pre = _projection(x, weight)
            _cell_forward(pre, bias, start, ctx.kind, ctx.normalize, keep=True, h=OUTPUT_CACHE.empty(h.shape, h.dtype))
        dpre, dbias, dh0 = _cell_backward(pre, bias, h, start, dh, ctx.kind, ctx.normalize, in_place=True)
        ctx.consumed = True
        B, T, I = x.shape
        dpre2 = dpre.view(B * T, -1)
        dx = torch.mm(dpre2, weight.detach()).view(B, T, I) if ctx.needs_input_grad[0] else None
        dw = torch.mm(dpre2.t(), x.detach().reshape(B * T, I)) if ctx.needs_input_grad[1] else None
        db = dbias.sum(0) if bias is not None and ctx.needs_input_grad[2] else None
        return dx, dw, db, (dh0 if ctx.has_h0 else None), None, None


def _projection(x: Tensor, weight: Tensor) -> Tensor:
    """x @ weight.T into a new (B, T, n*C) buffer, without the bias (the kernels add it)."""
    B, T, I = x.shape
    pre = OUTPUT_CACHE.empty((B, T, weight.shape[0]), x.dtype)
    torch.mm(x.detach().reshape(B * T, I), weight.detach().t(), out=pre.view(B * T, -1))
    return pre


def cpu_mingru(hidden: Tensor, gate: Tensor, h0: Tensor | None) -> Tensor:
    """Fused minGRU: hidden, gate (B, T, C), h0 (B, C) or None -> h (B, T, C)."""
    return _Cell.apply(pack_chunks((hidden, gate)), h0, "mingru", False)


def cpu_minlstm(hidden: Tensor, forget: Tensor, input: Tensor, h0: Tensor | None, normalize: bool) -> Tensor:
    """Fused minLSTM: hidden, forget, input (B, T, C), h0 (B, C) or None -> h (B, T, C)."""
    return _Cell.apply(pack_chunks((hidden, forget, input)), h0, "minlstm", bool(normalize))


def cpu_projected_cell(kind: str, x: Tensor, weight: Tensor, bias: Tensor | None, h0: Tensor | None,
                       normalize: bool = True) -> Tensor:
    """A layer's projection and cell in one: x (B, T, I), weight (n*C, I), bias (n*C,) or None,
    h0 (B, C) or None -> h (B, T, C), the cell ``kind`` ("mingru", n = 2; "minlstm", n = 3)
    applied to ``x @ weight.T + bias`` split into n chunks of C.

    Why one Function: nn.Linear adds its bias by first writing it into the whole output and
    sums dL/dbias in another pass over dL/dpre; here the cell's kernels add the bias as they
    read the pre-activations and sum its gradient as they write theirs, which saves those
    passes over B*T*n*C values.
    Float32 or float64, every argument on the CPU in one dtype.
    """
    return _ProjectedCell.apply(x, weight, bias, h0, kind, bool(normalize))


def _time_span(B: int, T: int) -> int:
    """Time steps per work item of the conv kernels: the whole row unless that leaves threads idle."""
    want = 2 * numba.get_num_threads()
    return T if B >= want else max(1, -(-T // -(-want // B)))


class _CausalConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        B, T, C = x.shape
        K = weight.shape[-1]
        x = x.contiguous()
        wt = weight.detach().reshape(C, K).t().contiguous()
        b = x.new_zeros(C) if bias is None else bias.detach().contiguous()
        y = OUTPUT_CACHE.empty((B, T, C), x.dtype)
        span = _time_span(B, T)
        _launch(_kernels(x.dtype)["conv_fwd"], x.numel(), x.detach().numpy(), wt.numpy(), b.numpy(), y.numpy(),
                B, T, C, K, span)
        ctx.save_for_backward(x, wt)
        ctx.weight_shape, ctx.has_bias = weight.shape, bias is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        x, wt = ctx.saved_tensors
        B, T, C = x.shape
        K = wt.shape[0]
        dy = dy.contiguous()
        span = _time_span(B, T)
        jobs = B * -(-T // span)
        dx = OUTPUT_CACHE.empty((B, T, C), x.dtype)
        dwt_part = x.new_zeros(jobs, K, C)
        db_part = x.new_zeros(jobs, C)
        _launch(_kernels(x.dtype)["conv_bwd"], x.numel(), x.numpy(), wt.numpy(), dy.numpy(), dx.numpy(),
                dwt_part.numpy(), db_part.numpy(), B, T, C, K, span)
        dweight = dwt_part.sum(0).t().reshape(ctx.weight_shape)
        return dx, dweight, (db_part.sum(0) if ctx.has_bias else None)


def cpu_causal_conv(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """Causal depthwise conv, channels-last: x (B, T, C), weight (C, 1, K) or (C, K), bias (C,)
    or None -> y (B, T, C), y_t = bias + sum_j weight[:, j] x_{t-K+1+j} (zeros before t = 0)."""
    return _CausalConv.apply(x, weight, bias)
