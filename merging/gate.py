"""The gate: a small CNN that tells which task an image comes from (SPEC section 3).

Trained on the UNLABELED calibration images of every task; the label of an image is
its task index (class labels are never used). ``p(x) = softmax(G(x))`` per image.

Architectures (timm): ``mobilenetv2_100`` trained from scratch (no float ImageNet
MobileNetV2 exists offline) and ``efficientnet_lite0`` initialised from ImageNet
weights passed in as ``init_state`` (the classifier is replaced). Training: AdamW,
class-balanced cross-entropy, a seeded held-out part of the calibration images for
early stopping (the best held-out epoch is kept).
"""
from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import timm
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from merging.types import StateDict
from model_store.architecture import head_prefix, split_head
from model_store.memory import training_allocations

GateArch = Literal["mobilenetv2_100", "efficientnet_lite0"]
GATE_ARCHS: tuple[str, ...] = ("mobilenetv2_100", "efficientnet_lite0")


@dataclass(frozen=True)
class GateConfig:
    arch: GateArch = "mobilenetv2_100"
    epochs: int = 15
    lr: float = 2e-3
    batch_size: int = 64
    weight_decay: float = 0.01
    holdout_fraction: float = 0.2
    patience: int = 4
    seed: int = 0


@dataclass
class GateTraining:
    """A trained gate and how training went."""

    model: nn.Module
    arch: str
    holdout_accuracy: float
    epochs_run: int
    history: list[float] = field(default_factory=list)


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
            raise ValueError(f"gate init does not fit {arch}: missing={sorted(set(missing) - head_keys)[:5]} unexpected={unexpected[:5]}")
    return model.to(memory_format=torch.channels_last)


def gate_state(model: nn.Module) -> StateDict:
    """The gate's weights as contiguous tensors (safetensors refuses channels-last strides)."""
    return {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}


def _split(n: int, fraction: float, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    perm = torch.randperm(n, generator=gen)
    k = max(1, int(round(fraction * n))) if n > 1 else 0
    return perm[k:], perm[:k]


@training_allocations()
def train_gate(images: Sequence[torch.Tensor], cfg: GateConfig = GateConfig(), init_state: StateDict | None = None, progress: bool = True) -> GateTraining:
    """Train a gate on ``images[i]`` = task i's preprocessed calibration images."""
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    tr_x, tr_y, ho_x, ho_y = [], [], [], []
    for task, x in enumerate(images):
        if len(x) < 2:
            raise ValueError(f"task {task} has {len(x)} calibration images; the gate needs at least 2")
        tr, ho = _split(len(x), cfg.holdout_fraction, gen)
        tr_x.append(x[tr])
        ho_x.append(x[ho])
        tr_y.append(torch.full((len(tr),), task))
        ho_y.append(torch.full((len(ho),), task))
    x_tr, y_tr, x_ho, y_ho = torch.cat(tr_x), torch.cat(tr_y), torch.cat(ho_x), torch.cat(ho_y)
    x_tr = x_tr.contiguous(memory_format=torch.channels_last)
    counts = torch.bincount(y_tr, minlength=len(images)).float()
    weight = counts.sum() / (len(images) * counts)
    model = build_gate(cfg.arch, len(images), init_state)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = cfg.epochs * math.ceil(len(x_tr) / cfg.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=max(1, steps), pct_start=0.15)
    best, best_state, history, bad = -1.0, None, [], 0
    bar = tqdm(range(cfg.epochs), desc=f"gate {cfg.arch}", unit="epoch", disable=not progress, leave=False)
    for _epoch in bar:
        model.train()
        order = torch.randperm(len(x_tr), generator=gen)
        for i in range(0, len(order), cfg.batch_size):
            idx = order[i : i + cfg.batch_size]
            if len(idx) < 2:  # BatchNorm needs more than one sample
                continue
            loss = F.cross_entropy(model(x_tr[idx]), y_tr[idx], weight=weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        acc = gate_accuracy(model, x_ho, y_ho)
        history.append(acc)
        bar.set_postfix(holdout=f"{acc:.3f}")
        if acc > best:
            best, best_state, bad = acc, copy.deepcopy(model.state_dict()), 0
        else:
            bad += 1
            if bad >= cfg.patience:
                break
    assert best_state is not None
    model.load_state_dict(best_state)
    return GateTraining(model.eval(), cfg.arch, best, len(history), history)


@torch.inference_mode()
def gate_probabilities(model: nn.Module, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """``p(x) = softmax(G(x))`` per image, shape ``(B, N)``."""
    model.eval()
    if len(x) == 0:
        return torch.empty(0, 0)
    x = x.contiguous(memory_format=torch.channels_last)
    return torch.cat([model(x[i : i + batch_size]).softmax(-1) for i in range(0, len(x), batch_size)])


def gate_accuracy(model: nn.Module, x: torch.Tensor, tasks: torch.Tensor) -> float:
    """Share of images routed to their own task."""
    if len(x) == 0:
        return float("nan")
    return float((gate_probabilities(model, x).argmax(-1) == tasks).float().mean())
