"""Supervised training and evaluation of classifiers on in-memory tensors.

Used to build source zoos (pretraining the base, fine-tuning task models). Not on
any serving path.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from model_store.architecture import head_prefix
from model_store.memory import training_allocations


@dataclass(frozen=True)
class TrainConfig:
    """AdamW with linear warm-up and cosine decay."""

    epochs: int = 1
    lr: float = 1e-3
    batch_size: int = 128
    weight_decay: float = 0.05
    warmup_fraction: float = 0.1
    label_smoothing: float = 0.0
    seed: int = 0
    head_lr: float | None = None  # classifier's own lr (fine-tuning a pretrained backbone); None: ``lr``


def cosine_schedule(total: int, warmup_fraction: float = 0.1) -> Callable[[int], float]:
    """LambdaLR factor: linear warm-up over ``warmup_fraction`` of ``total`` steps, then cosine decay to 0."""
    warmup = max(1, int(warmup_fraction * total))

    def at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    return at


def param_groups(model: nn.Module, cfg: TrainConfig) -> list[dict]:
    """One group at ``lr``; with ``head_lr`` the classifier gets its own group."""
    if cfg.head_lr is None:
        return [{"params": list(model.parameters()), "lr": cfg.lr}]
    prefix = head_prefix(model)
    is_head = {k: k == prefix or k.startswith(prefix + ".") for k, _ in model.named_parameters()}
    return [
        {"params": [p for k, p in model.named_parameters() if not is_head[k]], "lr": cfg.lr},
        {"params": [p for k, p in model.named_parameters() if is_head[k]], "lr": cfg.head_lr},
    ]


@training_allocations()
def train_classifier(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: TrainConfig, desc: str = "train", progress: bool = True
) -> float:
    """Train ``model`` in place on ``(x, y)`` (batches go to the model's device); returns seconds."""
    gen = torch.Generator().manual_seed(cfg.seed)
    device = next(model.parameters()).device
    opt = torch.optim.AdamW(param_groups(model, cfg), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(x) / cfg.batch_size)
    total = max(1, steps_per_epoch * cfg.epochs)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine_schedule(total, cfg.warmup_fraction))
    model.train()
    start = time.perf_counter()
    with tqdm(total=total, desc=desc, unit="step", disable=not progress, leave=False) as bar:
        for _ in range(cfg.epochs):
            order = torch.randperm(len(x), generator=gen)
            for i in range(0, len(x), cfg.batch_size):
                idx = order[i : i + cfg.batch_size]
                loss = F.cross_entropy(model(x[idx].to(device)), y[idx].to(device), label_smoothing=cfg.label_smoothing)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    model.eval()
    return time.perf_counter() - start


@torch.inference_mode()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Arg-max class of every row of ``x``."""
    model.eval()
    device = next(model.parameters()).device
    if not len(x):
        return torch.empty(0, dtype=torch.long)
    return torch.cat([model(x[i : i + batch_size].to(device)).argmax(-1).cpu() for i in range(0, len(x), batch_size)])


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 512) -> float:
    """Top-1 accuracy of ``model`` on ``(x, y)``."""
    if len(y) == 0:
        raise ValueError("cannot compute accuracy on an empty set")
    return float((predict(model, x, batch_size) == y).float().mean())
