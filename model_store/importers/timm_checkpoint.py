"""Import a timm checkpoint (state dict file + model name + kwargs)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from model_store.architecture import build_model
from model_store.importers.common import read_state_dict, save_imported
from model_store.schema import Architecture, Preprocessing
from model_store.zoo import Zoo


def default_preprocessing(arch: Architecture) -> Preprocessing:
    """Preprocessing from timm's pretrained config of the architecture."""
    cfg: dict = build_model(arch, 0).pretrained_cfg  # type: ignore[assignment]
    channels, _, size = cfg.get("input_size", (3, 224, 224))
    size = arch.kwargs.get("img_size", size)
    size = size[0] if isinstance(size, (list, tuple)) else size
    channels = arch.kwargs.get("in_chans", channels)
    mean = list(cfg.get("mean", (0.5,) * channels))[:channels]
    std = list(cfg.get("std", (0.5,) * channels))[:channels]
    interp = cfg.get("interpolation", "bicubic")
    return Preprocessing(
        size=int(size),
        channels=channels,
        mean=mean,
        std=std,
        interpolation="bicubic" if interp == "bicubic" else "bilinear",
    )


def import_timm(
    checkpoint: str | Path,
    model_name: str,
    zoo_dir: str | Path,
    name: str,
    role: str = "task",
    model_kwargs: dict[str, Any] | None = None,
    task: str | None = None,
    class_names: list[str] | None = None,
    preprocessing: Preprocessing | None = None,
    calibration: str | None = None,
    test: str | None = None,
    data_dir: str | Path | None = None,
) -> Zoo:
    """Add a timm checkpoint to a zoo (strictly validated against ``model_name``)."""
    arch = Architecture(timm_name=model_name, kwargs=model_kwargs or {})
    state = read_state_dict(checkpoint)
    prep = preprocessing or default_preprocessing(arch)
    return save_imported(
        zoo_dir,
        name,
        role,
        state,
        arch,
        prep,
        f"import:timm:{Path(checkpoint).name}",
        task,
        class_names,
        calibration,
        test,
        data_dir,
    )
