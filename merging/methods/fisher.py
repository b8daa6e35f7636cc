"""Fisher merging (Matena & Raffel) with a diagonal Fisher.

The Fisher of model i is estimated on UNLABELED calibration images: the label of an
image is the model's own prediction ``argmax p(y|x)``, and
``F = mean_x (d log p(y_hat|x) / d theta)^2`` with per-example gradients
(``torch.func.vmap`` over ``grad``). Merged: ``sum_i F_i theta_i / sum_i F_i``
per element, falling back to the plain mean where every ``F_i`` is below ``floor``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from merging.methods.task_vectors import merge_keys
from merging.types import StateDict, Tensors


def estimate_fisher(
    model: nn.Module, images: torch.Tensor, keys: Sequence[str] | None = None, batch_size: int = 32
) -> StateDict:
    """Diagonal empirical Fisher of ``model``'s parameters named in ``keys`` (default: all but the head)."""
    model.eval()
    params = dict(model.named_parameters())
    if keys is None:
        head_ids = {id(p) for p in model.get_classifier().parameters()} if hasattr(model, "get_classifier") else set()  # type: ignore[operator]
        keys = [k for k, p in params.items() if id(p) not in head_ids]
    train = {k: params[k].detach() for k in keys}
    frozen = {k: v.detach() for k, v in params.items() if k not in train}
    buffers = dict(model.named_buffers())

    def log_prob(p: StateDict, x: torch.Tensor) -> torch.Tensor:
        logits = functional_call(model, ({**frozen, **p}, buffers), (x.unsqueeze(0),))
        logp = torch.log_softmax(logits, -1)[0]
        return logp.max()  # log p(y_hat | x) with y_hat = argmax

    per_example = vmap(grad(log_prob), in_dims=(None, 0))
    fisher = {k: torch.zeros_like(v, dtype=torch.float32) for k, v in train.items()}
    for i in range(0, len(images), batch_size):
        grads = per_example(train, images[i : i + batch_size])
        for k, g in grads.items():
            fisher[k] += g.pow(2).sum(0)
    return {k: v / max(1, len(images)) for k, v in fisher.items()}


def fisher_merge(finetuned: Sequence[Tensors], fishers: Sequence[Tensors], floor: float = 1e-12) -> StateDict:
    """Fisher-weighted average of every backbone tensor (plain mean where no Fisher mass)."""
    if len(fishers) != len(finetuned):
        raise ValueError(f"need one Fisher per model ({len(finetuned)}), got {len(fishers)}")
    out: StateDict = {}
    for key in merge_keys(finetuned):
        thetas = torch.stack([m[key].float() for m in finetuned])
        if all(key in f for f in fishers):
            weights = torch.stack([f[key].float() for f in fishers])
            total = weights.sum(0)
            weighted = (weights * thetas).sum(0) / total.clamp(min=floor)
            out[key] = torch.where(total > floor, weighted, thetas.mean(0))
        else:
            out[key] = thetas.mean(0)
    return out
