"""A language model's weights in fewer bytes, for decoding on the CPU.

Decoding one row at a time reads every weight once per token, so the step is bound by the
bytes of the weights; the recurrent state is small and stays float32 whatever the weights are.

    "float32"  the model as trained
    "bf16"     every parameter in bfloat16 (2 bytes); the cells still compute and carry their
               state in float32 (``minrnn.functional`` upcasts half inputs), the logits are
               bfloat16
    "int8"     every nn.Linear (the blocks' projections, the MLP, the LM head; the model's own
               Linear subclasses included) quantized by torch's dynamic quantization: int8
               weights (1 byte, one scale per tensor) and int8 matmuls on activations quantized
               per call (fbgemm kernels); the embedding, the norms, the conv and the state stay
               float32

Which is faster depends on the CPU: bfloat16 matmuls need hardware support (AVX512-BF16 or
AMX) to beat float32, int8 runs on any x86 CPU with AVX2. docs/benchmarks/index.md has the
measured tokens/s and the loss change of each.
"""

from __future__ import annotations

import copy
import warnings

import torch
from torch import nn

DTYPES = ("float32", "bf16", "int8")


def for_decoding(model: nn.Module, dtype: str = "float32") -> nn.Module:
    """``model`` (a MinRNNForCausalLM or any CPU module) with its weights in ``dtype``, one of
    ``DTYPES``, in eval mode: the model itself for "float32", else a converted copy (the
    original is left as it is)."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    if dtype == "float32":
        return model.float().eval()
    if any(p.device.type != "cpu" for p in model.parameters()):
        raise ValueError(f"dtype {dtype!r} is for decoding on the CPU; move the model there first")
    out = copy.deepcopy(model).float().eval()
    if dtype == "bf16":
        return out.to(torch.bfloat16)
    _as_plain_linears(out)
    with warnings.catch_warnings():
        # torch.ao.quantization announces its move to torchao on import and on every quantized
        # tensor it makes; docs/design.md says why these kernels and not torchao's
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", message=r"torch\.quantize_per_tensor", category=UserWarning)
        from torch.ao.quantization import quantize_dynamic

        return quantize_dynamic(out, {nn.Linear}, dtype=torch.qint8)


def _as_plain_linears(model: nn.Module) -> None:
    """Puts a plain nn.Linear, holding the same parameters, in place of every nn.Linear subclass
    that computes what Linear computes (its forward is Linear's): dynamic quantization swaps
    exact nn.Linear modules only, and the minRNN blocks' projections are subclasses."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if (isinstance(child, nn.Linear) and type(child) is not nn.Linear
                    and type(child).forward is nn.Linear.forward):
                plain = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None, device="meta")
                plain.weight, plain.bias = child.weight, child.bias
                setattr(parent, name, plain)


__all__ = ["DTYPES", "for_decoding"]
