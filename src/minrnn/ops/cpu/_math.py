"""Scalar math of the CPU kernels, compiled by numba and inlined into them: exp, sigmoid
pairs, the candidate map g, minLSTM's gates, and the forms the forward keeps for the backward.

float32 exp is a polynomial (Cephes' expf: Cody-Waite range reduction, degree-5 polynomial,
about 1 ulp) built from arithmetic and a bit cast, so LLVM vectorises it; libm's exp is a
scalar call that would block vectorisation. Its argument is clamped to [-87, 88], so below
-87 it returns exp(-87) ~ 1.6e-38 instead of a subnormal or 0: a value that small (a
saturated gate, its derivative) may be off by about that much, absolutely. float64 uses
libm's exp.

Gates are formed from e = exp(-|k|): sigmoid(|k|) = 1/(1+e), sigmoid(-|k|) = e/(1+e), so
both z and 1 - z are accurate even when one of them is ~1e-30, and their product (the gate's
derivative) is too.

Compiled once per machine: ``cache=True`` writes the machine code beside this file (or, where
the package directory is read-only, into numba's user cache directory); MINRNN_NUMBA_CACHE=0
turns that off. The one fast-math flag is "contract": a * b + c may become one fused
multiply-add (one rounding instead of two, so no less accurate); nothing is reordered and
inf/NaN keep their IEEE meaning.
"""

import math
import os

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic, overload

# A minLSTM element whose forget or input pre-activation is below -RAW_BELOW is kept as it
# is rather than as its exps (see lstm_kept_forms): exp(-60) ~ 9e-27 leaves the kept form's
# products far inside the normal range of float32.
RAW_BELOW = 60.0

CACHE = os.environ.get("MINRNN_NUMBA_CACHE", "1") != "0"
#: numba options of every kernel and helper
JIT = dict(nogil=True, fastmath={"contract"}, cache=CACHE, error_model="numpy")
PARALLEL_JIT = dict(JIT, parallel=True)


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


@njit(inline="always", **JIT)
def exp32(x):
    x = min(max(x, _LO), _HI)
    # n = round(x / ln 2): adding and subtracting 1.5 * 2^23 rounds to an integer in two
    # vector adds, cheaper than floor + convert
    n = (x * _LOG2E + _ROUNDER) - _ROUNDER
    r = x - n * _LN2_HI - n * _LN2_LO
    p = (((((_P0 * r + _P1) * r + _P2) * r + _P3) * r + _P4) * r + _P5) * r * r + r + _ONE
    return p * _bits_to_float32((np.int32(n) + np.int32(127)) << np.int32(23))


@njit(inline="always", **JIT)
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


@njit(inline="always", **JIT)
def inv_rms(sum_sq, D, eps):
    """1 / sqrt(mean(x^2) + eps) from the float64 sum of D squares, rounded as MinRNNRMSNorm
    rounds it: the mean in float32, the root in float64, the result in float32."""
    mean = np.float32(np.float32(sum_sq) / np.float32(D))
    return np.float32(1.0 / math.sqrt(np.float64(mean) + np.float64(eps)))


@njit(inline="always", **JIT)
def _sign_clear(v):
    """v's sign bit is clear: v >= 0 except that -0.0 counts as negative (see g_from_kept)."""
    return math.copysign(_const(v, 1.0), v) > _const(v, 0.0)


@njit(inline="always", **JIT)
def sigmoid_pair_of(k, e):
    """(sigmoid(k), sigmoid(-k)) given e = exp(-|k|); of k only its sign is read."""
    one = _const(k, 1.0)
    s = one / (one + e)
    if _sign_clear(k):
        return s, e * s
    return e * s, s


@njit(inline="always", **JIT)
def sigmoid_pair(k):
    """(sigmoid(k), sigmoid(-k)), each accurate to its own relative precision."""
    return sigmoid_pair_of(k, _exp(-abs(k)))


@njit(inline="always", **JIT)
def g_slope_below(e):
    """g(x) and g'(x) for x < 0 given e = exp(x): sigmoid(x) and sigmoid(x)(1 - sigmoid(x))."""
    s = e / (_const(e, 1.0) + e)
    return s, s * (_const(e, 1.0) - s)


@njit(inline="always", **JIT)
def g_and_slope(x):
    """g(x) and g'(x): x + 1/2 and 1 for x >= 0; sigmoid(x) and sigmoid(x)(1 - sigmoid(x)) below."""
    s, slope = g_slope_below(_exp(min(x, _const(x, 0.0))))
    if x >= 0:
        return x + _const(x, 0.5), _const(x, 1.0)
    return s, slope


