"""RMSNorm over the last axis, behind one signature.

    y = weight * (x / sqrt(mean(x^2) + eps))       computed in float32, returned in x's dtype

as transformers' Llama computes it (the normalisation in float32 whatever the input's dtype,
the weight applied after rounding back). ``MinRNNRMSNorm`` is this function.

Backends: "torch" is the reference (any device and dtype); "cpu" the numba kernels of
``ops/cpu/norm.py``, forward and backward (float32 CPU tensors). "auto" takes "cpu" where it
applies, else "torch".
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import cpu

NORM_BACKENDS = ("auto", "torch", "cpu")


def rms_norm_reference(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """The reference: torch ops, autograd through each; normalised in float32."""
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _check(x, weight, eps) -> None:
    for name, t in (("x", x), ("weight", weight)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if x.dim() < 1 or weight.shape != (x.shape[-1],):
        raise ValueError(f"weight must be (D,) with D = x.shape[-1], got weight {tuple(weight.shape)} "
                         f"for x {tuple(x.shape)}")
    if weight.device != x.device:
        raise ValueError(f"weight is on {weight.device} but x is on {x.device}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
        raise ValueError(f"eps must be a positive number, got {eps!r}")


def rms_norm(x: Tensor, weight: Tensor, eps: float = 1e-6, *, backend: str = "auto") -> Tensor:
    """RMSNorm of x over its last axis; see the module docstring.

    Args:
        x: (..., D).
        weight: (D,), in x's dtype (or float32 beside a half-precision x: the result is then
            float32, as torch's type promotion gives).
        eps: added to the mean square, > 0.
        backend: "auto", "torch" (the reference) or "cpu" (numba; float32 CPU x and weight).
    Returns:
        y: (..., D).
    """
    _check(x, weight, eps)
    if backend not in NORM_BACKENDS:
        raise ValueError(f"unknown norm backend {backend!r}; expected one of {NORM_BACKENDS}")
    fits_cpu = (x.device.type == "cpu" and x.dtype is torch.float32 and weight.dtype is torch.float32
                and x.numel() > 0)
    if backend == "cpu":
        if not cpu.available():
            raise RuntimeError("norm backend 'cpu' is not available here: it needs numba (pip install numba)")
        if not fits_cpu:
            raise ValueError(f"norm backend 'cpu' takes non-empty float32 CPU tensors, got x {x.dtype} and "
                             f"weight {weight.dtype} on {x.device}")
    if backend == "cpu" or (backend == "auto" and fits_cpu and cpu.available()):
        return cpu.cpu_rms_norm(x, weight, eps)
    return rms_norm_reference(x, weight, eps)
