"""The expanded-state recurrence: a minGRU / minLSTM whose state per head is a matrix.

Per head, the state H_t is n x d (n key slots, d value channels) and

    H_t = diag(a_t) H_{t-1} + k_t v_t^T        a_t, k_t in (0, 1)^n, v_t in R^d
    o_t = H_t^T q_t                             q_t in R^n, o_t in R^d

the recurrence of HGRN2 (Qin et al. 2024, arXiv 2404.07904) and of gated linear attention
(Yang et al. 2024, arXiv 2312.06635). From a cell of ``minrnn.ops.cells`` (``expanded_gates``):
the cell's decay is a (one per slot), its input gate the key (minGRU's z, minLSTM's i'), its
candidate g(hidden) the value; the query is a projection of its own. With n = 1 and q = 1 it is
the cell's own h_t = a_t h_{t-1} + z_t g(hidden_t).

Layout: q, k and log a are (B, T, H, n), v is (B, T, H, d), the state (B, H, n, d) (the value
axis contiguous: a step scales the rows and adds an outer product, the read sums over rows).
Decays are given as log a (<= 0), or, for the signed cells (a in (-1, 1): ``mingru_signed``,
``minlstm_signed``), as a itself with ``a=`` (the reference, the states method and the step;
the chunked form's relative decays are exponentials of log sums, so it takes log a only).
A padded position (``mask`` False) is the identity (a = 1, k = 0); a document start
(``reset`` True) forgets the state first (a = 0).

Three implementations of one function:

    expanded_scan_reference   the per-step loop (the definition; the tests' reference)
    expanded_scan_chunked     chunkwise parallel: within a chunk of C positions the outputs are
                              masked products with the relative decays exp(sum of log a over
                              (j, i]), every exponent <= 0; between chunks the state is passed
                              on, one elementwise update per chunk
    expanded_scan_states      each of the n d entries of a head's state is a scalar recurrence
                              h = a h + k v with its slot's a: one scan (``minrnn.ops.scan``, any
                              backend, the CPU and GPU kernels included) over (B, T, H n d)
                              channels, then the read o_t = H_t^T q_t; it holds every H_t
                              (memory O(T H n d) against the chunked form's O(T H n C)). On
                              the "cpu" backend (float32/float64) the scan and the read are one
                              compiled walk over time each way (``minrnn.ops.cpu.expanded``)

``expanded_scan(..., method=)`` picks one ("states", the default, or "chunked"); the docs'
design page has their timings.

Half-precision inputs are computed in float32; the outputs come back in the input dtype and the
final state in float32.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import cpu, resolve_backend, scan
from .cells import CellSpec, g, get_cell
from .checks import accumulation_dtype, check_finite_state, check_float_tensor, check_mask, check_reset
from .step import fused_applies

if cpu.HAVE_NUMBA:
    from .cpu.expanded import EXPANDED_STEP_CELLS as _STEP_CELLS
    from .cpu.expanded import expanded_backward as _backward_kernel
    from .cpu.expanded import expanded_forward as _forward_kernel
    from .cpu.expanded import expanded_step as _step_kernel
else:  # pragma: no cover - exercised only where numba is absent
    _STEP_CELLS = {}


def expanded_gates(cell: str | CellSpec, pre: tuple[Tensor, ...], options: tuple = ()) -> tuple[Tensor, Tensor, Tensor]:
    """(log a, k, v) of a cell's pre-activations: its decay and input gate from its gates
    pre-activations, its candidate g(hidden) as the value. For a signed cell (``spec.signed``)
    the first is the decay a itself, in (-1, 1) (it has no log), for ``a=`` of the scans.

    ``pre`` is the cell's pre-activations in ``pre_names`` order, the first being "hidden"; the
    others (the gates) may be a different width than hidden's. The gates are read from the cell's
    ``log_gates`` (signed: ``gates``) at g(hidden) = 1 (hidden = 0.5), where b is the input gate:
    this holds for every cell whose b is its input gate times g(hidden), the built-in ones included.
    """
    spec = get_cell(cell)
    check_expandable(spec)
    hidden, gates = pre[0], pre[1:]
    one = torch.full_like(gates[0], 0.5)
    if spec.signed:
        a, k = spec.gates(one, *gates, *options)
        return a, k, g(hidden)
    log_a, log_k = spec.log_gates(one, *gates, *options)
    return log_a, torch.exp(log_k), g(hidden)


def check_expandable(spec: CellSpec) -> None:
    """A cell the expanded state can run: one with a log form (decays in (0, 1)) or a signed one
    (decays in (-1, 1)), whose first pre-activation is the candidate "hidden"; else a one-line
    ValueError."""
    if spec.log_gates is None and not spec.signed:
        raise ValueError(f"state_expansion > 1 needs a cell with decays in (0, 1) and a log form, or a signed cell; "
                         f"cell {spec.name!r} has neither")
    if spec.pre_names[0] != "hidden":
        raise ValueError(f"state_expansion > 1 needs a cell whose first pre-activation is 'hidden' (the value); "
                         f"cell {spec.name!r} has {spec.pre_names}")


def _decays(log_a: Tensor | None, a: Tensor | None) -> tuple[Tensor, bool]:
    """(the decays given, whether they are a itself): exactly one of log_a and a."""
    if (log_a is None) == (a is None):
        raise TypeError("give the decays as exactly one of log_a (in (-inf, 0]) and a= (signed, in (-1, 1))")
    return (log_a, False) if a is None else (a, True)


def _check(q, k, v, log_a, h0, mask, reset, signed=False) -> tuple[int, int, int, int, int]:
    names = ("q", "k", "v", "a" if signed else "log_a")
    for name, x in zip(names, (q, k, v, log_a)):
        check_float_tensor(name, x)
        if x.dim() != 4:
            raise ValueError(f"{name} must be (batch, time, heads, {'d' if name == 'v' else 'n'}), "
                             f"got shape {tuple(x.shape)}")
        if x.dtype != q.dtype:
            raise TypeError(f"{name} has dtype {x.dtype} but q has {q.dtype}; pass one dtype")
        if x.device != q.device:
            raise ValueError(f"{name} is on {x.device} but q is on {q.device}")
    B, T, H, n = q.shape
    for name, x in (("k", k), (names[3], log_a)):
        if x.shape != q.shape:
            raise ValueError(f"{name} must have the shape of q {tuple(q.shape)}, got {tuple(x.shape)}")
    if v.shape[:3] != (B, T, H):
        raise ValueError(f"v must be (batch, time, heads, d) = ({B}, {T}, {H}, d), got {tuple(v.shape)}")
    d = v.shape[3]
    if h0 is not None:
        check_float_tensor("h0", h0)
        if h0.shape != (B, H, n, d):
            raise ValueError(f"h0 must be (batch, heads, n, d) = {(B, H, n, d)}, got shape {tuple(h0.shape)}")
        if h0.device != q.device:
            raise ValueError(f"h0 is on {h0.device} but q is on {q.device}")
        check_finite_state(h0)
    check_mask(mask, (B, T), q.device, "(batch, time)")
    check_reset(reset, (B, T), q.device, "(batch, time)")
    return B, T, H, n, d


def _boundaries(k: Tensor, log_a: Tensor, mask: Tensor | None, reset: Tensor | None,
                signed: bool = False) -> tuple[Tensor, Tensor]:
    """(k, log a) with padding as identity steps (a = 1, k = 0) and document starts as a = 0
    (``signed``: the decays are a itself)."""
    one, zero = (1.0, 0.0) if signed else (0.0, -torch.inf)
    if mask is not None:
        m = mask[:, :, None, None]
        k = torch.where(m, k, torch.zeros((), dtype=k.dtype, device=k.device))
        log_a = torch.where(m, log_a, torch.full((), one, dtype=log_a.dtype, device=log_a.device))
    if reset is not None:
        log_a = torch.where(reset[:, :, None, None], torch.full((), zero, dtype=log_a.dtype,
                                                                device=log_a.device), log_a)
    return k, log_a


def _prepare(q, k, v, log_a, h0, mask, reset, signed=False):
    B, T, H, n, d = _check(q, k, v, log_a, h0, mask, reset, signed)
    cdt = accumulation_dtype(q.dtype)
    if h0 is not None:
        cdt = torch.promote_types(cdt, h0.dtype)
    q, k, v, log_a = (x.to(cdt) for x in (q, k, v, log_a))
    k, log_a = _boundaries(k, log_a, mask, reset, signed)
    h = torch.zeros(B, H, n, d, dtype=cdt, device=q.device) if h0 is None else h0.to(cdt)
    return q, k, v, log_a, h, (B, T, H, n, d)


def expanded_step(q: Tensor, k: Tensor, v: Tensor, log_a: Tensor | None, h: Tensor, *,
                  a: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """One step without checks: q, k, log_a or a (B, H, n), v (B, H, d), h (B, H, n, d) ->
    (o (B, H, d), the new h (B, H, n, d)). Padding and resets already applied to k and the decays."""
    a = torch.exp(log_a) if a is None else a
    h = a.unsqueeze(-1) * h + k.unsqueeze(-1) * v.unsqueeze(-2)
    return (q.unsqueeze(-1) * h).sum(-2), h


def expanded_step_fused(spec: CellSpec, pre: Tensor, h: Tensor | None, options: tuple, mask: Tensor | None,
                        heads: int, n: int) -> tuple[Tensor, Tensor] | None:
    """One decoding step from the expanded mixer's input projection, in one compiled kernel
    (``minrnn.ops.cpu.expanded``): ``expanded_gates`` then ``expanded_step``'s numbers.

    Args:
        spec: the cell (mingru or minlstm have a kernel); options: its option values.
        pre: (B, E + (gates + 1) H n), [hidden (E = H d) | each gate (H n) | query (H n)].
        h: (B, H, n, d) the state, or None (zeros).
        mask: (B,) bool, False on a padded row (its state is kept), or None.
        heads, n: H and the key slots per head.
    Returns:
        (o (B, E), the new h (B, H, n, d)) in pre's dtype, or None where the kernel does not
        apply (another cell, numba absent, a GPU, half precision, autograd or torch.compile):
        the caller then runs the torch step.
    """
    cell_args = _STEP_CELLS.get(spec.name)
    if cell_args is None or not fused_applies(pre, h) or not pre.is_contiguous():
        return None
    B = pre.shape[0]
    E = pre.shape[1] - spec.n_pre * heads * n  # the gates and the query are H n wide each
    d = E // heads
    o = torch.empty(B, E, dtype=pre.dtype)
    h_out = torch.empty(B, heads, n, d, dtype=pre.dtype)
    hv = h_out.numpy() if h is None else h.detach().contiguous().numpy()
    mv = o.numpy().reshape(-1) if mask is None else mask.to(pre.dtype).numpy()
    _step_kernel(pre.detach().numpy(), hv, h is not None, mv, mask is not None, o.numpy(), h_out.numpy(),
                 B, heads, n, d, *cell_args, *options)
    return o, h_out


def expanded_scan_reference(q: Tensor, k: Tensor, v: Tensor, log_a: Tensor | None, h0: Tensor | None = None, *,
                            a: Tensor | None = None, mask: Tensor | None = None,
                            reset: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The expanded recurrence as a loop over time (the definition).

    Args:
        q, k: (B, T, H, n) the query and key; log_a: (B, T, H, n) the log decays (<= 0), or None
            with a: (B, T, H, n) the decays themselves (a signed cell's, in (-1, 1)).
        v: (B, T, H, d) the value.
        h0: (B, H, n, d) the start state, zeros when None.
        mask: (B, T) bool, False at padding (identity steps: a = 1, k = 0), or None.
        reset: (B, T) bool, True where a document starts (a = 0), or None.
    Returns:
        (o, h_last): o (B, T, H, d) in the inputs' dtype, h_last (B, H, n, d) in the
        accumulation dtype (float32 for half inputs).
    """
    in_dtype = q.dtype
    dec, signed = _decays(log_a, a)
    q, k, v, dec, h, (B, T, H, n, d) = _prepare(q, k, v, dec, h0, mask, reset, signed)
    a = dec if signed else torch.exp(dec)
    out = []
    for t in range(T):
        o, h = expanded_step(q[:, t], k[:, t], v[:, t], None, h, a=a[:, t])
        out.append(o)
    o = torch.stack(out, 1) if out else v.new_zeros(B, 0, H, d) + (q.sum() + k.sum() + dec.sum()) * 0
    return o.to(in_dtype), h


