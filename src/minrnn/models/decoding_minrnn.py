"""One token through a MinRNN block from its cache, in as few calls as the block allows.

``block_step`` is what ``MinRNNBlock.forward`` runs for a single position with a cache (every
decoding step of ``generate()`` and of a hand-written loop), when nothing needs the general
path: no gradient to record, no active dropout, and the block's modules exactly the model's
own (no subclass, wrapper or hook whose call would differ from using its weights directly).
Otherwise it returns None and the block runs its general path, which computes the same
numbers (tests hold the two together).

Per block, on float32/float64 CPU tensors:

    conv_norm_step        x + conv over the cached window, the new window, RMSNorm   (one kernel)
    linear                the mixer's input projection
    cell_step             the minGRU / minLSTM state update                          (one kernel)
    addmm                 x + the output projection
    rms_norm, linear, act, addmm                                                     (the MLP)

The conv window and the state are written to the cache as new tensors (never in place), so a
state the caller kept from an earlier step is left as it was.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules import module as _nn_module

from ..ops import step as S

_MODULE_CLASSES: tuple = ()
_ENABLED = [True]
_ONE_CALL_DTYPES = (torch.float32, torch.float64)


@contextlib.contextmanager
def fast_step(enabled: bool):
    """Within this context, single-token steps take the fast path (True, the default) or the
    block's general path (False: the reference the fast path is tested and timed against)."""
    previous = _ENABLED[0]
    _ENABLED[0] = bool(enabled)
    try:
        yield
    finally:
        _ENABLED[0] = previous


def _module_classes() -> tuple:
    """The class each of ``_parts``' slots must have exactly (imported on first use, since
    modeling_minrnn imports this module)."""
    global _MODULE_CLASSES
    if not _MODULE_CLASSES:
        from .modeling_minrnn import MinRNNGateProj, MinRNNMixer, MinRNNMLP, MinRNNResidualOut, MinRNNRMSNorm

        _MODULE_CLASSES = (nn.Conv1d, MinRNNRMSNorm, MinRNNMixer, MinRNNGateProj, MinRNNResidualOut, MinRNNRMSNorm,
                           MinRNNMLP, nn.Linear, MinRNNResidualOut)
    return _MODULE_CLASSES


def _parts(block, x: Tensor) -> tuple | None:
    """(conv, rnn_norm, mixer, in_proj, out_proj, mlp_norm, mlp, up_proj, down_proj) (None for
    the ones the block lacks), or None when the block must take its general path."""
    if not _ENABLED[0] or (block.training and block.dropout.p > 0):
        return None
    if _nn_module._global_forward_hooks or _nn_module._global_forward_pre_hooks:
        return None
    # _modules / _parameters directly: nn.Module's attribute lookup costs more than the checks
    m = block._modules
    mixer, mlp = m["mixer"], m.get("mlp")
    if type(mixer) is not _module_classes()[2]:  # an attention block (a hybrid's) or a replaced mixer
        return None
    mx = mixer._modules
    ml = mlp._modules if mlp is not None else {}
    parts = (m.get("conv"), m["rnn_norm"], mixer, mx["in_proj"], mx["out_proj"], m.get("mlp_norm"), mlp,
             ml.get("up_proj"), ml.get("down_proj"))
    for module, cls in zip(parts, _module_classes()):
        if module is not None and (type(module) is not cls or module._forward_hooks or module._forward_pre_hooks):
            return None
    if torch.is_grad_enabled() and (x.requires_grad or parts[3]._parameters["weight"].requires_grad):
        return None
    return parts


def _residual_linear(x: Tensor, y: Tensor, lin: nn.Linear) -> Tensor:
    """x + lin(y), as one BLAS call where x's dtype is float32/float64 (in half precision as
    two, so that the sum is rounded as the sequence path rounds it)."""
    p = lin._parameters
    if x.dtype not in _ONE_CALL_DTYPES:
        return x + F.linear(y, p["weight"], p["bias"])
    out = torch.addmm(x, y, p["weight"].t())
    return out if p["bias"] is None else out + p["bias"]


def block_step(block, hidden_states: Tensor, mask: Tensor | None, cache) -> Tensor | None:
    """hidden_states (B, 1, D), mask (B, 1) bool or None -> (B, 1, D), the cache updated; or
    None when the block must take its general path (see the module docstring)."""
    parts = _parts(block, hidden_states)
    if parts is None:
        return None
    conv, norm, mixer, in_proj, out_proj, mlp_norm, mlp, up_proj, down_proj = parts
    layer = cache.layers[block.layer_idx]
    x = hidden_states[:, 0]
    B, D = x.shape
    h = layer.recurrent_states[0] if layer.is_recurrent_states_initialized[0] else None
    if h is not None and h.shape[0] != B:
        raise ValueError(f"the cache holds a state for batch {h.shape[0]}, but the input has batch {B}; "
                         "use a fresh cache for a new batch")
    keep = None if mask is None else mask[:, 0]
    window = None
    if conv is not None:
        if layer.is_conv_states_initialized[0]:
            window = layer.conv_states[0]
            if window.shape[:2] != (B, D):
                raise ValueError(f"the cache holds conv inputs for (batch, channels) = {tuple(window.shape[:2])}, "
                                 f"but this call has {(B, D)}; use a fresh cache for a new batch")
        else:
            window = x.new_zeros(B, D, layer.conv_kernel_size[0])
        cp = conv._parameters
        x, normed, window = S.conv_norm_step(x, keep, window, cp["weight"].view(D, -1), cp["bias"],
                                             norm._parameters["weight"], norm.eps)
    else:
        normed = S.rms_norm(x, norm._parameters["weight"], norm.eps)
    ip = in_proj._parameters
    pre = F.linear(normed, ip["weight"], ip["bias"])
    state = S.cell_step(mixer.spec, pre, h, mixer.spec.options(**mixer.options), keep)
    x = _residual_linear(x, state.to(pre.dtype), out_proj)
    if mlp is not None:
        up = up_proj._parameters
        normed = S.rms_norm(x, mlp_norm._parameters["weight"], mlp_norm.eps)
        x = _residual_linear(x, mlp.act(F.linear(normed, up["weight"], up["bias"])), down_proj)
    layer.store_step(window, state)
    return x.unsqueeze(1)


__all__ = ["block_step", "fast_step"]
