"""Building timm models from metadata and splitting their state into backbone + head."""
from __future__ import annotations

from functools import partial

import timm
import torch
from torch import nn

from model_store.schema import Architecture

StateDict = dict[str, torch.Tensor]


def build_model(arch: Architecture, num_classes: int = 0) -> nn.Module:
    """A randomly initialised timm model for ``arch`` (``num_classes=0``: no head)."""
    kwargs = dict(arch.kwargs)
    if arch.layer_norm_eps is not None:
        kwargs["norm_layer"] = partial(nn.LayerNorm, eps=arch.layer_norm_eps)
    return timm.create_model(arch.timm_name, pretrained=False, num_classes=num_classes, **kwargs)


def head_prefix(model: nn.Module) -> str:
    """Name of the classifier module (``head`` for timm ViTs)."""
    classifier = model.get_classifier()  # type: ignore[operator]
    for name, module in model.named_modules():
        if module is classifier and name:
            return name
    raise ValueError(f"{type(model).__name__} has no named classifier module")


def split_head(state: StateDict, prefix: str = "head") -> tuple[StateDict, StateDict]:
    """Split a full state dict into (backbone, head) by the classifier's key prefix."""
    head = {k: v for k, v in state.items() if k == prefix or k.startswith(prefix + ".")}
    backbone = {k: v for k, v in state.items() if k not in head}
    return backbone, head


def load_into(model: nn.Module, backbone: StateDict, head: StateDict | None = None) -> nn.Module:
    """Strictly load backbone (+ head) tensors into ``model``; raises on any mismatch."""
    state = dict(backbone)
    if head:
        state.update(head)
    model.load_state_dict(state, strict=True)
    return model
