"""TIES-Merging: trim, elect sign, disjoint mean (SPEC section 1).

Trimming keeps the top ``k`` fraction of ``|tau_i|`` over the WHOLE flattened backbone
of model i. The threshold is found exactly without concatenating the backbone: a
histogram pass locates the bin holding the k-th largest magnitude, a second pass
collects only that bin's values. Elements equal to the threshold are kept, so ties
can keep a few more than ``k``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from merging.methods.task_vectors import merge_keys
from merging.types import StateDict, Tensors

_BINS = 4096


def topk_magnitude_threshold(pretrained: Tensors, model: Tensors, keys: Sequence[str], k: float) -> float:
    """Smallest ``|tau|`` that is among the top ``k`` fraction of model's task vector."""
    if not 0.0 < k <= 1.0:
        raise ValueError(f"k must be in (0, 1], got {k}")
    total = sum(pretrained[key].numel() for key in keys)
    keep = max(1, int(round(k * total)))
    top = max(float((model[key].float() - pretrained[key].float()).abs().max()) for key in keys)
    if top == 0.0:
        return 0.0
    scale = _BINS / top

    def magnitudes_and_bins(key: str) -> tuple[torch.Tensor, torch.Tensor]:
        mag = (model[key].float() - pretrained[key].float()).abs().flatten()
        return mag, (mag * scale).long().clamp_(max=_BINS - 1)

    counts = torch.zeros(_BINS, dtype=torch.int64)
    for key in keys:
        counts += torch.bincount(magnitudes_and_bins(key)[1], minlength=_BINS)
    above = counts.flip(0).cumsum(0).flip(0)  # elements in bins >= b
    b = int((above >= keep).nonzero().max())  # highest bin whose tail reaches `keep`
    need = keep - (int(above[b + 1]) if b + 1 < _BINS else 0)
    inside = []
    for key in keys:
        mag, bins = magnitudes_and_bins(key)
        inside.append(mag[bins == b])
    return float(torch.cat(inside).topk(need).values[-1])


def ties_merge(pretrained: Tensors, finetuned: Sequence[Tensors], k: float = 0.2, lam: float = 1.0) -> StateDict:
    """``theta_0 + lam * disjoint_mean(elect(trim_k(tau_i)))``."""
    keys = merge_keys(finetuned, pretrained)
    thresholds = [topk_magnitude_threshold(pretrained, m, keys, k) for m in finetuned]
    out: StateDict = {}
    for key in keys:
        base = pretrained[key].float()
        taus = torch.stack([m[key].float() - base for m in finetuned])
        thr = torch.tensor(thresholds, dtype=torch.float32).view(-1, *([1] * base.ndim))
        trimmed = torch.where(taus.abs() >= thr, taus, torch.zeros(()))
        out[key] = base + lam * disjoint_mean(trimmed)
    return out


def disjoint_mean(trimmed: torch.Tensor) -> torch.Tensor:
    """Elect ``gamma = sign(sum_i tau_i)``; mean of the entries agreeing with it (0 if none)."""
    gamma = torch.sign(trimmed.sum(0))
    agree = (torch.sign(trimmed) == gamma) & (trimmed != 0)
    count = agree.sum(0)
    total = (trimmed * agree).sum(0)
    return torch.where(count > 0, total / count.clamp(min=1), torch.zeros(()))
