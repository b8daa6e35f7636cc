"""Per-row symmetric quantization of low-rank factors and 4-bit packing (SPEC section 9), against the formula."""

import numpy as np
import pytest
import torch

from model_store.quantize import dequantize_rows, fake_quantize, pack_int4, quantize_rows, unpack_int4


@pytest.mark.parametrize("shape", [(7,), (3, 5), (2, 4, 9), (2, 6, 1)])
def test_int4_packing_round_trips_every_code_at_odd_and_even_sizes(shape):
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(-8, 8, shape, generator=g, dtype=torch.int8)
    packed = pack_int4(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (*shape[:-1], (shape[-1] + 1) // 2)
    assert torch.equal(unpack_int4(packed, shape[-1]), codes)
    # the layout by hand: even column in the low nibble, two's complement, an odd row padded with 0
    flat, first = codes.reshape(-1, shape[-1]).numpy().astype(np.int64), packed.reshape(-1, packed.shape[-1])[0]
    want = [
        (flat[0, j] & 0xF) | ((flat[0, j + 1] & 0xF) << 4 if j + 1 < shape[-1] else 0) for j in range(0, shape[-1], 2)
    ]
    assert first.tolist() == want


def _by_formula(x: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """SPEC section 9 per row in float64: s = max|row| / (2^(b-1) - 1), q = round(x / s) clamped (0 for a zero row)."""
    qmax = 2 ** (bits - 1) - 1
    s = np.abs(x).max(-1) / qmax
    q = np.where(s[..., None] > 0, np.clip(np.rint(x / np.where(s > 0, s, 1)[..., None]), -qmax, qmax), 0)
    return q, s


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("shape", [(5, 3), (2, 7, 11), (3, 1)])
def test_quantize_rows_follows_the_formula_and_reads_back_within_half_a_step(bits, shape):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=g) * torch.logspace(-3, 1, shape[-2])[:, None]  # rows of very different sizes
    x[..., 0, :] = 0.0  # a zero row
    codes, scales = quantize_rows(x, bits)
    want_q, want_s = _by_formula(x.double().numpy(), bits)
    np.testing.assert_allclose(scales.numpy(), want_s, rtol=1e-6)
    values = codes if bits == 8 else unpack_int4(codes, shape[-1])
    assert codes.dtype == (torch.int8 if bits == 8 else torch.uint8)
    assert np.abs(values.numpy().astype(np.int64) - want_q).max() <= 1  # float32 vs float64 at a .5 tie only
    back = dequantize_rows(codes, scales, bits, shape[-1])
    assert back.shape == x.shape and back.dtype == torch.float32
    assert bool(((back - x).abs() <= scales.unsqueeze(-1) / 2 * (1 + 1e-5) + 1e-12).all())
    assert bool((back[..., 0, :] == 0).all())
    peak = x.abs().argmax(-1, keepdim=True)  # the largest entry of each row reads back exactly (q = +-qmax)
    torch.testing.assert_close(back.gather(-1, peak), x.gather(-1, peak), rtol=1e-6, atol=0)
    torch.testing.assert_close(fake_quantize(x, bits), back)
    assert torch.equal(fake_quantize(x, 32), x)


def test_other_widths_are_refused():
    with pytest.raises(ValueError, match="8 or 4 bits"):
        quantize_rows(torch.ones(2, 2), 16)
