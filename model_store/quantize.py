"""Symmetric per-row quantization of low-rank factors (SPEC section 9): int8, or int4 packed two per byte.

A row ``x`` of a factor (a row of ``B_t`` (m x r) or of ``A_t`` (r x n)) is stored as one float32 scale
``s = max|x| / (2^(b-1) - 1)`` and codes ``q = round(x / s)`` clamped to ``[-(2^(b-1) - 1), 2^(b-1) - 1]``
(a zero row: ``s = 0``, codes 0); it reads back as ``q * s``. 8-bit codes are ``int8``; 4-bit codes are
packed two per ``uint8`` along the row, the even column in the low nibble, each nibble in two's complement
(an odd row is padded with a zero code). Works on stacks ``(..., rows, cols)`` (every task's factors at once:
the scales are ``(..., rows)``), on any device.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

#: Stored width of a low-rank factor's numbers: 32 = float32 (unquantized), 8 = int8, 4 = int4 packed.
Bits = Literal[32, 8, 4]
BITS: tuple[Bits, ...] = (32, 8, 4)


def qmax(bits: int) -> int:
    """The largest code magnitude of a ``bits``-bit symmetric quantizer: ``2^(bits-1) - 1``."""
    if bits not in (8, 4):
        raise ValueError(f"quantized factors have 8 or 4 bits, got {bits}")
    return 2 ** (bits - 1) - 1


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """int8 codes in ``[-8, 7]`` ``(..., cols)`` -> uint8 ``(..., ceil(cols / 2))``: even column in the low nibble."""
    padded = F.pad(codes.to(torch.int8), (0, codes.shape[-1] % 2))
    nibbles = padded.contiguous().view(torch.uint8) & 0x0F  # two's complement low nibble
    return nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor, cols: int) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: int8 codes ``(..., cols)``."""
    low = (packed & 0x0F).to(torch.int8)
    high = (packed >> 4).to(torch.int8)
    both = torch.stack([low, high], -1).reshape(*packed.shape[:-1], -1)[..., :cols]
    return (both ^ 8) - 8  # sign-extend the nibble


def quantize_rows(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of ``x`` ``(..., rows, cols)`` -> ``(codes, scales)``; codes int8 (8 bits) or packed uint8 (4 bits),
    scales float32 ``(..., rows)``."""
    q = qmax(bits)
    x = x.float()
    scales = x.abs().amax(-1) / q
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    codes = torch.round(x / safe.unsqueeze(-1)).clamp_(-q, q).to(torch.int8)
    return (codes if bits == 8 else pack_int4(codes)), scales


def dequantize_rows(codes: torch.Tensor, scales: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """float32 ``(..., rows, cols)`` from :func:`quantize_rows`' codes and scales."""
    qmax(bits)
    values = codes if bits == 8 else unpack_int4(codes, cols)
    return values.float() * scales.float().unsqueeze(-1)


def fake_quantize(x: torch.Tensor, bits: int) -> torch.Tensor:
    """``x`` as it reads back after quantization at ``bits`` (32: unchanged, float32)."""
    if bits == 32:
        return x.float()
    return dequantize_rows(*quantize_rows(x, bits), bits, x.shape[-1])
