"""Raw pixels -> model input, as the checkpoint's own library does it (SPEC section 10).

The one implementation the server, the data sources, evaluation and the benchmarks use. It runs on
batches of uint8 images of one size (a list of images of different sizes is grouped by size), in
the order every reference pipeline uses:

1. channels: transparency by :attr:`~model_store.schema.Preprocessing.alpha`, colour -> gray by
   Pillow's ITU-R 601 luma (gray -> RGB is a repetition, done at the end);
2. resize by torchvision's uint8 kernels -- the ones transformers' torchvision image processors
   run, and within 2/255 of Pillow's antialiased filters that timm and open_clip run on PIL images
   (``tests/model_store/test_preprocessing_reference.py`` measures it);
3. center crop to ``size`` (padding with ``fill`` where the image is smaller);
4. ``x * rescale_factor`` normalised by mean/std, fused in one float pass.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from torchvision.transforms import InterpolationMode

from model_store.schema import Preprocessing

_MODES = {
    "nearest": InterpolationMode.NEAREST_EXACT,  # Pillow's NEAREST (pixel centres)
    "bilinear": InterpolationMode.BILINEAR,
    "bicubic": InterpolationMode.BICUBIC,
    "lanczos": InterpolationMode.LANCZOS,
}
Images = np.ndarray | torch.Tensor | Sequence[np.ndarray]


def to_model_input(images: Images, prep: Preprocessing, chunk: int = 256) -> torch.Tensor:
    """uint8 images ``(N, H, W[, C])`` (or a list of ``(H, W[, C])`` of any sizes) -> float ``(N, C, S, S)``.

    ``C`` of the input may be 1 (gray), 3 (RGB) or 4 (RGBA). Works ``chunk`` images at a time so
    large pools never sit in memory as float.
    """
    if isinstance(images, (list, tuple)):
        return _ragged(images, prep)
    arr = images.numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    if arr.ndim == 3:
        arr = arr[..., None]
    if arr.ndim != 4:
        raise ValueError(f"expected (N, H, W) or (N, H, W, C) images, got shape {tuple(arr.shape)}")
    if arr.dtype != np.uint8:
        raise ValueError(f"expected uint8 pixels, got {arr.dtype}")
    out = torch.empty(arr.shape[0], prep.channels, prep.size, prep.size)
    for start in range(0, arr.shape[0], chunk):
        with warnings.catch_warnings():  # decoded images are read-only views; nothing here writes to them
            warnings.filterwarnings("ignore", "The given NumPy array is not writable", UserWarning)
            pixels = torch.from_numpy(np.ascontiguousarray(arr[start : start + chunk]))
        out[start : start + chunk] = prepare_batch(pixels.permute(0, 3, 1, 2), prep)
    return out


def _ragged(images: Sequence[np.ndarray], prep: Preprocessing) -> torch.Tensor:
    """Images of different sizes: one batch per distinct shape, results in the input order."""
    out = torch.empty(len(images), prep.channels, prep.size, prep.size)
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, img in enumerate(images):
        groups.setdefault(tuple(np.shape(img)), []).append(i)
    for idx in groups.values():
        out[idx] = to_model_input(np.stack([np.asarray(images[i]) for i in idx]), prep)
    return out


def prepare_batch(x: torch.Tensor, prep: Preprocessing) -> torch.Tensor:
    """uint8 ``(N, C, H, W)`` of one size -> the model's float input ``(N, channels, size, size)``."""
    if x.shape[1] == 4 and prep.alpha == "premultiplied":  # Pillow resizes RGBA premultiplied
        x = _unpremultiply(resize(_premultiply(x), prep))[:, :3]
        x = _to_channels(x, prep)
    else:
        x = resize(_to_channels(x, prep), prep)
    return _normalise(center_crop(x, prep), prep)


def _to_channels(x: torch.Tensor, prep: Preprocessing) -> torch.Tensor:
    """Transparency removed (``prep.alpha``), colour -> gray for 1-channel models; gray stays 1 channel."""
    if x.shape[1] == 4:
        x = _on_white(x) if prep.alpha == "white" else x[:, :3]
    if x.shape[1] == 3 and prep.channels == 1:
        return _luma(x)
    if x.shape[1] not in (1, 3):
        raise ValueError(f"cannot convert {x.shape[1]}-channel images to {prep.channels} channels")
    return x


_LUMA = torch.tensor([19595.0, 38470.0, 7471.0])


def _luma(x: torch.Tensor) -> torch.Tensor:
    """Pillow's ``convert("L")``: ``(R*19595 + G*38470 + B*7471 + 2^15) >> 16``, exactly: every sum is an
    integer below 2^24, so float32 holds it exactly, and a matmul over the (channels-last) pixels is fast."""
    rgb = x.permute(0, 2, 3, 1).float()  # (N, H, W, 3): the decoder's own layout, no copy before .float()
    return (rgb @ _LUMA).add_(32768.0).div_(65536.0).floor_().to(torch.uint8).unsqueeze(1)


