"""The fused cells' input layout: all pre-activations side by side in one (B, T, n*C) tensor.

Shared by the backends whose cells read packed pre-activations (``cpu``, ``triton``).
"""

from __future__ import annotations

import torch
from torch import Tensor


def pack_chunks(parts: tuple[Tensor, ...]) -> Tensor:
    """The (B, T, n*C) tensor holding ``parts`` side by side along channels.

    The cells' inputs are usually the n column chunks of one Linear's output; then that
    output itself is returned (no copy), so the backward can write dL/d(pre-activations)
    as one contiguous tensor and autograd does not concatenate n gradients. Otherwise
    the parts are concatenated once.
    """
    base = parts[0]._base  # nn.Linear's output is itself a view of a 2-D matmul result
    B, T, C = parts[0].shape
    n = len(parts)
    if (base is not None and base.is_contiguous() and base.numel() == B * T * n * C
            and all(p._base is base and p.stride() == (T * n * C, n * C, 1)
                    and p.storage_offset() == base.storage_offset() + j * C for j, p in enumerate(parts))):
        return base.view(B, T, n * C)
    return torch.cat(parts, dim=-1)
