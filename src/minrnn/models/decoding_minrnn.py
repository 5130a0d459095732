"""Which path a single position with a cache takes through a MinRNN block.

``MinRNNBlock.forward`` with one position and a cache (every decoding step of ``generate()``
and of a hand-written loop) runs ``MinRNNBlock.step``: the block composed from its modules'
one-token steps (``MinRNNCausalConv.step``, ``MinRNNRMSNorm.step``, ``MinRNNMixer.step``,
``MinRNNAttention.step``, ``MinRNNMLP.step``), each calling the decoding kernels of
``minrnn.ops.step`` where they apply (float32/float64 CPU tensors, no gradient to record).
Per minRNN block on such tensors:

    conv_norm_step        x + conv over the cached window, the new window, RMSNorm   (one kernel)
    in_proj, cell_step    the mixer's input projection, the cell's state update      (one kernel)
    out_proj, +           the mixer's output projection into the residual
    rms_norm, MLP, +                                                                 (the MLP)

``fast_step(False)`` sends those positions through the block's general (sequence) path
instead: the reference the steps are tested against and the bench's "general" rows.

The conv window and the state go to the cache as new tensors (never written in place), so a
state the caller kept from an earlier step is left as it was.
"""

from __future__ import annotations

import contextlib

_ENABLED = [True]


@contextlib.contextmanager
def fast_step(enabled: bool):
    """Within this context, single positions with a cache take the blocks' ``step`` (True,
    the default) or their general path (False)."""
    previous = _ENABLED[0]
    _ENABLED[0] = bool(enabled)
    try:
        yield
    finally:
        _ENABLED[0] = previous


def steps_enabled() -> bool:
    """Whether single positions with a cache take the blocks' ``step`` (see ``fast_step``)."""
    return _ENABLED[0]


__all__ = ["fast_step", "steps_enabled"]