# What a layer's forward leaves in its pre-activations for the backward (cpu_projected_cell
# owns them, so they may be overwritten): the exps, which are most of the backward's work
# (docs/design.md has the measurement). The gate slot gets
# copysign(exp(-|k|), k), which sigmoid_pair_of decodes; the hidden slot gets g(x) where
# x >= 0 (at least 1/2: positive) and -exp(x) below (sign bit set). Reading the sign bit
# rather than comparing with 0 keeps the branch where exp underflowed to 0 (float64, |k|
# or -x past ~745: the value is then -0.0). The backward's values are then exactly those
# a recomputation gives.


@njit(inline="always", **JIT)
def g_kept_form(x, ex):
    """What g_from_kept reads for x, given ex = exp(min(x, 0))."""
    return x + _const(x, 0.5) if x >= _const(x, 0.0) else -ex


@njit(inline="always", **JIT)
def g_from_kept(v):
    """g(x) and g'(x) from what the forward kept of x."""
    if _sign_clear(v):
        return v, _const(v, 1.0)
    return g_slope_below(-v)


@njit(inline="always", **JIT)
def lstm_gates(f, inp, normalize):
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
        ef, ei = _exp(-abs(f)), _exp(-abs(inp))
        uf, ui = one + ef, one + ei
        d = max(-f, zero) - max(-inp, zero)  # F - I
        e = _exp(-abs(d))
        if d <= zero:
            p, q = ui, e * uf
        else:
            p, q = e * ui, uf
        inv = one / (p + q)
        nf = (ef if f >= zero else one) / uf  # sigmoid(-f) = exp(-max(f, 0)) / u_f
        ni = (ei if inp >= zero else one) / ui
        return p * inv, q * inv, nf, ni
    sf, nf = sigmoid_pair(f)
    s_inp, ni = sigmoid_pair(inp)
    return sf, s_inp, nf, ni


# What minLSTM's forward leaves in its three slots, and what its backward reads: per
# element (f, i, x, bias added), the forget and input slots get copysign(exp(-|k|), k)
# and the hidden slot g's kept form (g_from_kept). From those two exps alone the gates are
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


@njit(inline="always", **JIT)
def lstm_kept_forms(x, f, inp, normalize):
    """(kept x, kept f, kept i) for one element, bias added (see above). Not normalised,
    the sigmoids' exps are all the gates need at any k, and no element is raw."""
    zero = _const(f, 0.0)
    ex, ef, ei = _exp(min(x, zero)), _exp(-abs(f)), _exp(-abs(inp))
    x_kept = g_kept_form(x, ex)
    if normalize and min(f, inp) < _const(f, -RAW_BELOW):
        return x_kept, f, inp
    return x_kept, math.copysign(ef, f), math.copysign(ei, inp)


@njit(inline="always", **JIT)
def lstm_gates_from_kept(f_kept, inp_kept, normalize):
    """lstm_gates' (a, i', sigmoid(-f), sigmoid(-i)) from kept, not raw, slots."""
    one = _const(f_kept, 1.0)
    ef, ei = abs(f_kept), abs(inp_kept)
    uf, ui = one + ef, one + ei
    f_pos, i_pos = _sign_clear(f_kept), _sign_clear(inp_kept)
    sf, nf = (one, ef) if f_pos else (ef, one)  # sigmoid(+-f) times u_f
    s_inp, ni = (one, ei) if i_pos else (ei, one)
    if normalize:
        p, q = sf * ui, s_inp * uf
        inv = one / (p + q)
        return p * inv, q * inv, nf / uf, ni / ui
    rf, ri = one / uf, one / ui
    return sf * rf, s_inp * ri, nf * rf, ni * ri


@njit(inline="always", **JIT)
def lstm_kept_is_raw(f_kept, inp_kept):
    """Whether an element's kept forget and input slots hold f and i themselves: a kept
    exp is at most 1 in magnitude, a raw element has one below -RAW_BELOW."""
    return max(abs(f_kept), abs(inp_kept)) > _const(f_kept, 1.0)


@njit(inline="always", **JIT)
def lstm_gates_from_any(f_kept, inp_kept, normalize):
    """lstm_gates_from_kept, or lstm_gates for a raw element. Only for rows that have one: a
    loop over this computes lstm_gates' exps for every lane (LLVM does not split a loop on a
    loop-invariant flag choosing between the two per element)."""
    if lstm_kept_is_raw(f_kept, inp_kept):
        return lstm_gates(f_kept, inp_kept, normalize)
    return lstm_gates_from_kept(f_kept, inp_kept, normalize)
