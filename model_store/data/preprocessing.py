"""Turning raw pixels into model input tensors, as a model's metadata describes."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from model_store.schema import Preprocessing


def to_model_input(images: np.ndarray | torch.Tensor, prep: Preprocessing, chunk: int = 512) -> torch.Tensor:
    """uint8 images ``(N, H, W)`` or ``(N, H, W, C)`` -> float ``(N, C, S, S)``.

    Converts channels (gray -> RGB by repetition, RGB -> gray by ITU-R 601 luma),
    resizes with antialiasing and normalises with the metadata's mean/std. Works in
    chunks so large pools (e.g. 300x300 solar cells) never sit in memory as float.
    """
    arr = images.numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    if arr.ndim == 3:
        arr = arr[..., None]
    if arr.ndim != 4:
        raise ValueError(f"expected (N, H, W) or (N, H, W, C) images, got shape {tuple(arr.shape)}")
    mean = torch.tensor(prep.mean).view(1, -1, 1, 1)
    std = torch.tensor(prep.std).view(1, -1, 1, 1)
    out = []
    for start in range(0, arr.shape[0], chunk):
        x = torch.from_numpy(np.array(arr[start : start + chunk])).permute(0, 3, 1, 2).float().div_(255.0)
        x = _convert_channels(x, prep.channels)
        if x.shape[-2:] != (prep.size, prep.size):
            x = F.interpolate(
                x, size=(prep.size, prep.size), mode=prep.interpolation, antialias=True, align_corners=False
            )
        out.append((x - mean) / std)
    if not out:
        return torch.empty(0, prep.channels, prep.size, prep.size)
    return torch.cat(out)


def _convert_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    c = x.shape[1]
    if c == channels:
        return x
    if c == 1 and channels == 3:
        return x.expand(-1, 3, -1, -1)
    if c in (3, 4) and channels == 1:
        w = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
        return (x[:, :3] * w).sum(1, keepdim=True)
    if c == 4 and channels == 3:
        return x[:, :3]
    raise ValueError(f"cannot convert {c}-channel images to {channels} channels")


def renormalise(x: torch.Tensor, src: Preprocessing, dst: Preprocessing) -> torch.Tensor:
    """Model input made with ``src`` ``(N, C, S, S)`` -> the input ``dst`` describes (undo mean/std, convert
    channels, resize, normalise again): e.g. the gate's input from already preprocessed pixels."""
    mean = torch.tensor(src.mean, dtype=x.dtype).view(1, -1, 1, 1)
    std = torch.tensor(src.std, dtype=x.dtype).view(1, -1, 1, 1)
    pixels = _convert_channels((x * std + mean).clamp_(0.0, 1.0), dst.channels)
    if pixels.shape[-2:] != (dst.size, dst.size):
        pixels = F.interpolate(
            pixels, size=(dst.size, dst.size), mode=dst.interpolation, antialias=True, align_corners=False
        )
    return (pixels - torch.tensor(dst.mean).view(1, -1, 1, 1)) / torch.tensor(dst.std).view(1, -1, 1, 1)