def _on_white(x: torch.Tensor) -> torch.Tensor:
    """Pillow's ``alpha_composite`` of RGBA over opaque white, in its integer arithmetic."""
    rgb, a = x[:, :3].to(torch.int32), x[:, 3:].to(torch.int32)
    tmp = (rgb * a + 255 * (255 - a)) * 128 + (0x80 << 7)
    return ((((tmp >> 8) + tmp) >> 8) >> 7).clamp_(0, 255).to(torch.uint8)


def _premultiply(x: torch.Tensor) -> torch.Tensor:
    """Pillow's RGBA -> RGBa: ``v * a / 255`` in its rounding."""
    rgb, a = x[:, :3].to(torch.int32), x[:, 3:].to(torch.int32)
    tmp = rgb * a + 128
    return torch.cat([((tmp >> 8) + tmp) >> 8, a], 1).to(torch.uint8)


def _unpremultiply(x: torch.Tensor) -> torch.Tensor:
    """Pillow's RGBa -> RGBA: ``min(255, 255 * v // a)``, values kept where ``a`` is 0 or 255."""
    rgb, a = x[:, :3].to(torch.int32), x[:, 3:].to(torch.int32)
    out = torch.where((a == 0) | (a == 255), rgb, (rgb * 255) // a.clamp(min=1)).clamp_(0, 255)
    return torch.cat([out, a], 1).to(torch.uint8)


def resized_shape(height: int, width: int, prep: Preprocessing) -> tuple[int, int]:
    """``(h, w)`` after the resize ``prep`` describes (torchvision's and timm's integer rules)."""
    t = prep.resize_target()
    if prep.resize == "squash":
        return t, t
    if prep.resize == "shortest_edge":
        short, long = min(height, width), max(height, width)
        new_long = int(t * long / short)
        return (t, new_long) if height <= width else (new_long, t)
    ratio = max(height / t, width / t)  # longest_edge: ResizeKeepRatio(longest=1)
    return round(height / ratio), round(width / ratio)


def resize(x: torch.Tensor, prep: Preprocessing) -> torch.Tensor:
    """uint8 ``(N, C, H, W)`` resized as ``prep`` says (antialiased; a no-op at the target size)."""
    h, w = resized_shape(x.shape[-2], x.shape[-1], prep)
    if (h, w) == tuple(x.shape[-2:]):
        return x
    return TF.resize(x, [h, w], interpolation=_MODES[prep.interpolation], antialias=True)


def center_crop(x: torch.Tensor, prep: Preprocessing) -> torch.Tensor:
    """Crop the centre ``size`` x ``size``; pad with ``fill`` first where the image is smaller."""
    s = prep.size
    h, w = x.shape[-2:]
    if h < s or w < s:
        if len(set(prep.fill)) > 1 and x.shape[1] == 1:
            x = x.expand(-1, prep.channels, -1, -1)
        pad = (max(s - w, 0) // 2, max(s - w + 1, 0) // 2, max(s - h, 0) // 2, max(s - h + 1, 0) // 2)
        if len(set(prep.fill)) == 1:
            x = F.pad(x, pad, value=prep.fill[0])
        else:
            fill = torch.tensor(prep.fill, dtype=x.dtype).view(1, -1, 1, 1)
            canvas = fill.expand(x.shape[0], -1, h + pad[2] + pad[3], w + pad[0] + pad[1]).clone()
            canvas[..., pad[2] : pad[2] + h, pad[0] : pad[0] + w] = x
            x = canvas
        h, w = x.shape[-2:]
    if (h, w) == (s, s):
        return x
    top, left = _offset(h - s, prep), _offset(w - s, prep)
    return x[..., top : top + s, left : left + s]


def _offset(extra: int, prep: Preprocessing) -> int:
    return int(round(extra / 2.0)) if prep.crop_rounding == "round" else extra // 2


def _normalise(x: torch.Tensor, prep: Preprocessing) -> torch.Tensor:
    """uint8 -> ``(x * rescale_factor - mean) / std`` as one multiply-add; gray repeated for RGB models."""
    if x.shape[1] == 1 and prep.channels == 3:
        x = x.expand(-1, 3, -1, -1)
    std = torch.tensor(prep.std).view(1, -1, 1, 1)
    scale = prep.rescale_factor / std
    shift = torch.tensor(prep.mean).view(1, -1, 1, 1) / std
    return torch.sub(x.contiguous().float().mul_(scale), shift)


def renormalise(x: torch.Tensor, src: Preprocessing, dst: Preprocessing) -> torch.Tensor:
    """Model input made with ``src`` ``(N, C, S, S)`` -> the input ``dst`` describes (e.g. the gate's input
    from already preprocessed pixels): back to uint8 pixels, then :func:`to_model_input`."""
    mean = torch.tensor(src.mean, dtype=x.dtype).view(1, -1, 1, 1)
    std = torch.tensor(src.std, dtype=x.dtype).view(1, -1, 1, 1)
    pixels = ((x * std + mean) / src.rescale_factor).round_().clamp_(0, 255).to(torch.uint8)
    return to_model_input(pixels.permute(0, 2, 3, 1), dst)
