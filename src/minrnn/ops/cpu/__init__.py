"""The "cpu" backend: numba-compiled kernels for the scan, the fused minGRU / minLSTM cells
(gates computed inside the kernels), a layer's projection fused with its cell, and the LM
block's causal depthwise conv and RMSNorm.

    _math.py      scalar math inlined into the kernels (exp, sigmoid pairs, g, minLSTM gates)
    kernels.py    the scan and cell kernels, forward and backward
    conv.py       the causal conv's kernels and Function
    norm.py       RMSNorm's kernels and Function
    launch.py     work split, threads, array views, the first-compile notice
    buffers.py    the output cache the kernels allocate from
    functions.py  the autograd Functions and the public ops
    library.py    the kernels as torch.library custom ops, which torch.compile traces

numba is optional: without it ``available()`` is False and the backend is not offered.
"""

from __future__ import annotations

try:  # numba is an optional dependency (pip install numba)
    import numba  # noqa: F401

    HAVE_NUMBA = True
except ImportError:  # pragma: no cover - exercised only where numba is absent
    HAVE_NUMBA = False


def available() -> bool:
    """Whether numba is importable, so that the kernels can run."""
    return HAVE_NUMBA


if HAVE_NUMBA:
    import torch

    # Starting numba's OpenMP threading layer sets the calling thread's OpenMP thread count,
    # which is also torch's: start it now and put torch's count back.
    _torch_threads = torch.get_num_threads()
    numba.get_num_threads()
    torch.set_num_threads(_torch_threads)
    del _torch_threads

    from . import library  # noqa: F401  (registers the minrnn::cpu_* custom ops)
    from ._math import RAW_BELOW, exp32, exp64  # noqa: F401
    from .buffers import OUTPUT_CACHE, OutputCache, empty_output_cache, output_cache_limit  # noqa: F401
    from .conv import cpu_causal_conv  # noqa: F401
    from .functions import (  # noqa: F401
        FUSED_CELLS,
        cpu_cell,
        cpu_mingru,
        cpu_minlstm,
        cpu_projected_cell,
        cpu_scan,
    )
    from .norm import cpu_rms_norm  # noqa: F401
else:  # pragma: no cover
    FUSED_CELLS = frozenset()

    def _missing(*args, **kwargs):
        raise RuntimeError("backend 'cpu' needs numba (pip install numba)")

    cpu_scan = cpu_cell = cpu_mingru = cpu_minlstm = cpu_projected_cell = cpu_causal_conv = cpu_rms_norm = _missing

    @__import__("contextlib").contextmanager
    def output_cache_limit(limit_bytes: int):
        yield None

    def empty_output_cache() -> None:
        pass
