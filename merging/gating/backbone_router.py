"""The backbone router (SPEC section 8): a small head on ``theta_0``'s own early features picks each image's task.

Features: ``theta_0`` (the base) runs its patch embedding and blocks ``1..k`` on every task's UNLABELED
calibration images with the bundle's (the base's) preprocessing; ``z(x)`` is pooled after every block of
interest in ONE pass (:func:`model_store.backbone_router.pooled_features`), so several ``k`` train from one
pass. Head (:class:`model_store.backbone_router.RouterHead`): class-balanced cross-entropy with the task
index as label, AdamW, a seeded held-out part of the images for early stopping (the best held-out epoch is
kept: accuracy first, then loss). It trains on ``z`` standardised per dimension (the training part's mean
and std; a ViT's features differ in scale by orders of magnitude across dimensions) and the standardisation
is folded into its first linear layer afterwards: the stored head reads ``z`` itself. Measured on the
dinov2-s14 zoo (BENCHMARKS.md, "Backbone router"): +1.6 / +1.9 points of test routing at k = 1 / 2 (linear).

Variants (``router_variant``): ``rerun`` keeps every task's deltas (the engine runs blocks ``1..k`` again
per task group); ``shared_prefix`` drops the deltas of the embeddings and blocks ``1..k`` from a low-rank
bundle (:func:`shared_prefix_deltas`), so the router's pass is every image's prefix.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Literal, cast

import torch
import torch.nn.functional as F
from pydantic import Field
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from merging.gating.router import GateParams, holdout_split, train_gate_for
from merging.methods.tsv import LowRankDeltas
from merging.registry import MergeContext, MergeResult, RouterArtifact
from model_store.backbone_router import RouterHead, is_prefix_key, pooled_features
from model_store.memory import training_allocations
from model_store.schema import RouterVariant


@dataclass(frozen=True)
class HeadConfig:
    hidden: int = 0
    epochs: int = 100
    lr: float = 3e-3
    batch_size: int = 256
    weight_decay: float = 1e-4
    holdout_fraction: float = 0.2
    patience: int = 10
    seed: int = 0


@dataclass
class HeadTraining:
    """A trained router head and how training went."""

    head: RouterHead
    holdout_accuracy: float
    epochs_run: int
    history: list[float] = field(default_factory=list)


@torch.no_grad()
def _score(head: RouterHead, z: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) of ``head`` on ``z`` labelled ``y``."""
    logits = head.eval()(z)
    return float((logits.argmax(1) == y).float().mean()), float(F.cross_entropy(logits, y))


@torch.no_grad()
def fold_standardisation(head: RouterHead, mean: torch.Tensor, std: torch.Tensor) -> None:
    """Make ``head(z)`` compute what it computed on ``(z - mean) / std`` (in place, exact up to rounding)."""
    first = head.net if isinstance(head.net, nn.Linear) else cast(nn.Sequential, head.net)[0]
    assert isinstance(first, nn.Linear)
    first.weight.div_(std)
    first.bias.sub_(first.weight @ mean)