def _segment_sums(log_a: Tensor) -> Tensor:
    """(..., C) -> (..., C, C): [i, j] = sum of log_a over (j, i] for j <= i, -inf above the
    diagonal. Each entry is summed from its own terms (a cumulative sum per column), not taken as
    a difference of two prefix sums, so no precision is lost where the prefix sums are large."""
    C = log_a.shape[-1]
    x = log_a.unsqueeze(-1).expand(*log_a.shape, C)  # [..., m, j] = log_a[m]
    below = torch.ones(C, C, dtype=torch.bool, device=log_a.device).tril(-1)
    sums = torch.where(below, x, torch.zeros((), dtype=x.dtype, device=x.device)).cumsum(-2)
    return torch.where(below | torch.eye(C, dtype=torch.bool, device=log_a.device), sums,
                       torch.full((), -torch.inf, dtype=x.dtype, device=x.device))


def expanded_scan_chunked(q: Tensor, k: Tensor, v: Tensor, log_a: Tensor | None, h0: Tensor | None = None, *,
                          mask: Tensor | None = None, reset: Tensor | None = None,
                          chunk_size: int = 16) -> tuple[Tensor, Tensor]:
    """``expanded_scan_reference``'s numbers, chunkwise parallel (differentiable by autograd).

    Within a chunk of C positions, o_i = sum_{j<=i} (q_i . (k_j * exp(L_ij))) v_j with
    L_ij = sum of log a over (j, i] (<= 0, so no exponential overflows), plus the state before
    the chunk read through the decay since the chunk's start. The state after each chunk is the
    one before, decayed over the chunk, plus the chunk's own sum of decayed k_j v_j^T: a loop of
    one elementwise update per chunk. Work O(T C n (d + 1)) per head, memory O(T C n).

    Args: as ``expanded_scan_reference`` (log_a only: signed decays have no log), plus
        ``chunk_size`` (C, a positive integer).
    Returns: (o (B, T, H, d), h_last (B, H, n, d)).
    """
    if log_a is None:
        raise ValueError("the chunked form takes log_a (decays in (0, 1)); signed decays (a=) run the "
                         "reference or the states method")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    in_dtype = q.dtype
    q, k, v, log_a, h, (B, T, H, n, d) = _prepare(q, k, v, log_a, h0, mask, reset)
    if B == 0 or T == 0:
        return (v * 0 + (q.sum() + k.sum() + log_a.sum()) * 0).to(in_dtype), h
    C = min(chunk_size, T)
    N = -(-T // C)
    pad = N * C - T
    if pad:  # identity steps at the end (a = 1, k = 0), their outputs dropped
        q, k, v, log_a = (torch.nn.functional.pad(x, (0, 0, 0, 0, 0, pad)) for x in (q, k, v, log_a))
    # (B, H, N, n, C) for the gates, (B, H, N, C, d) for the values
    qc, kc, lc = (x.view(B, N, C, H, n).permute(0, 3, 1, 4, 2) for x in (q, k, log_a))
    vc = v.view(B, N, C, H, d).permute(0, 3, 1, 2, 4)
    L = _segment_sums(lc)  # (B, H, N, n, C, C)
    decay = torch.exp(L)
    # a product and a sum over n, not an einsum of three operands (which runs as many small matmuls)
    scores = (qc.unsqueeze(-1) * decay * kc.unsqueeze(-2)).sum(-3)  # (B, H, N, C, C)
    o = scores @ vc  # within the chunks
    # the chunks' own states (from zero) and their total decays
    into_end = kc * decay[..., -1, :]  # k_j exp(sum of log a over (j, C-1]): (B, H, N, n, C)
    local = into_end @ vc  # (B, H, N, n, d)
    since_start = torch.exp(lc.cumsum(-1))  # decay from before the chunk through i: (B, H, N, n, C)
    total = since_start[..., -1]  # (B, H, N, n)
    before = []
    for z in range(N):
        before.append(h)
        h = total[:, :, z].unsqueeze(-1) * h + local[:, :, z]
    states = torch.stack(before, 2)  # (B, H, N, n, d): the state before each chunk
    o = o + (qc * since_start).transpose(-1, -2) @ states
    o = o.permute(0, 2, 3, 1, 4).reshape(B, N * C, H, d)[:, :T]
    return o.to(in_dtype), h


class _StatesKernel(torch.autograd.Function):
    """The scan over the state's entries and the read, in one compiled walk over time per (batch
    row, head) each way (``minrnn.ops.cpu.expanded``): q, k, a (B, T, H, n), v (B, T, H, d), h0
    (B, H, n, d), one float32/float64 dtype on the CPU -> (o (B, T, H, d), h_last (B, H, n, d))."""

    @staticmethod
    def forward(ctx, q, k, v, a, h0):
        B, T, H, n = q.shape
        d = v.shape[3]
        q, k, v, a, h0 = (x.detach().contiguous() for x in (q, k, v, a, h0))
        o = torch.empty(B, T, H, d, dtype=q.dtype)
        states = torch.empty(B, T, H, n, d, dtype=q.dtype)
        _forward_kernel(*(x.numpy() for x in (q, k, v, a, h0, o, states)), B, T, H, n, d)
        ctx.save_for_backward(q, k, v, a, h0, states)
        return o, states[:, -1].clone()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, do, dh):
        q, k, v, a, h0, states = ctx.saved_tensors
        B, T, H, n = q.shape
        d = v.shape[3]
        do = torch.zeros_like(states[..., 0, :]) if do is None else do.contiguous()
        dh = torch.zeros_like(h0) if dh is None else dh.clone(memory_format=torch.contiguous_format)
        dq, dk, da = (torch.empty_like(q) for _ in range(3))
        dv = torch.empty_like(v)
        _backward_kernel(*(x.numpy() for x in (q, k, v, a, h0, states, do, dh, dq, dk, dv, da)), B, T, H, n, d)
        return dq, dk, dv, da, dh


