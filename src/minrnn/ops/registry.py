"""The backend registry: the ``Backend`` record (what a backend computes: the scan, and
optionally cells, RMSNorm and the causal conv), ``register`` and ``resolve_backend``, which
picks each op's backend the same way. A leaf module: the backends' own files import it, and
``minrnn.ops`` registers them (docs/design.md).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

ScanFn = Callable[[Tensor, Tensor, Tensor | None], Tensor]

#: what a backend may implement: the scan (every backend), a cell over a sequence, RMSNorm, the causal conv
OPS = ("scan", "cell", "norm", "conv")


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
    #: whether ``cell`` (and ``projected_cell``) take ``reset=`` (B, T) bool, True where a
    #: document starts (a = 0); else a call with resets goes through ``fn``
    cell_resets: bool = False
    #: a layer's projection and cell as one Function, for the cells in ``cell_names``, used by
    #: minrnn.functional.projected_cell: projected_cell(spec, x, weight, bias, h0, options) -> h
    projected_cell: Callable | None = None
    #: RMSNorm over the last axis, norm(x, weight, eps) -> y (``minrnn.ops.norm.rms_norm``)
    norm: Callable | None = None
    #: the LM block's causal depthwise conv, conv(x, weight, bias) -> y (``minrnn.ops.conv.causal_conv``)
    conv: Callable | None = None
    #: per op ("norm", "conv", ...), the dtypes it takes; an op not named takes any
    dtypes: Mapping[str, frozenset] = field(default_factory=dict)

    def implements(self, op: str) -> bool:
        """Whether it computes ``op``, one of ``OPS``."""
        if op not in OPS:
            raise ValueError(f"op must be one of {OPS}, got {op!r}")
        return {"scan": self.fn, "cell": self.cell, "norm": self.norm, "conv": self.conv}[op] is not None

    def takes(self, op: str, tensors: tuple = ()) -> bool:
        """Whether its ``op`` takes ``tensors``' dtypes (None entries are skipped)."""
        allowed = self.dtypes.get(op)
        return allowed is None or all(t.dtype in allowed for t in tensors if t is not None)

    def runs_cell(self, spec, masked: bool = False, resets: bool = False) -> bool:
        """Whether ``cell`` computes this cell itself (with a padding mask when ``masked``, with
        document starts when ``resets``)."""
        return (self.cell is not None and (self.cell_names is None or spec.name in self.cell_names)
                and (self.cell_masks or not masked) and (self.cell_resets or not resets))

    def supports(self, device: torch.device) -> bool:
        return (self.devices is None or device.type in self.devices) and self.available()


BACKENDS: dict[str, Backend] = {}
_SKIPPED_FOR_AUTO: set[str] = set()


def register(backend: Backend) -> None:
    BACKENDS[backend.name] = backend


def available_backends() -> list[str]:
    """Names of the backends whose dependencies are present."""
    return [name for name, be in BACKENDS.items() if be.available()]


def _backends_for(op: str) -> list[str]:
    return sorted(name for name, be in BACKENDS.items() if be.implements(op))


def resolve_backend(backend: str, device: torch.device, op: str = "scan", tensors: tuple = ()) -> Backend:
    """The Backend that ``backend`` (a name or "auto") means for ``op`` (one of ``OPS``) on
    ``device``; ``tensors``, the op's inputs where given, must be in dtypes it takes.

    "auto" takes, among the backends ranked for "auto" that implement ``op``, the lowest
    ``auto_rank`` that runs on ``device`` and takes the tensors; a faster one that is missing
    its dependency is reported once a process. A name is refused in one line when it is
    unknown, lacks ``op``, is unavailable, runs on other devices or takes other dtypes.
    """
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string, got {type(backend).__name__}")
    what = "" if op == "scan" else f"{op} "
    if backend == "auto":
        ranked = sorted(
            (be for be in BACKENDS.values() if be.auto_rank is not None and be.implements(op)),
            key=lambda be: be.auto_rank,
        )
        for be in ranked:
            if be.supports(device):
                if be.takes(op, tensors):
                    return be
            elif (be.devices is None or device.type in be.devices) and be.name not in _SKIPPED_FOR_AUTO:
                # a faster backend for this device is missing its dependency: say so, once a process
                _SKIPPED_FOR_AUTO.add(be.name)
                warnings.warn(f"minrnn: backend {be.name!r} is not available ({be.doc}); "
                              "falling back to a slower one", RuntimeWarning, stacklevel=2)
        raise RuntimeError(f"no {what}backend supports device {device}")  # chunked runs anywhere
    if backend not in BACKENDS or not BACKENDS[backend].implements(op):
        which = f"unknown {what}backend {backend!r}" if backend not in BACKENDS else f"backend {backend!r} has no {op}"
        raise ValueError(f"{which}; expected 'auto' or one of {_backends_for(op)}")
    be = BACKENDS[backend]
    if not be.available():
        raise RuntimeError(f"{what}backend {backend!r} is not available here: {be.doc}")
    if not be.supports(device):
        raise ValueError(
            f"{what}backend {backend!r} runs on {sorted(be.devices)} tensors, not {device.type}; "
            "use backend='auto'"
        )
    if not be.takes(op, tensors):
        got = ", ".join(sorted({str(t.dtype) for t in tensors if t is not None}))
        raise ValueError(f"{what}backend {backend!r} takes {'/'.join(sorted(map(str, be.dtypes[op])))} "
                         f"tensors, got {got}")
    return be


def check_backend_takes_cell(spec, be: Backend) -> None:
    """A one-line ValueError when ``spec`` is a cell with transitions of either sign and ``be``
    a backend that holds positive values only (the log-space scan)."""
    if spec.signed and not be.signed:
        takers = ", ".join(repr(n) for n in ["auto", *sorted(n for n, b in BACKENDS.items() if b.signed)])
        raise ValueError(f"cell {spec.name!r} has transitions in (-1, 1), which backend {be.name!r} cannot "
                         f"represent (it works in log space); use one of the backends {takers}")
