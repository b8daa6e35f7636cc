"""1-bit masks stored as bytes (EMR's per-task masks): numpy.packbits' big-endian bit order, on any device."""

from __future__ import annotations

from collections.abc import Sequence
from math import prod

import torch
import torch.nn.functional as F

_BIT_WEIGHTS = (128, 64, 32, 16, 8, 4, 2, 1)


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """Tensor of 0/1 (any shape) -> uint8 ``(ceil(numel / 8),)``, on ``mask``'s device."""
    bits = mask.detach().reshape(-1).to(torch.bool).to(torch.uint8)
    padded = F.pad(bits, (0, (-bits.numel()) % 8)).view(-1, 8)
    weights = torch.tensor(_BIT_WEIGHTS, dtype=torch.uint8, device=mask.device)
    return (padded * weights).sum(1, dtype=torch.uint8)


def unpack_mask(packed: torch.Tensor, shape: Sequence[int], dtype: torch.dtype = torch.bool) -> torch.Tensor:
    """Inverse of :func:`pack_mask`: ``shape`` of ``dtype`` 0/1 values, on ``packed``'s device."""
    n = prod(shape)
    shifts = torch.arange(7, -1, -1, dtype=torch.uint8, device=packed.device)
    bits = (packed.to(torch.uint8).reshape(-1, 1) >> shifts) & 1
    return bits.reshape(-1)[:n].to(dtype).reshape(tuple(shape))
