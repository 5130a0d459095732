"""The first-order linear recurrence, behind one signature for every backend.

    h_t = a_t * h_{t-1} + b_t,    t = 1 .. T,    h_0 = h0 (zeros when None)

Tensor layout: a, b and h are (batch, time, channels); h0 is (batch, channels).
Channels are the contiguous axis: every backend runs time sequentially (or in chunks)
and batch x channels in parallel.

A backend is a scan ``fn(a, b, h0) -> h`` on validated tensors of one floating dtype
(h0 may be None), optionally with its own cell functions (see ``Backend``); the cells
themselves are described in ``cells.py``. Adding a backend means a new file in this folder
and one ``register(...)`` line at the bottom of this file (docs/design.md).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

ScanFn = Callable[[Tensor, Tensor, Tensor | None], Tensor]


@dataclass(frozen=True)
class Backend:
    """A registered backend: its scan, where it runs, and what it computes itself."""

    name: str
    fn: ScanFn
    #: device types it runs on ("cpu", "cuda", ...); None means any
    devices: frozenset | None = None
    #: accepts values of any sign (False: positive b and h0 only)
    signed: bool = True
    #: computes float16/bfloat16 itself (with float32 accumulation); else scan() upcasts
    native_half: bool = False
    #: tried by "auto" in ascending order; None keeps it out of "auto"
    auto_rank: int | None = None
    #: whether its dependencies are importable here
    available: Callable[[], bool] = lambda: True
    doc: str = ""
    #: a cell over a whole sequence, for the cells named in ``cell_names`` (None: every cell):
    #: cell(spec, pre, h0, options, mask) -> h, pre the cell's (B, T, C) pre-activations in the
    #: accumulation dtype; minrnn.functional runs every other cell through ``fn``
    cell: Callable | None = None
    cell_names: frozenset | None = None
    #: whether ``cell`` takes a padding mask (B, T); else a masked call goes through ``fn``
    cell_masks: bool = False
    #: a layer's projection and cell as one Function, for the cells in ``cell_names``, used by
    #: minrnn.functional.projected_cell: projected_cell(spec, x, weight, bias, h0, options) -> h
    projected_cell: Callable | None = None

    def runs_cell(self, spec, masked: bool = False) -> bool:
        """Whether ``cell`` computes this cell itself (with a mask when ``masked``)."""
        return (self.cell is not None and (self.cell_names is None or spec.name in self.cell_names)
                and (self.cell_masks or not masked))

    def supports(self, device: torch.device) -> bool:
        return (self.devices is None or device.type in self.devices) and self.available()


BACKENDS: dict[str, Backend] = {}
_SKIPPED_FOR_AUTO: set[str] = set()


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the recurrence is computed and its state kept in: float32 for half inputs."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def register(backend: Backend) -> None:
    BACKENDS[backend.name] = backend


def available_backends() -> list[str]:
    """Names of the backends whose dependencies are present."""
    return [name for name, be in BACKENDS.items() if be.available()]


def resolve_backend(backend: str, device: torch.device) -> Backend:
    """The Backend that ``backend`` (a name or "auto") means for tensors on ``device``."""
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string, got {type(backend).__name__}")
    if backend == "auto":
        ranked = sorted(
            (be for be in BACKENDS.values() if be.auto_rank is not None),
            key=lambda be: be.auto_rank,
        )
        for be in ranked:
            if be.supports(device):
                return be
            if (be.devices is None or device.type in be.devices) and be.name not in _SKIPPED_FOR_AUTO:
                # a faster backend for this device is missing its dependency: say so, once a process
                _SKIPPED_FOR_AUTO.add(be.name)
                warnings.warn(f"minrnn: backend {be.name!r} is not available ({be.doc}); "
                              "falling back to a slower one", RuntimeWarning, stacklevel=2)
        raise RuntimeError(f"no scan backend supports device {device}")  # chunked runs anywhere
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected 'auto' or one of {sorted(BACKENDS)}")
    be = BACKENDS[backend]
    if not be.available():
        raise RuntimeError(f"backend {backend!r} is not available here: {be.doc}")
    if not be.supports(device):
        raise ValueError(
            f"backend {backend!r} runs on {sorted(be.devices)} tensors, not {device.type}; "
            "use backend='auto'"
        )
    return be


def check_backend_takes_cell(spec, be: Backend) -> None:
    """A one-line ValueError when ``spec`` is a cell with transitions of either sign and ``be``
    a backend that holds positive values only (the log-space scan)."""
    if spec.signed and not be.signed:
        takers = ", ".join(repr(n) for n in ["auto", *sorted(n for n, b in BACKENDS.items() if b.signed)])
        raise ValueError(f"cell {spec.name!r} has transitions in (-1, 1), which backend {be.name!r} cannot "
                         f"represent (it works in log space); use one of the backends {takers}")


def _check_float_tensor(name: str, x) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")


def check_sequences(names: tuple[str, ...], tensors: tuple[Tensor, ...], h0: Tensor | None, h0_name: str = "h0",
                    h0_dtypes: tuple[torch.dtype, ...] = ()):
    """Validate per-step inputs (B, T, C) of one shape, dtype and device, and h0 (B, C).

    h0 must share the inputs' dtype, or be one of ``h0_dtypes`` (the cells accept a
    float32 state beside half-precision inputs).

    Raises TypeError for non-tensors and non-floating or mixed dtypes, ValueError for
    shapes and devices; each message names the argument and what was expected.
    """
    first_name, first = names[0], tensors[0]
    for name, x in zip(names, tensors):
        _check_float_tensor(name, x)
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
        _check_float_tensor(h0_name, h0)
        if h0.shape != (B, C):
            raise ValueError(f"{h0_name} must be (batch, channels) = {(B, C)}, got shape {tuple(h0.shape)}")
        if h0.dtype != first.dtype and h0.dtype not in h0_dtypes:
            raise TypeError(f"{h0_name} has dtype {h0.dtype} but {first_name} has {first.dtype}; pass one dtype")
        if h0.device != first.device:
            raise ValueError(f"{h0_name} is on {h0.device} but {first_name} is on {first.device}")


def check_scan_inputs(a, b, h0, names=("a", "b", "h0")) -> None:
    check_sequences(names[:2], (a, b), h0, names[2])


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
    if h0 is not None and h0.numel() and not bool(torch.isfinite(h0).all()):
        # backends reach inf/NaN by different roads (0 * inf, inf - inf): refused, not guessed
        raise ValueError("h0 must be finite (it holds inf or NaN)")
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
from .reference import reference_cell, sequential_scan  # noqa: E402

register(Backend("sequential", sequential_scan, cell=reference_cell, cell_masks=True,
                 doc="the plain loop; the reference"))
register(Backend("chunked", chunked_scan, auto_rank=100, doc="pure-torch chunked parallel scan, any sign"))
register(Backend("log", log_space_scan, signed=False, cell=log_cell, cell_masks=True,
                 doc="the paper's log-space scan, stabilised"))
register(Backend("cpu", cpu.cpu_scan, devices=frozenset({"cpu"}), auto_rank=50, available=cpu.available,
                 cell=cpu.cpu_cell, cell_names=cpu.FUSED_CELLS, projected_cell=cpu.cpu_projected_cell,
                 doc="compiled CPU kernels; needs numba (pip install numba)"))
register(Backend("triton", _triton.triton_scan, devices=frozenset({"cuda"}), native_half=True, auto_rank=10,
                 available=_triton.available, cell=_triton.triton_cell, cell_names=_triton.FUSED_CELLS,
                 doc="Triton GPU kernels; needs the triton package and a CUDA GPU"))

__all__ = ["scan", "log_scan", "available_backends", "accumulation_dtype", "resolve_backend", "register", "Backend", "BACKENDS"]
