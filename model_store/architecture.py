"""Every network a bundle holds, built from metadata: the ViT (timm) and the gate CNN; backbone/head splits."""

from __future__ import annotations

import copy
from functools import partial
from typing import get_args

import timm
import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from model_store.schema import Architecture, GateArch

StateDict = dict[str, torch.Tensor]

GATE_ARCHS: tuple[str, ...] = get_args(GateArch)


#: Where :func:`build_model` puts a CLIP tower's projection (a backbone tensor, never a head one).
PROJECTION_KEY = "fc_norm.proj.weight"


class ProjectNormalize(nn.Module):
    """CLIP's image embedding: ``normalize(P x)`` (``P``: ``out x in``, no bias), in timm's ``fc_norm`` slot."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.proj = nn.Linear(in_dim, out_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(self.proj(x), dim=-1)


def build_model(arch: Architecture, num_classes: int = 0) -> nn.Module:
    """A randomly initialised timm model for ``arch`` (``num_classes=0``: no head).

    With ``arch.projection_dim`` (CLIP towers) the pooled features go through
    :class:`ProjectNormalize` before the head, so ``pre_logits`` is the L2-normalised
    projected embedding and ``head`` is ``Linear(projection_dim, num_classes)``.
    """
    kwargs = dict(arch.kwargs)
    if arch.layer_norm_eps is not None:
        kwargs["norm_layer"] = partial(nn.LayerNorm, eps=arch.layer_norm_eps)
    model = timm.create_model(arch.timm_name, pretrained=False, num_classes=num_classes, **kwargs)
    if arch.projection_dim is not None:
        if not isinstance(getattr(model, "fc_norm", None), nn.Identity):
            raise ValueError(f"{arch.timm_name}: a projection needs token pooling without fc_norm")
        width, dim = int(model.embed_dim), arch.projection_dim  # type: ignore[arg-type]
        model.fc_norm = ProjectNormalize(width, dim)
        model.head = nn.Linear(dim, num_classes) if num_classes else nn.Identity()
        model.num_features = dim  # type: ignore[assignment]
        model.head_hidden_size = dim  # type: ignore[assignment]
    return model


@torch.inference_mode()
def pre_logits(model: nn.Module, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """A timm model's features right before its classifier (eval mode), ``batch_size`` rows at a time."""
    model.eval()
    out = [
        model.forward_head(model.forward_features(x[i : i + batch_size]), pre_logits=True)  # type: ignore[operator]
        for i in range(0, len(x), batch_size)
    ]
    return torch.cat(out) if out else torch.empty(0, getattr(model, "num_features", 0))


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


def build_gate(arch: str, num_tasks: int, init_state: StateDict | None = None) -> nn.Module:
    """A timm gate network with ``num_tasks`` outputs (optionally from pretrained weights).

    The model is in ``channels_last`` memory format: its depthwise convolutions run
    1.3-5.9x faster that way on CPU (``benchmarks/gate_memory_format.py``, BENCHMARKS.md);
    :func:`gate_state` gives a contiguous copy of the weights for saving.
    """
    if arch not in GATE_ARCHS:
        raise ValueError(f"unknown gate arch '{arch}'; valid: {', '.join(GATE_ARCHS)}")
    model = timm.create_model(arch, pretrained=False, num_classes=num_tasks)
    if init_state is not None:
        prefix = head_prefix(model)
        head_keys = set(split_head(model.state_dict(), prefix)[1])
        body, _ = split_head(init_state, prefix)  # the ImageNet classifier is replaced
        missing, unexpected = model.load_state_dict(body, strict=False)
        if unexpected or set(missing) - head_keys:
            raise ValueError(
                f"gate init does not fit {arch}: missing={sorted(set(missing) - head_keys)[:5]} "
                f"unexpected={unexpected[:5]}"
            )
    return model.to(memory_format=torch.channels_last)


def fold_batchnorm(model: nn.Module) -> int:
    """Fold every eval-mode ``BatchNorm2d`` into the ``Conv2d`` registered just before it in the same
    parent (timm's conv -> bn order in EfficientNet / MobileNet blocks), in place.

    The convolution takes the norm's scale and shift; the norm is replaced by what it applied after
    normalising (timm's ``BatchNormAct2d``: its dropout and activation), else an identity. Returns
    the number of norms folded. Serving only: the folded model has no BN statistics left to train.
    """
    folded = 0
    for parent in list(model.modules()):
        kids = list(parent.named_children())
        for (conv_name, conv), (bn_name, bn) in zip(kids, kids[1:]):
            if (
                isinstance(conv, nn.Conv2d)
                and isinstance(bn, nn.BatchNorm2d)
                and not (conv.training or bn.training)
                and bn.running_mean is not None
                and conv.out_channels == bn.num_features
            ):
                setattr(parent, conv_name, fuse_conv_bn_eval(conv, bn))
                setattr(parent, bn_name, _after_norm(bn))
                folded += 1
    return folded


def _after_norm(bn: nn.BatchNorm2d) -> nn.Module:
    """What a (timm ``BatchNormAct2d``) norm applies after normalising: dropout, activation."""
    parts = [m for m in (getattr(bn, "drop", None), getattr(bn, "act", None)) if isinstance(m, nn.Module)]
    parts = [m for m in parts if not isinstance(m, nn.Identity)]
    return parts[0] if len(parts) == 1 else nn.Sequential(*parts) if parts else nn.Identity()


@torch.inference_mode()
def folded_gate(model: nn.Module, size: int, channels: int = 3, tol: float = 1e-3) -> nn.Module:
    """An eval-mode gate with its batch norms folded into the convolutions, when that is exact.

    1.3-1.6x faster per batch of 32 on this project's 2-core CPU (``benchmarks/gate_fold.py``, e.g.
    EfficientNet-Lite0 at 96 px 69.6 -> 48.6 ms). The folded copy must give the logits of ``model`` on
    a random input (to ``tol`` of their scale; float rounding is ~1e-5 of it, a wrong fold ~1), else
    ``model`` itself is returned unchanged.
    """
    fused = copy.deepcopy(model).eval()
    if fold_batchnorm(fused) == 0:
        return model
    x = torch.randn(2, channels, size, size, generator=torch.Generator().manual_seed(0))
    x = x.contiguous(memory_format=torch.channels_last)
    want, got = model(x), fused(x)
    if not torch.allclose(got, want, rtol=tol, atol=tol * float(want.abs().max().clamp(min=1.0))):
        return model
    return fused.to(memory_format=torch.channels_last)


def gate_state(model: nn.Module) -> StateDict:
    """The gate's weights as contiguous tensors (safetensors refuses channels-last strides)."""
    return {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
