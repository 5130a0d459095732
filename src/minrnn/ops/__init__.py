"""The first-order linear recurrence, behind one signature for every backend.

    h_t = a_t * h_{t-1} + b_t,    t = 1 .. T,    h_0 = h0 (zeros when None)

Tensor layout: a, b and h are (batch, time, channels); h0 is (batch, channels).
Channels are the contiguous axis: every backend runs time sequentially (or in chunks)
and batch x channels in parallel.

A backend is a scan ``fn(a, b, h0) -> h`` on validated tensors of one floating dtype
(h0 may be None), optionally with its own cell functions, RMSNorm and causal conv (see
``Backend``): one registry for the four ops, and "auto" picks each op's backend the same way
(the lowest ``auto_rank`` that runs on the device and takes the tensors' dtypes). The cells
themselves are described in ``cells.py``; the norm and the conv are ``norm.rms_norm`` and
``conv.causal_conv``. Adding a backend means a new file in this folder and one
``register(...)`` line at the bottom of this file (docs/design.md).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .checks import accumulation_dtype, check_finite_state, check_scan_inputs, check_sequences  # noqa: F401
from .registry import (  # noqa: F401  (the registry is part of this package's API)
    BACKENDS,
    OPS,
    Backend,
    ScanFn,
    available_backends,
    check_backend_takes_cell,
    register,
    resolve_backend,
)


def scan(a: Tensor, b: Tensor, h0: Tensor | None = None, *, backend: str = "auto") -> Tensor:
    """h_t = a_t * h_{t-1} + b_t along the time axis.

    Args:
        a: (B, T, C) decays.
        b: (B, T, C) inputs.
        h0: (B, C) start state; zeros when None. Differentiable like a and b; must be
            finite (a ValueError otherwise).
        backend: "auto" (the fastest available for the device), or a name from
            ``available_backends()``: "sequential" (the reference loop), "chunked"
            (pure-torch parallel, any sign), "log" (the paper's log-space scan;
            a > 0, b > 0, h0 >= 0), "cpu" (compiled CPU kernels, needs numba),
            "triton" (GPU kernels, needs triton and CUDA).
    Returns:
        h: (B, T, C), h[:, t] the state after step t; h[:, -1] is the final state. An empty
        batch or sequence (B = 0 or T = 0) gives an empty h.

    float16/bfloat16 inputs are computed in float32 and returned in their own dtype.
    """
    check_scan_inputs(a, b, h0)
    be = resolve_backend(backend, a.device)
    check_finite_state(h0)
    if a.numel() == 0:  # an empty batch or sequence: nothing to run (but a graph to backward through)
        return a * 0 + b * 0
    acc = accumulation_dtype(a.dtype)
    if acc != a.dtype and not be.native_half:
        h = be.fn(a.to(acc), b.to(acc), None if h0 is None else h0.to(acc))
        return h.to(a.dtype)
    return be.fn(a, b, h0)


# --- registration: one line per backend -------------------------------------------
from . import cpu  # noqa: E402
from . import triton as _triton  # noqa: E402  (imports no triton)
from .chunked import chunked_scan  # noqa: E402
from .log import log_cell, log_scan, log_space_scan  # noqa: E402
from .reference import causal_conv_reference, reference_cell, rms_norm_reference, sequential_scan  # noqa: E402

_TORCH_OPS = dict(norm=rms_norm_reference, conv=causal_conv_reference)
register(Backend("sequential", sequential_scan, cell=reference_cell, cell_masks=True, cell_resets=True, **_TORCH_OPS,
                 doc="the plain loop; the reference"))
register(Backend("chunked", chunked_scan, auto_rank=100, **_TORCH_OPS,
                 doc="pure-torch chunked parallel scan, any sign; torch's norm and conv"))
register(Backend("log", log_space_scan, signed=False, cell=log_cell, cell_masks=True, cell_resets=True,
                 doc="the paper's log-space scan, stabilised"))
register(Backend("cpu", cpu.cpu_scan, devices=frozenset({"cpu"}), auto_rank=50, available=cpu.available,
                 cell=cpu.cpu_cell, cell_names=cpu.FUSED_CELLS, cell_resets=True, projected_cell=cpu.cpu_projected_cell,
                 norm=cpu.cpu_rms_norm, conv=cpu.cpu_causal_conv,
                 dtypes={"norm": frozenset({torch.float32}), "conv": frozenset({torch.float32, torch.float64})},
                 doc="compiled CPU kernels; needs numba (pip install numba)"))
register(Backend("triton", _triton.triton_scan, devices=frozenset({"cuda"}), native_half=True, auto_rank=10,
                 available=_triton.available, cell=_triton.triton_cell, cell_names=_triton.FUSED_CELLS, cell_resets=True,
                 doc="Triton GPU kernels; needs the triton package and a CUDA GPU"))

__all__ = ["scan", "log_scan", "available_backends", "accumulation_dtype", "resolve_backend", "register", "Backend",
           "BACKENDS", "OPS"]