@training_allocations()
def train_head(features: Sequence[torch.Tensor], cfg: HeadConfig = HeadConfig()) -> HeadTraining:
    """Train a router head on ``features[i]`` = ``z(x)`` of task i's calibration images (label = task index)."""
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = []
    for task, z in enumerate(features):
        if len(z) < 2:
            raise ValueError(f"task {task} has {len(z)} calibration images; the router needs at least 2")
        tr, ho = holdout_split(len(z), cfg.holdout_fraction, gen)
        parts.append((z[tr], torch.full((len(tr),), task), z[ho], torch.full((len(ho),), task)))
    z_tr, y_tr = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    z_ho, y_ho = torch.cat([p[2] for p in parts]), torch.cat([p[3] for p in parts])
    mean, std = z_tr.mean(0), z_tr.std(0).clamp(min=1e-6)
    z_tr, z_ho = (z_tr - mean) / std, (z_ho - mean) / std
    counts = torch.bincount(y_tr, minlength=len(features)).float()
    weight = counts.sum() / (len(features) * counts)
    head = RouterHead(z_tr.shape[1], len(features), cfg.hidden)
    opt = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = cfg.epochs * math.ceil(len(z_tr) / cfg.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=max(1, steps), pct_start=0.1)
    best: tuple[float, float] = (-1.0, 0.0)
    best_state, history, bad = None, [], 0
    for _epoch in range(cfg.epochs):
        head.train()
        order = torch.randperm(len(z_tr), generator=gen)
        for i in range(0, len(order), cfg.batch_size):
            idx = order[i : i + cfg.batch_size]
            loss = F.cross_entropy(head(z_tr[idx]), y_tr[idx], weight=weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        acc, ho_loss = _score(head, z_ho, y_ho)
        history.append(acc)
        if (acc, -ho_loss) > best:
            best, best_state, bad = (acc, -ho_loss), copy.deepcopy(head.state_dict()), 0
        else:
            bad += 1
            if bad >= cfg.patience:
                break
    assert best_state is not None
    head.load_state_dict(best_state)
    fold_standardisation(head, mean, std)
    return HeadTraining(head.eval().requires_grad_(False), best[0], len(history), history)


def base_features(ctx: MergeContext, ks: Sequence[int], limit: int | None) -> list[dict[int, torch.Tensor]]:
    """Per task: ``z(x)`` after each block in ``ks`` of ``theta_0`` on its first ``limit`` calibration images
    (the bundle's preprocessing); one pass per task."""
    assert ctx.build_model is not None and ctx.calibration is not None
    vit = cast(VisionTransformer, ctx.build_model(0, ctx.pretrained))  # theta_0 (task 0's head is not used)
    depth = len(vit.blocks)
    if max(ks) > depth:
        raise ValueError(f"router_k={max(ks)}: the backbone has {depth} blocks (1 <= router_k <= {depth})")
    return [
        pooled_features(vit, ctx.calibration(i, ctx.base_preprocessing, limit), ks) for i in range(len(ctx.finetuned))
    ]


def train_backbone_router(
    ctx: MergeContext, k: int, hidden: int, variant: str, limit: int, epochs: int, lr: float, seed: int
) -> RouterArtifact:
    """Train the backbone router of a merge on every task's calibration images (labels = task index)."""
    feats = [f[k] for f in base_features(ctx, [k], limit)]
    trained = train_head(feats, HeadConfig(hidden=hidden, epochs=epochs, lr=lr, seed=seed))
    return RouterArtifact(
        head={n: t.detach().clone() for n, t in trained.head.state_dict().items()},
        k=k,
        hidden=hidden,
        variant=variant,
        holdout_accuracy=trained.holdout_accuracy,
        epochs_run=trained.epochs_run,
        calibration_images=max(len(f) for f in feats),
    )


def shared_prefix_deltas(deltas: LowRankDeltas, k: int) -> LowRankDeltas:
    """``deltas`` without task deltas in the embeddings and blocks ``1..k``: every task runs ``theta_0`` there
    (``shared``), factors and small tensors are kept for the other layers only."""
    keys = set(deltas.ranks) | set(deltas.small[0])
    prefix = {key for key in keys if is_prefix_key(key, k)}
    if not prefix:
        raise ValueError(f"no tensor belongs to the embeddings or blocks 1..{k}")
    return replace(
        deltas,
        factors=[{key: f for key, f in task.items() if key not in prefix} for task in deltas.factors],
        small=[{key: v for key, v in task.items() if key not in prefix} for task in deltas.small],
        ranks={key: r for key, r in deltas.ranks.items() if key not in prefix},
        shared={**deltas.shared, **{key: deltas.pretrained[key].float().clone() for key in sorted(prefix)}},
    )


# -- the router of a merge method ---------------------------------------------------------
class RouterParams(GateParams):
    """How a routed method learns each image's task: the CNN gate (its ``gate_*`` parameters) or the backbone
    router (``router_*``; ``gate_max_images`` and ``gate_test_images`` and ``gate_seed`` apply to both).

    Defaults by measurement on the dinov2-s14 zoo (BENCHMARKS.md, "Backbone router (issue 36)"): the gate
    routes 99.52% of test images right vs 98.32% for the best backbone router (k=3, hidden 256; k=1 linear
    95.00%), so ``gate`` stays the default; a backbone router defaults to k=3, hidden 256 and ``rerun``
    (``shared_prefix`` served 94.08% routed normalised vs 98.32% for ``rerun``)."""

    router: Literal["gate", "backbone"] = Field(
        "gate", description="gate: a separate CNN; backbone: a head on theta_0's blocks 1..router_k (SPEC section 8)"
    )
    router_k: int = Field(3, ge=1, le=48, description="backbone router: the block whose tokens it reads")
    router_hidden: int = Field(256, ge=0, le=256, description="backbone router: hidden width of its head (0: linear)")
    router_variant: RouterVariant = Field(
        "rerun",
        description="backbone router: rerun (blocks 1..k run again with each task's weights) or shared_prefix "
        "(no task deltas in the embeddings and blocks 1..k; low-rank methods only)",
    )
    router_epochs: int = Field(100, gt=0, description="backbone router: at most this many epochs")
    router_lr: float = Field(3e-3, gt=0.0, description="backbone router: AdamW learning rate")


def route_result(ctx: MergeContext, p: RouterParams, result: MergeResult) -> MergeResult:
    """``result`` with the router ``p`` asks for: a trained gate, or a backbone router (a ``shared_prefix``
    router first drops the prefix's deltas of a low-rank result; other kinds refuse it)."""
    if p.router == "gate":
        result.gate = train_gate_for(ctx, p)
        return result
    if p.router_variant == "shared_prefix":
        if result.lowrank is None:
            raise ValueError(
                "router_variant='shared_prefix' needs low-rank task deltas (tsv_routed, lora_routed); "
                "use router_variant='rerun' with this method"
            )
        result.lowrank = shared_prefix_deltas(result.lowrank, p.router_k)
        result.info.shared_prefix_blocks = p.router_k
    result.router = train_backbone_router(
        ctx, p.router_k, p.router_hidden, p.router_variant, p.gate_max_images, p.router_epochs, p.router_lr, p.gate_seed
    )
    return result