def _states_kernel_applies(x: Tensor, backend: str) -> bool:
    """Whether ``_StatesKernel`` runs the "states" method: numba present, the scan backend
    "cpu" (by name or as "auto" on the CPU), float32/float64, outside torch.compile."""
    return (cpu.HAVE_NUMBA and x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64)
            and not torch.compiler.is_compiling() and resolve_backend(backend, x.device).name == "cpu")


def expanded_scan_states(q: Tensor, k: Tensor, v: Tensor, log_a: Tensor | None, h0: Tensor | None = None, *,
                         a: Tensor | None = None, mask: Tensor | None = None, reset: Tensor | None = None,
                         backend: str = "auto") -> tuple[Tensor, Tensor]:
    """``expanded_scan_reference``'s numbers from one scan over the state's entries.

    Entry (slot i, channel c) of a head's state follows h = a_i h + k_i v_c, a first-order
    recurrence like the minGRU's: the decays (broadcast over the d channels) and the inputs
    k v^T go to ``minrnn.ops.scan`` with ``backend`` as (B, T, H n d) channels, and the states
    it returns are read with the query. Where the backend is "cpu" ("auto" on the CPU with
    numba) and the dtype float32/float64, the scan and the read run as one compiled kernel each
    way (``_StatesKernel``), without forming the (B, T, H n d) decays and inputs.

    Args: as ``expanded_scan_reference``, plus ``backend`` (a scan backend, as ``minrnn.scan``;
        signed decays need one that takes them: not "log").
    Returns: (o (B, T, H, d), h_last (B, H, n, d)).
    """
    in_dtype = q.dtype
    dec, signed = _decays(log_a, a)
    q, k, v, dec, h, (B, T, H, n, d) = _prepare(q, k, v, dec, h0, mask, reset, signed)
    if B == 0 or T == 0:
        return (v * 0 + (q.sum() + k.sum() + dec.sum()) * 0).to(in_dtype), h
    a = dec if signed else torch.exp(dec)
    if _states_kernel_applies(q, backend):  # the kernel takes a of any sign
        o, h_last = _StatesKernel.apply(q, k, v, a, h)
        return o.to(in_dtype), h_last
    a = a.unsqueeze(-1).expand(B, T, H, n, d).reshape(B, T, H * n * d)
    b = (k.unsqueeze(-1) * v.unsqueeze(-2)).reshape(B, T, H * n * d)
    states = scan(a, b, h.reshape(B, H * n * d), backend=backend).view(B, T, H, n, d)
    o = (q.unsqueeze(-1) * states).sum(-2)
    return o.to(in_dtype), states[:, -1]


