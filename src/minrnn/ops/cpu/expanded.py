"""One decoding step of the expanded-state cell on the CPU, compiled by numba: the gates, the
state update and the read of ``minrnn.ops.expanded`` in one kernel instead of a few dozen small
torch calls per layer (``minrnn.ops.expanded.expanded_step_fused`` picks between the two).

Per head i and key slot j, from one row of the mixer's input projection
``[hidden (H d) | the cell's gates (H n each) | query (H n)]``:

    a, k = the cell's decay and input gate of slot (i, j)     (a = 1, k = 0 on a padded row)
    H'[i, j, c] = a H[i, j, c] + k g(hidden[i d + c])
    o[i d + c] = sum_j q[i n + j] H'[i, j, c]

The state is (B, H, n, d), the value axis contiguous, as the torch step's.

The sequence (``expanded_forward`` / ``expanded_backward``, behind the "states" method's CPU
backend) runs the same recurrence from q, k, a = exp(log a) (B, T, H, n) and v (B, T, H, d):
one walk over time per (batch row, head) that keeps the states H_t (B, T, H, n, d) for the
backward, which walks back through them with the gradient of the state.
"""

from numba import njit, prange

from ._math import JIT, PARALLEL_JIT, _const, g_and_slope, lstm_gates, sigmoid_pair


@njit(inline="always", **JIT)
def _slot(row, h, has_h, h_out, o, b, i, j, a, k, q, d):
    """Slot (i, j) of row b: its d entries updated with decay a and key k, read with q into o."""
    for c in range(d):
        v, _ = g_and_slope(row[i * d + c])
        x = k * v
        if has_h:
            x = a * h[b, i, j, c] + x
        h_out[b, i, j, c] = x
        o[b, i * d + c] += q * x


@njit(**JIT)
def expanded_step(pre, h, has_h, mask, has_mask, o, h_out, B, H, n, d, lstm, normalize):
    """pre (B, >= H d + 2 H n) for minGRU, [hidden | gate | query] (z = sigmoid(gate) the key,
    1 - z the decay), or, with ``lstm``, (B, >= H d + 3 H n), [hidden | forget | input | query]
    (the input gate, normalised with ``normalize``, the key; the forget gate the decay).
    h, h_out (B, H, n, d); o (B, H d), zeroed here."""
    E, G = H * d, H * n
    query = E + (2 if lstm else 1) * G
    for b in range(B):
        row = pre[b]
        held = has_mask and mask[b] == 0
        for c in range(E):
            o[b, c] = _const(o[b, c], 0.0)
        for i in range(H):
            for j in range(n):
                s = i * n + j
                if held:
                    a, k = _const(row[0], 1.0), _const(row[0], 0.0)
                elif lstm:
                    a, k, _, _ = lstm_gates(row[E + s], row[E + G + s], normalize)
                else:
                    k, a = sigmoid_pair(row[E + s])
                _slot(row, h, has_h, h_out, o, b, i, j, a, k, row[query + s], d)


@njit(**PARALLEL_JIT)
def expanded_forward(q, k, v, a, h0, o, states, B, T, H, n, d):
    """o[b, t, i] = H_t^T q_t and states[b, t, i] = H_t, H_t = diag(a_t) H_{t-1} + k_t v_t^T
    from h0 (B, H, n, d); o (B, T, H, d) and states are written."""
    for job in prange(B * H):
        b, i = job // H, job % H
        for t in range(T):
            for c in range(d):
                o[b, t, i, c] = _const(o[b, t, i, c], 0.0)
            for j in range(n):
                aj, kj, qj = a[b, t, i, j], k[b, t, i, j], q[b, t, i, j]
                for c in range(d):
                    x = kj * v[b, t, i, c]
                    if t > 0:
                        x = aj * states[b, t - 1, i, j, c] + x
                    else:
                        x = aj * h0[b, i, j, c] + x
                    states[b, t, i, j, c] = x
                    o[b, t, i, c] += qj * x


@njit(**PARALLEL_JIT)
def expanded_backward(q, k, v, a, h0, states, do, dh, dq, dk, dv, da, B, T, H, n, d):
    """The gradients of ``expanded_forward``: from do (B, T, H, d) and dh (B, H, n, d), the final
    state's, written into dq, dk, da (B, T, H, n), dv (B, T, H, d); dh becomes h0's gradient."""
    for job in prange(B * H):
        b, i = job // H, job % H
        g = dh[b, i]  # the gradient of H_t, carried back in place
        for t in range(T - 1, -1, -1):
            for c in range(d):
                dv[b, t, i, c] = _const(dv[b, t, i, c], 0.0)
            for j in range(n):
                qj, kj, aj = q[b, t, i, j], k[b, t, i, j], a[b, t, i, j]
                sq, sk, sa = _const(qj, 0.0), _const(qj, 0.0), _const(qj, 0.0)
                for c in range(d):
                    gc = g[j, c] + qj * do[b, t, i, c]
                    sq += do[b, t, i, c] * states[b, t, i, j, c]
                    sk += gc * v[b, t, i, c]
                    dv[b, t, i, c] += gc * kj
                    if t > 0:
                        sa += gc * states[b, t - 1, i, j, c]
                    else:
                        sa += gc * h0[b, i, j, c]
                    g[j, c] = aj * gc
                dq[b, t, i, j], dk[b, t, i, j], da[b, t, i, j] = sq, sk, sa


#: The cells with a kernel, by name: the (lstm, normalize) arguments before the spec's options
#: (minLSTM's normalize is its one option; minGRU has none).
EXPANDED_STEP_CELLS = {"mingru": (False, False), "minlstm": (True,)}

__all__ = ["expanded_step", "expanded_forward", "expanded_backward", "EXPANDED_STEP_CELLS"]
