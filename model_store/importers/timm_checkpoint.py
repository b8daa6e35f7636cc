"""Import a timm checkpoint (state dict file + model name + kwargs)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from timm.data import resolve_data_config
from timm.data.constants import DEFAULT_CROP_PCT

from model_store.architecture import build_model
from model_store.errors import CheckpointImportError
from model_store.importers.common import ImportTarget, read_state_dict, save_imported
from model_store.schema import Architecture, Preprocessing
from model_store.zoo import Zoo

#: timm's eval ``crop_mode`` -> our resize (each followed by a center crop, padding where the image is smaller)
_CROP_MODES = {"center": "shortest_edge", "squash": "squash", "border": "longest_edge"}


def default_preprocessing(arch: Architecture) -> Preprocessing:
    """timm's eval preprocessing of the architecture: ``resolve_data_config`` of its pretrained config
    (input size, ``crop_pct``, ``crop_mode``, interpolation, mean, std), with ``model_kwargs.img_size``
    and ``in_chans`` respected."""
    cfg = dict(resolve_data_config({}, model=build_model(arch, 0)))
    channels, _, size = cfg["input_size"]
    img_size = arch.kwargs.get("img_size", size)
    if isinstance(img_size, (list, tuple)):
        img_size = img_size[0] if len(set(img_size)) == 1 else img_size
    cfg["input_size"] = (int(arch.kwargs.get("in_chans", channels)), img_size, img_size)
    return timm_data_config_preprocessing(cfg, f"timm pretrained config of {arch.timm_name}")


def timm_data_config_preprocessing(cfg: dict[str, Any], where: str) -> Preprocessing:
    """A timm data config (``resolve_data_config``'s dict) -> what ``create_transform(**cfg)`` does in eval,
    on an RGB-converted image as timm's loaders give it."""
    channels, height, width = cfg["input_size"]
    if height != width:
        raise CheckpointImportError(f"{where}: input size {height}x{width} is not square")
    mean, std = list(cfg["mean"]), list(cfg["std"])
    if len(mean) != channels:  # e.g. a 1-channel model with ImageNet's 3-value statistics
        mean, std = mean[:channels], std[:channels]
    interp, crop_mode = cfg["interpolation"], cfg.get("crop_mode") or "center"
    if interp not in ("nearest", "bilinear", "bicubic", "lanczos") or crop_mode not in _CROP_MODES:
        bad = "interpolation" if crop_mode in _CROP_MODES else "crop_mode"
        raise CheckpointImportError(f"{where}: {bad} '{cfg[bad]}' has no equivalent here")
    return Preprocessing(
        size=int(height),
        channels=channels,
        mean=[float(v) for v in mean],
        std=[float(v) for v in std],
        interpolation=interp,
        resize=_CROP_MODES[crop_mode],
        crop_pct=float(cfg.get("crop_pct") or DEFAULT_CROP_PCT),
        fill=[round(255 * v) for v in mean] if crop_mode == "border" else [0],
        source=f"{where} (crop_mode {crop_mode})",
    )


def import_timm(
    checkpoint: str | Path, model_name: str, target: ImportTarget, model_kwargs: dict[str, Any] | None = None
) -> Zoo:
    """Add a timm checkpoint to ``target``'s zoo (strictly validated against ``model_name``)."""
    arch = Architecture(timm_name=model_name, kwargs=model_kwargs or {})
    state = read_state_dict(checkpoint)
    return save_imported(target, state, arch, default_preprocessing(arch), f"import:timm:{Path(checkpoint).name}")
