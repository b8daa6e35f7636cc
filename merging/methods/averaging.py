"""Weight averaging (AvgMean) and Task Arithmetic (SPEC section 1)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from merging.methods.task_vectors import merge_keys, stacked_task_vectors
from merging.types import StateDict, Tensors


def weight_average(finetuned: Sequence[Tensors]) -> StateDict:
    """``theta = mean_i theta_i`` for every backbone tensor, key by key."""
    keys = merge_keys(finetuned)
    return {k: torch.stack([m[k].float() for m in finetuned]).mean(0) for k in keys}


def task_arithmetic(pretrained: Tensors, finetuned: Sequence[Tensors], lam: float = 0.3) -> StateDict:
    """``theta = theta_0 + lam * sum_i tau_i``, key by key."""
    out: StateDict = {}
    for k in merge_keys(finetuned, pretrained):
        base, taus = stacked_task_vectors(pretrained, finetuned, k)
        out[k] = base + lam * taus.sum(0)
    return out
