"""RMSNorm over the last axis, behind one signature.

    y = weight * (x / sqrt(mean(x^2) + eps))       computed in float32, returned in x's dtype

as transformers' Llama computes it (the normalisation in float32 whatever the input's dtype,
the weight applied after rounding back). ``MinRNNRMSNorm`` is this function.

It dispatches through the backend registry (``minrnn.ops``) like the scan: a backend that
implements it registers a ``norm`` (and the dtypes it takes). "sequential" and "chunked" run
the reference (torch ops, any device and dtype); "cpu" the numba kernels of
``ops/cpu/norm.py``, forward and backward (float32 CPU tensors). "auto" takes "cpu" where it
applies, else the torch ops.
"""

from __future__ import annotations

from torch import Tensor

from .checks import check_norm_args
from .reference import rms_norm_reference
from .registry import resolve_backend

__all__ = ["rms_norm", "rms_norm_reference"]


def rms_norm(x: Tensor, weight: Tensor, eps: float = 1e-6, *, backend: str = "auto") -> Tensor:
    """RMSNorm of x over its last axis; see the module docstring.

    Args:
        x: (..., D).
        weight: (D,), in x's dtype (or float32 beside a half-precision x: the result is then
            float32, as torch's type promotion gives).
        eps: added to the mean square, > 0.
        backend: "auto" or a backend with a norm: "sequential"/"chunked" (torch ops, the
            reference) or "cpu" (numba; float32 CPU x and weight).
    Returns:
        y: (..., D).
    """
    check_norm_args(x, weight, eps)
    be = resolve_backend(backend, x.device, "norm", (x, weight))
    if x.numel() == 0:  # nothing for a kernel to do: the reference's empty result, in the graph
        return rms_norm_reference(x, weight, eps)
    return be.norm(x, weight, eps)
