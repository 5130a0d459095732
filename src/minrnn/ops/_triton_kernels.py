"""Triton kernels of the scan h_t = a_t h_{t-1} + b_t and of its gradient.

Imported only by ``minrnn.ops.triton``, on first use.

Layout: a, b, h, dh, da, db are contiguous (B, T, C); h0, dh0 are (B, C). One program
owns BLOCK_C channels of one batch row and walks the whole sequence, BLOCK_T steps at a
time: it loads a (BLOCK_T, BLOCK_C) tile, scans it along time with
``tl.associative_scan`` (so the steps of a tile are combined in parallel and the loads
of a tile are one wide memory access rather than BLOCK_T dependent ones), applies the
state carried in from the previous tile, and carries the tile's last state on. Only
products and sums of the inputs appear, as in the chunked backend: any sign is fine.

Arithmetic is in ACC (float32, or float64 for float64 inputs); loads are converted to
ACC and results rounded to the output's dtype once, when stored.
"""

import os

import triton
import triton.language as tl


@triton.jit
def _combine(a_first, b_first, a_then, b_then):
    # Two steps x -> a x + b, the first applied first: x -> a_then (a_first x + b_first) + b_then.
    return a_first * a_then, a_then * b_first + b_then


@triton.jit
def _program_block(T, C, n_cblocks, BLOCK_C: tl.constexpr):
    """This program's batch row, channels (and their mask) and the offset of its sequence."""
    # one flat grid axis (axis 1 would cap the batch at 65,535 on CUDA)
    pid = tl.program_id(0)
    pid_b = (pid // n_cblocks).to(tl.int64)
    cols = (pid % n_cblocks) * BLOCK_C + tl.arange(0, BLOCK_C)
    return pid_b, cols, cols < C, pid_b * T * C  # int64: B * T * C may pass 2^31


@triton.jit
def _last_row(x, rows, BLOCK_T: tl.constexpr):
    # a tile's last row as a vector (a select and a sum: the tile has no indexing)
    return tl.sum(tl.where(rows[:, None] == BLOCK_T - 1, x, 0.0), axis=0)


@triton.jit
def _start_state(h0_ptr, pid_b, C, cols, cmask, HAS_H0: tl.constexpr, ACC: tl.constexpr, BLOCK_C: tl.constexpr):
    """This program's channels of h0 (zeros without one), in ACC."""
    if HAS_H0:
        h = tl.load(h0_ptr + pid_b * C + cols, mask=cmask, other=0.0).to(ACC)
    else:
        h = tl.zeros([BLOCK_C], dtype=ACC)
    return h


@triton.jit
def scan_fwd(a_ptr, b_ptr, h0_ptr, h_ptr, T, C, n_cblocks,
             HAS_H0: tl.constexpr, ACC: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    pid_b, cols, cmask, seq = _program_block(T, C, n_cblocks, BLOCK_C)
    rows = tl.arange(0, BLOCK_T)
    h = _start_state(h0_ptr, pid_b, C, cols, cmask, HAS_H0, ACC, BLOCK_C)
    # num_stages: the loads of the next tiles are issued (cp.async) while this one is
    # scanned, so a long sequence is not one memory latency per tile
    for t0 in tl.range(0, T, BLOCK_T, num_stages=3):
        t = t0 + rows
        mask = (t[:, None] < T) & cmask[None, :]
        off = seq + t[:, None].to(tl.int64) * C + cols[None, :]
        # steps past the end are identities (a = 1, b = 0): the last row is then the state
        a = tl.load(a_ptr + off, mask=mask, other=1.0).to(ACC)
        b = tl.load(b_ptr + off, mask=mask, other=0.0).to(ACC)
        a_cum, b_cum = tl.associative_scan((a, b), 0, _combine)
        hs = a_cum * h[None, :] + b_cum
        tl.store(h_ptr + off, hs.to(h_ptr.dtype.element_ty), mask=mask)
        h = _last_row(hs, rows, BLOCK_T)


@triton.jit
def scan_bwd(a_ptr, h_ptr, h0_ptr, dh_ptr, da_ptr, db_ptr, dh0_ptr, T, C, n_tblocks, n_cblocks,
             HAS_H0: tl.constexpr, ACC: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    # G_t = dh_t + a_{t+1} G_{t+1} (G_T = dh_T), run backwards in time: the same scan
    # with decay a_{t+1}, on tiles whose row 0 is the latest step. db = G,
    # da_t = G_t h_{t-1} (h0, or 0, before the first step), dh0 = a_1 G_1.
    pid_b, cols, cmask, seq = _program_block(T, C, n_cblocks, BLOCK_C)
    rows = tl.arange(0, BLOCK_T)
    if HAS_H0:
        h0 = tl.load(h0_ptr + pid_b * C + cols, mask=cmask, other=0.0).to(ACC)
    g = tl.zeros([BLOCK_C], dtype=ACC)  # G_{t+1} entering the tile from later steps
    for i in tl.range(0, n_tblocks, num_stages=3):
        t = (T - 1 - i * BLOCK_T) - rows  # descending; negative past the start
        inside = (t[:, None] >= 0) & cmask[None, :]
        # offsets clamped into the sequence so that no address, masked or not, leaves it
        t_c = tl.maximum(t, 0)[:, None].to(tl.int64)
        off = seq + t_c * C + cols[None, :]
        dh = tl.load(dh_ptr + off, mask=inside, other=0.0).to(ACC)
        # a_{t+1}; padding rows (t < 0, and t = T-1 where G_{T+1} = 0) are identities
        t_next = tl.minimum(t_c + 1, T - 1)
        a_next = tl.load(a_ptr + seq + t_next * C + cols[None, :],
                         mask=inside & (t[:, None] < T - 1), other=1.0).to(ACC)
        a_cum, g_cum = tl.associative_scan((a_next, dh), 0, _combine)
        gs = a_cum * g[None, :] + g_cum
        t_prev = tl.maximum(t_c - 1, 0)
        h_prev = tl.load(h_ptr + seq + t_prev * C + cols[None, :],
                         mask=inside & (t[:, None] >= 1), other=0.0).to(ACC)
        if HAS_H0:
            h_prev = tl.where(t[:, None] == 0, h0[None, :], h_prev)
        tl.store(db_ptr + off, gs.to(db_ptr.dtype.element_ty), mask=inside)
        tl.store(da_ptr + off, (gs * h_prev).to(da_ptr.dtype.element_ty), mask=inside)
        # the last row is G at the tile's earliest step (padding rows pass it through)
        g = _last_row(gs, rows, BLOCK_T)
    if HAS_H0:
        a1 = tl.load(a_ptr + seq + cols, mask=cmask, other=0.0).to(ACC)
        tl.store(dh0_ptr + pid_b * C + cols, (a1 * g).to(dh0_ptr.dtype.element_ty), mask=cmask)


# --- the fused cells ---------------------------------------------------------------------
#
# minGRU and minLSTM with their gates computed inside the scan kernels, from the packed
# pre-activations (B, T, N_PRE * C): columns [hidden | gate] (minGRU, N_PRE = 2) or
# [hidden | forget | input] (minLSTM, N_PRE = 3), as one nn.Linear produces them. Forward
# reads them and writes h; backward reads them, h and dL/dh and writes dL/d(pre), recomputing
# the gates (of step t and of step t + 1, whose decay the reverse recurrence needs) instead of
# keeping them. Gates as in the CPU kernels: from e = exp(-|k|), so that sigmoid(k) and
# sigmoid(-k) are each accurate when the other is near 1.
#
# Document starts (HAS_RESET): reset (B, T) uint8, 1 where a document starts. There a = 0,
# which the associative scan combines exactly (the products before it vanish); the backward
# reads a_{t+1} = 0 (G stops there) and h_{t-1} = 0 at a start (a is a constant there, so
# no gradient reaches the pre-activations through it), and dh0 = 0 when the row starts one.


@triton.jit
def _starts(reset_ptr, pid_b, T, t, rows_in):
    """Whether a document starts at steps ``t`` (a (BLOCK_T, 1) column) of batch row pid_b;
    False outside ``rows_in``."""
    return tl.load(reset_ptr + pid_b * T + t, mask=rows_in, other=0) != 0


@triton.jit
def _sigmoid_pair(k):
    """(sigmoid(k), sigmoid(-k))."""
    e = tl.exp(-tl.abs(k))
    s = 1.0 / (1.0 + e)
    pos = k >= 0
    return tl.where(pos, s, e * s), tl.where(pos, e * s, s)


@triton.jit
def _g_and_slope(x):
    """g(x) = x + 1/2 for x >= 0, sigmoid(x) below, and its derivative."""
    e = tl.exp(tl.minimum(x, 0.0))
    s = e / (1.0 + e)
    pos = x >= 0
    return tl.where(pos, x + 0.5, s), tl.where(pos, 1.0, s * (1.0 - s))


@triton.jit
def _lstm_gates(f, i, NORMALIZE: tl.constexpr):
    """(a, i', sigmoid(-f), sigmoid(-i)) as ``lstm_gates`` in ops/cpu.py: a = sigmoid(f) and
    i' = sigmoid(i), or normalised to a + i' = 1 from the sigmoids' ratio exp(F - I) u_f / u_i,
    taken in the direction where it is at most 2 (finite and accurate for any f, i)."""
    sf, nf = _sigmoid_pair(f)
    si, ni = _sigmoid_pair(i)
    if NORMALIZE:
        F = tl.maximum(-f, 0.0)
        I = tl.maximum(-i, 0.0)
        rf = tl.maximum(sf, nf)  # 1 / u_f
        ri = tl.maximum(si, ni)
        first = F <= I
        q = tl.exp(-tl.abs(F - I)) * tl.where(first, ri / rf, rf / ri)
        s = 1.0 / (1.0 + q)
        a = tl.where(first, s, q * s)
        ip = tl.where(first, q * s, s)
    else:
        a = sf
        ip = si
    return a, ip, nf, ni


@triton.jit
def _decay_and_input(pre_ptr, off, mask, C, CELL_LSTM: tl.constexpr, NORMALIZE: tl.constexpr, ACC: tl.constexpr):
    """(a, b) of the recurrence at the hidden-column offsets ``off`` of packed pre-activations,
    with the other columns C and 2C further on."""
    x = tl.load(pre_ptr + off, mask=mask, other=0.0).to(ACC)
    k = tl.load(pre_ptr + off + C, mask=mask, other=0.0).to(ACC)
    gx, _ = _g_and_slope(x)
    if CELL_LSTM:
        i = tl.load(pre_ptr + off + 2 * C, mask=mask, other=0.0).to(ACC)
        a, ip, _, _ = _lstm_gates(k, i, NORMALIZE)
        b = ip * gx
    else:
        z, a = _sigmoid_pair(k)
        b = z * gx
    return a, b


@triton.jit
def cell_fwd(pre_ptr, h0_ptr, reset_ptr, h_ptr, T, C, n_cblocks, N_PRE: tl.constexpr, CELL_LSTM: tl.constexpr,
             NORMALIZE: tl.constexpr, HAS_H0: tl.constexpr, HAS_RESET: tl.constexpr, ACC: tl.constexpr,
             BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    pid_b, cols, cmask, seq = _program_block(T, C, n_cblocks, BLOCK_C)
    seq_pre = seq * N_PRE
    rows = tl.arange(0, BLOCK_T)
    h = _start_state(h0_ptr, pid_b, C, cols, cmask, HAS_H0, ACC, BLOCK_C)
    for t0 in tl.range(0, T, BLOCK_T, num_stages=3):
        t = (t0 + rows)[:, None].to(tl.int64)
        mask = (t < T) & cmask[None, :]
        a, b = _decay_and_input(pre_ptr, seq_pre + t * (N_PRE * C) + cols[None, :], mask, C, CELL_LSTM, NORMALIZE, ACC)
        a = tl.where(mask, a, 1.0)  # steps past the end: identities
        b = tl.where(mask, b, 0.0)
        if HAS_RESET:
            a = tl.where(_starts(reset_ptr, pid_b, T, t, t < T), 0.0, a)
        a_cum, b_cum = tl.associative_scan((a, b), 0, _combine)
        hs = a_cum * h[None, :] + b_cum
        tl.store(h_ptr + seq + t * C + cols[None, :], hs.to(h_ptr.dtype.element_ty), mask=mask)
        h = _last_row(hs, rows, BLOCK_T)


@triton.jit
def cell_bwd(pre_ptr, h_ptr, h0_ptr, reset_ptr, dh_ptr, dpre_ptr, dh0_ptr, T, C, n_tblocks, n_cblocks,
             N_PRE: tl.constexpr, CELL_LSTM: tl.constexpr, NORMALIZE: tl.constexpr, HAS_H0: tl.constexpr,
             HAS_RESET: tl.constexpr, ACC: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    # the reverse recurrence of scan_bwd, G_t = dh_t + a_{t+1} G_{t+1}, then per step
    # dL/d(pre) = G_t * d(a_t h_{t-1} + b_t)/d(pre), with the gates recomputed
    pid_b, cols, cmask, seq = _program_block(T, C, n_cblocks, BLOCK_C)
    seq_pre = seq * N_PRE
    rows = tl.arange(0, BLOCK_T)
    if HAS_H0:
        h0 = tl.load(h0_ptr + pid_b * C + cols, mask=cmask, other=0.0).to(ACC)
    g = tl.zeros([BLOCK_C], dtype=ACC)
    for i in tl.range(0, n_tblocks, num_stages=3):
        t = (T - 1 - i * BLOCK_T) - rows
        inside = (t[:, None] >= 0) & cmask[None, :]
        t_c = tl.maximum(t, 0)[:, None].to(tl.int64)
        off = seq + t_c * C + cols[None, :]
        poff = seq_pre + t_c * (N_PRE * C) + cols[None, :]
        dh = tl.load(dh_ptr + off, mask=inside, other=0.0).to(ACC)
        t_next = tl.minimum(t_c + 1, T - 1)
        has_next = inside & (t[:, None] < T - 1)
        a_next, _ = _decay_and_input(pre_ptr, seq_pre + t_next * (N_PRE * C) + cols[None, :], has_next, C,
                                     CELL_LSTM, NORMALIZE, ACC)
        a_next = tl.where(has_next, a_next, 1.0)
        if HAS_RESET:  # a document starting at t + 1: nothing flows back past it
            a_next = tl.where(_starts(reset_ptr, pid_b, T, t_next, (t[:, None] >= 0) & (t[:, None] < T - 1)),
                              0.0, a_next)
        a_cum, g_cum = tl.associative_scan((a_next, dh), 0, _combine)
        gs = a_cum * g[None, :] + g_cum
        h_prev = tl.load(h_ptr + seq + tl.maximum(t_c - 1, 0) * C + cols[None, :],
                         mask=inside & (t[:, None] >= 1), other=0.0).to(ACC)
        if HAS_H0:
            h_prev = tl.where(t[:, None] == 0, h0[None, :], h_prev)
        if HAS_RESET:  # a document starting at t starts from zero
            h_prev = tl.where(_starts(reset_ptr, pid_b, T, t_c, t[:, None] >= 0), 0.0, h_prev)
        x = tl.load(pre_ptr + poff, mask=inside, other=0.0).to(ACC)
        k = tl.load(pre_ptr + poff + C, mask=inside, other=0.0).to(ACC)
        gx, slope = _g_and_slope(x)
        out_ty = dpre_ptr.dtype.element_ty
        if CELL_LSTM:
            ig = tl.load(pre_ptr + poff + 2 * C, mask=inside, other=0.0).to(ACC)
            a, ip, nf, ni = _lstm_gates(k, ig, NORMALIZE)
            if NORMALIZE:
                # a = sf/(sf+si), i' = 1 - a: da/df = a i' sigmoid(-f), da/di = -a i' sigmoid(-i)
                w = (h_prev - gx) * a * ip * gs
                d_forget = w * nf
                d_input = -w * ni
            else:
                d_forget = h_prev * a * nf * gs
                d_input = gx * ip * ni * gs
            tl.store(dpre_ptr + poff + C, d_forget.to(out_ty), mask=inside)
            tl.store(dpre_ptr + poff + 2 * C, d_input.to(out_ty), mask=inside)
            tl.store(dpre_ptr + poff, (ip * slope * gs).to(out_ty), mask=inside)
        else:
            z, a = _sigmoid_pair(k)
            # da/dk = -z a, db/dk = g z a
            tl.store(dpre_ptr + poff + C, (z * a * (gx - h_prev) * gs).to(out_ty), mask=inside)
            tl.store(dpre_ptr + poff, (z * slope * gs).to(out_ty), mask=inside)
        g = _last_row(gs, rows, BLOCK_T)
    if HAS_H0:
        a1, _ = _decay_and_input(pre_ptr, seq_pre + cols, cmask, C, CELL_LSTM, NORMALIZE, ACC)
        if HAS_RESET:
            a1 = tl.where(tl.load(reset_ptr + pid_b * T) != 0, 0.0, a1)
        tl.store(dh0_ptr + pid_b * C + cols, (a1 * g).to(dh0_ptr.dtype.element_ty), mask=cmask)


# Whether these kernels run compiled (CUDA tensors) or in Triton's interpreter (numpy, on
# host tensors): @triton.jit reads TRITON_INTERPRET when it decorates, and triton.language's
# own jit functions were decorated when triton was first imported, so it is one choice for
# the whole process, made before triton is imported.
try:
    INTERPRETED = bool(triton.knobs.runtime.interpret)
except AttributeError:  # triton < 3.4 has no knobs
    INTERPRETED = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")