METHODS = ("states", "chunked")


def expanded_scan(q: Tensor, k: Tensor, v: Tensor, log_a: Tensor | None, h0: Tensor | None = None, *,
                  a: Tensor | None = None, mask: Tensor | None = None, reset: Tensor | None = None,
                  method: str = "states", backend: str = "auto", chunk_size: int = 16) -> tuple[Tensor, Tensor]:
    """The expanded recurrence over a sequence by ``method``: "states" (``expanded_scan_states``
    with the scan ``backend``) or "chunked" (``expanded_scan_chunked`` with ``chunk_size``; log_a
    only). Arguments and returns as ``expanded_scan_reference``."""
    if method == "states":
        return expanded_scan_states(q, k, v, log_a, h0, a=a, mask=mask, reset=reset, backend=backend)
    if method == "chunked":
        if a is not None:
            raise ValueError("method='chunked' takes log_a (decays in (0, 1)); signed decays (a=) need method='states'")
        return expanded_scan_chunked(q, k, v, log_a, h0, mask=mask, reset=reset, chunk_size=chunk_size)
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")


__all__ = ["METHODS", "expanded_gates", "check_expandable", "expanded_step", "expanded_step_fused",
           "expanded_scan_reference",
           "expanded_scan_chunked", "expanded_scan_states", "expanded_scan"]
