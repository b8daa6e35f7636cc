"""A Hugging Face ``preprocessor_config.json`` -> :class:`~model_store.schema.Preprocessing`, completely.

Read as transformers' image processors (ViT, DeiT, BEiT, CLIP; torchvision backend, the default in
transformers 5) run it: ``do_resize`` + ``size`` (``height``/``width``: squash; ``shortest_edge``:
aspect kept), ``resample``, ``do_center_crop`` + ``crop_size`` (offset floored), ``do_rescale`` +
``rescale_factor``, ``do_normalize`` + ``image_mean``/``image_std``, ``do_convert_rgb`` (transparency
composited onto white). A field that changes pixels and that we cannot honour is refused, naming the
file and the field -- never approximated. Fields a saved config omits take the processor class's
defaults. No dependency on ``transformers``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from model_store.errors import CheckpointImportError
from model_store.importers.common import read_json
from model_store.schema import Interpolation, Preprocessing

PROCESSOR_FILE = "preprocessor_config.json"
IMAGENET_DEFAULT_MEAN = [0.485, 0.456, 0.406]
IMAGENET_DEFAULT_STD = [0.229, 0.224, 0.225]
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

_COMMON: dict[str, Any] = {
    "do_resize": True,
    "do_rescale": True,
    "rescale_factor": 1 / 255,
    "do_normalize": True,
    "do_center_crop": False,
    "do_convert_rgb": None,
}
_SQUARE_224 = {"height": 224, "width": 224}
#: transformers 5's class defaults for the fields a saved config may leave out
DEFAULTS: dict[str, dict[str, Any]] = {
    "ViTImageProcessor": {
        **_COMMON,
        "size": _SQUARE_224,
        "resample": 2,
        "image_mean": [0.5] * 3,
        "image_std": [0.5] * 3,
    },
    "DeiTImageProcessor": {
        **_COMMON,
        "size": {"height": 256, "width": 256},
        "resample": 3,
        "do_center_crop": True,
        "crop_size": _SQUARE_224,
        "image_mean": [0.5] * 3,
        "image_std": [0.5] * 3,
    },
    "BeitImageProcessor": {
        **_COMMON,
        "size": _SQUARE_224,
        "resample": 3,
        "crop_size": _SQUARE_224,
        "image_mean": [0.5] * 3,
        "image_std": [0.5] * 3,
    },
    "CLIPImageProcessor": {
        **_COMMON,
        "size": {"shortest_edge": 224},
        "resample": 3,
        "do_center_crop": True,
        "crop_size": _SQUARE_224,
        "do_convert_rgb": True,
        "image_mean": CLIP_MEAN,
        "image_std": CLIP_STD,
    },
}
#: legacy ``feature_extractor_type`` names -> the processor that replaced them
_LEGACY = {"ViTFeatureExtractor": "ViTImageProcessor", "DeiTFeatureExtractor": "DeiTImageProcessor",
           "BeitFeatureExtractor": "BeitImageProcessor", "CLIPFeatureExtractor": "CLIPImageProcessor"}  # fmt: skip
#: PIL resample codes -> ours (1 LANCZOS runs on torchvision's CPU kernel; 4 BOX, 5 HAMMING have none)
_RESAMPLE: dict[int, Interpolation] = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic"}
_HONOURED = {
    "do_resize", "size", "resample", "do_center_crop", "crop_size", "do_rescale", "rescale_factor",
    "do_normalize", "image_mean", "image_std", "do_convert_rgb", "default_to_square",
}  # fmt: skip
#: fields that never change an image's pixels (bookkeeping, labels, return types)
_HARMLESS = {
    "image_processor_type", "feature_extractor_type", "processor_class", "_processor_class", "do_reduce_labels",
    "reduce_labels", "return_tensors", "data_format", "input_data_format", "device", "disable_grouping",
    "use_square_size", "backend",
}  # fmt: skip


def processor_preprocessing(
    ckpt_dir: Path, size: int, channels: int, default_class: str = "ViTImageProcessor"
) -> Preprocessing:
    """The preprocessing ``ckpt_dir/preprocessor_config.json`` describes, for a model taking ``size`` px and
    ``channels`` channels (``default_class``'s defaults without a file, or for fields it leaves out)."""
    path = ckpt_dir / PROCESSOR_FILE
    raw = read_json(path) if path.exists() else _at_model_size(default_class, size)
    kind = str(raw.get("image_processor_type") or _LEGACY.get(str(raw.get("feature_extractor_type")), default_class))
    kind = kind.removesuffix("Fast")
    where = str(path) if path.exists() else f"{ckpt_dir} (no {PROCESSOR_FILE}: {kind}'s defaults at {size} px)"
    if kind not in DEFAULTS and raw:
        missing = [f for f in ("size", "resample", "image_mean", "image_std") if f not in raw]
        if missing:
            raise CheckpointImportError(
                f"{path}: image_processor_type '{kind}' is not one whose defaults we know ({', '.join(DEFAULTS)}); "
                f"its config must then say {', '.join(missing)} itself"
            )
    cfg = {**DEFAULTS.get(kind, DEFAULTS[default_class]), **raw}
    _refuse_unknown(raw, path)
    interpolation = _resample(cfg, path)
    mean, std = _normalisation(cfg, channels, path)
    resize, target, crop = _geometry(cfg, kind, size, path)
    return Preprocessing(
        size=size,
        channels=channels,
        mean=mean,
        std=std,
        interpolation=interpolation,
        resize=resize,
        resize_size=target if target != size or resize != "squash" else None,
        crop_rounding="floor",
        rescale_factor=float(cfg["rescale_factor"]) if cfg.get("do_rescale", True) else 1.0,
        alpha="white" if cfg.get("do_convert_rgb") else "drop",
        source=f"{where} ({kind}{', crop ' + str(crop) if crop else ''})",
    )


def _at_model_size(kind: str, size: int) -> dict[str, Any]:
    """Without a config: the processor class's defaults, resized for the model's own input size."""
    square = {"height": size, "width": size}
    if "shortest_edge" in DEFAULTS[kind]["size"]:
        return {"size": {"shortest_edge": size}, "crop_size": square}
    return {"size": square, "crop_size": square}


def _refuse_unknown(raw: dict[str, Any], path: Path) -> None:
    for key, value in raw.items():
        if key in _HONOURED or key in _HARMLESS or value in (None, False, {}, []):
            continue
        raise CheckpointImportError(
            f"{path}: field '{key}' ({value!r}) changes the model's input in a way vitmerge does not reproduce; "
            "remove it if the model was not evaluated with it, or override the preprocessing in the zoo spec"
        )


def _resample(cfg: dict[str, Any], path: Path) -> Interpolation:
    code = cfg.get("resample", 2)
    if not isinstance(code, int) or code not in _RESAMPLE:
        raise CheckpointImportError(
            f"{path}: field 'resample' ({code!r}) is not supported: use 0 (nearest), 1 (lanczos), 2 (bilinear) or "
            "3 (bicubic); Pillow's BOX (4) and HAMMING (5) have no tensor kernel"
        )
    return _RESAMPLE[code]


def _normalisation(cfg: dict[str, Any], channels: int, path: Path) -> tuple[list[float], list[float]]:
    if not cfg.get("do_normalize", True):
        return [0.0] * channels, [1.0] * channels
    out = []
    for field in ("image_mean", "image_std"):
        value = cfg[field]
        values = [float(v) for v in value] if isinstance(value, (list, tuple)) else [float(value)] * channels
        if len(values) != channels:
            raise CheckpointImportError(
                f"{path}: field '{field}' has {len(values)} values, the model {channels} channels"
            )
        out.append(values)
    return out[0], out[1]


def _square(value: Any, field: str, path: Path) -> int:
    """A ``{height, width}`` dict or an int -> its side; refused when not square."""
    if isinstance(value, int):
        return value
    if isinstance(value, dict) and value.get("height") and value.get("height") == value.get("width"):
        return int(value["height"])
    raise CheckpointImportError(f"{path}: field '{field}' ({value!r}) must be square ({{height: S, width: S}})")


def _geometry(cfg: dict[str, Any], kind: str, size: int, path: Path) -> tuple[str, int, int | None]:
    """(resize mode, resize edge, crop side or None) -- the result must be the model's ``size``."""
    if not cfg.get("do_resize", True):
        raise CheckpointImportError(
            f"{path}: field 'do_resize' is false: images of any size cannot feed a model that takes {size} px"
        )
    raw_size = cfg["size"]
    square_default = cfg.get("default_to_square", kind != "CLIPImageProcessor")
    if isinstance(raw_size, dict) and "shortest_edge" in raw_size:
        if raw_size.get("longest_edge"):
            raise CheckpointImportError(f"{path}: field 'size.longest_edge' is not supported (classification models)")
        mode, target = "shortest_edge", int(raw_size["shortest_edge"])
    elif isinstance(raw_size, int) and not square_default:
        mode, target = "shortest_edge", raw_size
    else:
        mode, target = "squash", _square(raw_size, "size", path)
    crop = _square(cfg["crop_size"], "crop_size", path) if cfg.get("do_center_crop") else None
    final = crop if crop is not None else (target if mode == "squash" else None)
    if final != size:
        what = f"crop_size {crop}" if crop is not None else f"size {raw_size!r} without a center crop"
        raise CheckpointImportError(f"{path}: {what} does not give the model's {size} x {size} input")
    return mode, target, crop
