"""Few-image training data for FS-Merge and distillation: augmentations + teacher features.

FS-Merge (appendix E.2) expands a few unlabeled images per task with augmentations
(random crops, photometric changes, MixUp) and precomputes each original model's
final features on its OWN task's images; both FS-Merge and the distillation
baseline train on exactly this set.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from model_store.architecture import pre_logits
from model_store.zoo_build.training import cosine_schedule


def augment(images: torch.Tensor, copies: int, generator: torch.Generator) -> torch.Tensor:
    """``copies`` augmented versions of every image (seeded).

    Random affine (rotation +-12 deg, scale 0.85-1.15, shift +-12%), contrast and
    brightness jitter, and MixUp with another image of the same set (lambda in
    [0.6, 1]) for half of them. Inputs are preprocessed tensors ``(n, C, H, W)``.
    """
    if copies <= 0 or len(images) == 0:
        return images[:0]
    x = images.repeat(copies, 1, 1, 1)
    n = len(x)

    def u(lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(n, generator=generator)

    angle = u(-12, 12) * math.pi / 180
    scale = u(0.85, 1.15)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, u(-0.12, 0.12)], 1), torch.stack([sin, cos, u(-0.12, 0.12)], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, padding_mode="border", align_corners=False)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * u(0.8, 1.2).view(-1, 1, 1, 1) + mean + u(-0.15, 0.15).view(-1, 1, 1, 1)
    mix = torch.rand(n, generator=generator) < 0.5
    partner = torch.randint(0, n, (n,), generator=generator)
    lam = u(0.6, 1.0).view(-1, 1, 1, 1)
    mixed = lam * x + (1 - lam) * x[partner]
    return torch.where(mix.view(-1, 1, 1, 1), mixed, x)


@dataclass
class FeatureSet:
    """Images of every task, their task index and the task's original model's features."""

    images: torch.Tensor
    task: torch.Tensor
    targets: torch.Tensor

    def __len__(self) -> int:
        return len(self.task)


def build_feature_set(
    models: Sequence[nn.Module], images: Sequence[torch.Tensor], copies: int, seed: int
) -> FeatureSet:
    """Originals + ``copies`` augmentations per image of every task, with model t's features on task t's images."""
    gen = torch.Generator().manual_seed(seed)
    xs, ts, fs = [], [], []
    for t, (model, imgs) in enumerate(zip(models, images)):
        x = torch.cat([imgs, augment(imgs, copies, gen)])
        xs.append(x)
        ts.append(torch.full((len(x),), t, dtype=torch.long))
        fs.append(pre_logits(model, x))
    return FeatureSet(torch.cat(xs), torch.cat(ts), torch.cat(fs))


@dataclass(frozen=True)
class FitConfig:
    """AdamW + one-cycle cosine schedule over the feature set (FS-Merge appendix E.2)."""

    epochs: int = 30
    lr: float = 1e-3
    batch_size: int = 64
    weight_decay: float = 1e-3
    seed: int = 0


def fit(
    params: Sequence[torch.Tensor], predict, data: FeatureSet, cfg: FitConfig, desc: str = "fit", progress: bool = False
) -> list[float]:
    """Minimise the global feature-reconstruction loss ``|predict(x, task) - target|^2``.

    ``predict(images, task_index)`` returns the reconstruction of each image's own
    task's original features. Returns the mean loss of every epoch.
    """
    from tqdm.auto import tqdm

    gen = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.AdamW(list(params), lr=cfg.lr, weight_decay=cfg.weight_decay)
    per_epoch = max(1, math.ceil(len(data) / cfg.batch_size))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine_schedule(per_epoch * cfg.epochs))
    history: list[float] = []
    with tqdm(total=per_epoch * cfg.epochs, desc=desc, unit="step", disable=not progress, leave=False) as bar:
        for _ in range(cfg.epochs):
            order = torch.randperm(len(data), generator=gen)
            total = 0.0
            for i in range(0, len(data), cfg.batch_size):
                idx = order[i : i + cfg.batch_size]
                loss = F.mse_loss(predict(data.images[idx], data.task[idx]), data.targets[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                total += float(loss.detach()) * len(idx)
                bar.update(1)
                bar.set_postfix(loss=f"{float(loss.detach()):.4f}", refresh=False)
            history.append(total / len(data))
    return history
