"""The public API's argument checks and dtype rules, written once: every function of ``ops``,
``minrnn.functional`` and the layers checks its arguments here, so each rule has one wording.

Every check raises a one-line TypeError (what a value is) or ValueError (its shape, device or
value) that names the argument and says what was expected.
"""

from __future__ import annotations

import torch
from torch import Tensor


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the recurrence is computed and its state kept in: float32 for half inputs."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def state_dtype(dtype: torch.dtype, h: Tensor | None) -> torch.dtype:
    """The dtype of one step's new state from inputs of ``dtype`` and the carried state ``h``:
    the accumulation dtype, or h's if wider (a carried state is never rounded down)."""
    acc = accumulation_dtype(dtype)
    return acc if h is None else torch.promote_types(acc, h.dtype)


def check_float_tensor(name: str, x) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")


def check_finite_state(h0: Tensor | None, name: str = "h0") -> None:
    """Refuse a start state holding inf or NaN."""
    # backends reach inf/NaN by different roads (the loop's 0 * inf, the chunked scan's products
    # of decays, the log scan's logs): refused rather than given backend-dependent results
    # reading the values is a host sync a compiled graph cannot hold: torch.compile skips it
    if h0 is not None and h0.numel() and not torch.compiler.is_compiling() and not bool(torch.isfinite(h0).all()):
        raise ValueError(f"{name} must be finite (it holds inf or NaN)")


def check_sequences(names: tuple[str, ...], tensors: tuple[Tensor, ...], h0: Tensor | None, h0_name: str = "h0",
                    h0_dtypes: tuple[torch.dtype, ...] = ()) -> None:
    """Per-step inputs (B, T, C) of one shape, dtype and device, and h0 (B, C).

    h0 must share the inputs' dtype, or be one of ``h0_dtypes`` (the cells accept a float32
    state beside half-precision inputs).
    """
    first_name, first = names[0], tensors[0]
    for name, x in zip(names, tensors):
        check_float_tensor(name, x)
        if x.dim() != 3:
            raise ValueError(f"{name} must be (batch, time, channels), got shape {tuple(x.shape)}")
    for name, x in zip(names[1:], tensors[1:]):
        if x.shape != first.shape:
            raise ValueError(
                f"{name} must have the shape of {first_name} {tuple(first.shape)}, got {tuple(x.shape)}"
            )
        if x.dtype != first.dtype:
            raise TypeError(f"{name} has dtype {x.dtype} but {first_name} has {first.dtype}; pass one dtype")
        if x.device != first.device:
            raise ValueError(f"{name} is on {x.device} but {first_name} is on {first.device}")
    B, T, C = first.shape
    if h0 is not None:
        check_float_tensor(h0_name, h0)
        if h0.shape != (B, C):
            raise ValueError(f"{h0_name} must be (batch, channels) = {(B, C)}, got shape {tuple(h0.shape)}")
        if h0.dtype != first.dtype and h0.dtype not in h0_dtypes:
            raise TypeError(f"{h0_name} has dtype {h0.dtype} but {first_name} has {first.dtype}; pass one dtype")
        if h0.device != first.device:
            raise ValueError(f"{h0_name} is on {h0.device} but {first_name} is on {first.device}")


def check_scan_inputs(a, b, h0, names=("a", "b", "h0")) -> None:
    check_sequences(names[:2], (a, b), h0, names[2])


def check_mask(mask: Tensor | None, shape: tuple[int, ...], device: torch.device, what: str,
               name: str = "mask", meaning: str = "False: padding") -> None:
    """A per-position flag: None, or a bool tensor of ``shape`` (``what`` names its axes) on
    ``device``; ``name`` and ``meaning`` word the error (a padding mask, or ``reset``)."""
    if mask is None:
        return
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        raise TypeError(f"{name} must be a bool tensor {what} ({meaning}), got "
                        f"{mask.dtype if isinstance(mask, Tensor) else type(mask).__name__}")
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"{name} must be {what} = {tuple(shape)}, got shape {tuple(mask.shape)}")
    if mask.device != device:
        raise ValueError(f"{name} is on {mask.device} but the inputs are on {device}")


def check_reset(reset: Tensor | None, shape: tuple[int, ...], device: torch.device, what: str) -> None:
    """Document starts: None, or a bool tensor of ``shape`` on ``device``, True where a document starts."""
    check_mask(reset, shape, device, what, name="reset", meaning="True where a document starts")


def check_norm_args(x, weight, eps) -> None:
    """RMSNorm's: x (..., D) and weight (D,) floating, on one device; eps a positive number."""
    for name, t in (("x", x), ("weight", weight)):
        check_float_tensor(name, t)
    if x.dim() < 1 or weight.shape != (x.shape[-1],):
        raise ValueError(f"weight must be (D,) with D = x.shape[-1], got weight {tuple(weight.shape)} "
                         f"for x {tuple(x.shape)}")
    if weight.device != x.device:
        raise ValueError(f"weight is on {weight.device} but x is on {x.device}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
        raise ValueError(f"eps must be a positive number, got {eps!r}")


def check_conv_args(x, weight, bias) -> None:
    """The causal conv's: x (B, T, C), weight (C, 1, K) or (C, K), bias (C,) or None, one dtype and device."""
    for name, t in (("x", x), ("weight", weight), ("bias", bias)):
        if t is None and name == "bias":
            continue
        check_float_tensor(name, t)
        if t.dtype != x.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but x has {x.dtype}; pass one dtype")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    if x.dim() != 3:
        raise ValueError(f"x must be (batch, time, channels), got shape {tuple(x.shape)}")
    C = x.shape[-1]
    if not (weight.dim() in (2, 3) and weight.shape[0] == C and weight.numel() == C * weight.shape[-1]
            and weight.shape[-1] >= 1):
        raise ValueError(f"weight must be (channels, 1, K) or (channels, K) with channels = {C}, "
                         f"got shape {tuple(weight.shape)}")
    if bias is not None and bias.shape != (C,):
        raise ValueError(f"bias must be (channels,) = ({C},), got shape {tuple(bias.shape)}")


__all__ = ["accumulation_dtype", "state_dtype", "check_float_tensor", "check_finite_state", "check_sequences",
           "check_scan_inputs", "check_mask", "check_norm_args", "check_conv_args"]
