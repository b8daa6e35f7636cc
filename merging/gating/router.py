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
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn
from tqdm.auto import tqdm

from merging.registry import GateArtifact, MergeContext, Params
from merging.types import StateDict
from model_store.architecture import GateArch, build_gate, gate_state
from model_store.memory import training_allocations
from model_store.schema import Preprocessing


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


def _split(n: int, fraction: float, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    perm = torch.randperm(n, generator=gen)
    k = max(1, int(round(fraction * n))) if n > 1 else 0
    return perm[k:], perm[:k]


@training_allocations()
def train_gate(
    images: Sequence[torch.Tensor],
    cfg: GateConfig = GateConfig(),
    init_state: StateDict | None = None,
    progress: bool = True,
) -> GateTraining:
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


# -- the gate of a merge method ----------------------------------------------------------
class GateParams(Params):
    """Gate defaults chosen by measurement on the tiny zoo (BENCHMARKS.md, "Gate"):
    ImageNet-initialised EfficientNet-Lite0 at 64 px routed 99.5% of test images
    correctly vs 93.4% for MobileNetV2 from scratch (whose best lr was 1e-2)."""

    gate_arch: GateArch = Field("efficientnet_lite0", description="gate network")
    gate_size: int = Field(64, ge=16, le=512, description="gate input size in pixels")
    gate_epochs: int = Field(10, gt=0)
    gate_lr: float | None = Field(None, gt=0.0, description="default: 2e-3 pretrained, 1e-2 from scratch")
    gate_seed: int = 0
    gate_max_images: int = Field(1000, gt=0, description="calibration images per task for the gate")
    gate_test_images: int = Field(
        1000,
        ge=0,
        description="test images per task the routing accuracy is measured on after the merge (0: not measured)",
    )


#: Gate input normalisation (the offline EfficientNet-Lite0 weights expect mean = std = 0.5;
#: the scratch MobileNetV2 uses the same).
GATE_MEAN_STD = [0.5, 0.5, 0.5]


def gate_cache_key(tasks: Sequence[str], p: GateParams) -> tuple:
    """What a trained gate depends on: the tasks and every gate parameter (``gate_test_images`` only scores it)."""
    return (tuple(tasks), *(getattr(p, f) for f in GateParams.model_fields if f != "gate_test_images"))


def train_gate_for(ctx: MergeContext, p: GateParams) -> GateArtifact:
    """Train the gate on every task's calibration images (labels = task index); once per key: ``ctx.cache`` keeps
    it for other merges of the zoo, else ``ctx.memo`` for other candidates of this context (a grid shares it)."""
    key = gate_cache_key(ctx.tasks, p)
    gates: dict[tuple[Any, ...], GateArtifact] = (
        ctx.cache.gates if ctx.cache is not None else ctx.memo.setdefault("gates", {})
    )
    if key in gates:
        return gates[key]
    assert ctx.calibration is not None
    start = time.perf_counter()
    prep = Preprocessing(size=p.gate_size, channels=3, mean=GATE_MEAN_STD, std=GATE_MEAN_STD)
    images = [ctx.calibration(i, prep, p.gate_max_images) for i in range(len(ctx.finetuned))]
    init = ctx.gate_init(p.gate_arch) if ctx.gate_init is not None else None
    lr = p.gate_lr if p.gate_lr is not None else (2e-3 if init is not None else 1e-2)
    cfg = GateConfig(arch=p.gate_arch, epochs=p.gate_epochs, lr=lr, seed=p.gate_seed)
    trained = train_gate(images, cfg, init, progress=ctx.progress)
    art = GateArtifact(
        gate_state(trained.model),
        p.gate_arch,
        prep,
        trained.holdout_accuracy,
        trained.epochs_run,
        time.perf_counter() - start,
    )
    gates[key] = art
    return art
