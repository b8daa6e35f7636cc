"""EMR-Merging: Elect, Mask & Rescale (SPEC section 2).

Tuning-free and data-free. For every element:

1. ``gamma = sign(sum_i tau_i)``; an element whose sum is exactly 0 gets ``-1``
   (the reference code's choice);
2. ``eps = max |tau_i|`` over the models whose ``sign(tau_i) == gamma`` (0 if none);
3. ``tau_uni = gamma * eps``;
4. ``M_i = (tau_i * tau_uni > 0)`` (strict: zeros are masked out);
5. ``lam_i = sum|tau_i| / sum|M_i * tau_uni|`` with both sums over the WHOLE
   backbone (accumulated per tensor in fp64); ``lam_i = 1`` when the mask is empty.

Task i at inference: ``theta_0 + lam_i * M_i * tau_uni``. Masks are kept bit-packed
(1 bit per element, ``numpy.packbits`` order) from the moment they are computed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from merging.methods.task_vectors import merge_keys, stacked_task_vectors
from merging.types import StateDict, Tensors
from model_store.bitpack import pack_mask, unpack_mask


@dataclass
class EMRMerged:
    """Unified task vector + per-task packed masks and rescalers."""

    pretrained: Tensors
    tau_unified: StateDict
    packed_masks: list[StateDict]
    rescalers: list[float]
    stats: dict[str, list[float]] = field(default_factory=dict)

    @property
    def num_tasks(self) -> int:
        return len(self.rescalers)

    @property
    def masks(self) -> list[dict[str, torch.Tensor]]:
        """Unpacked boolean masks (materialised on access)."""
        return [self.mask(i) for i in range(self.num_tasks)]

    def mask(self, i: int) -> dict[str, torch.Tensor]:
        return {k: unpack_mask(p, self.tau_unified[k].shape) for k, p in self.packed_masks[i].items()}

    def task_state(self, i: int) -> StateDict:
        """``theta_0 + lam_i * M_i * tau_uni`` for every merged tensor."""
        lam = self.rescalers[i]
        out: StateDict = {}
        for k, tau in self.tau_unified.items():
            m = unpack_mask(self.packed_masks[i][k], tau.shape)
            out[k] = self.pretrained[k].float() + lam * (m * tau)
        return out


def emr_elect(taus: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unified task vector and boolean masks of stacked task vectors ``(N, ...)``.

    ``M_i = (tau_i * tau_uni > 0)`` equals "``tau_i`` is non-zero with the elected
    sign": such an element makes ``eps >= |tau_i| > 0``, so ``tau_uni`` has that
    sign too; every other element gives a product <= 0.
    """
    uni, masks, _ = _elect_inplace(taus.clone())
    return uni, masks


def _elect_inplace(taus: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Like :func:`emr_elect` but overwrites ``taus``; also returns ``sum|tau_i|`` (fp64)."""
    n = taus.shape[0]
    gamma = torch.sign(taus.sum(0))
    gamma[gamma == 0] = -1.0
    agree = taus * gamma > 0
    mags = taus.abs_()
    abs_sums = mags.reshape(n, -1).sum(1, dtype=torch.float64)
    eps = mags.mul_(agree).amax(0)
    return gamma.mul_(eps), agree, abs_sums


def emr_merge(pretrained: Tensors, finetuned: Sequence[Tensors]) -> EMRMerged:
    """EMR-merge, key by key (streaming over lazy mappings)."""
    keys = merge_keys(finetuned, pretrained)
    n = len(finetuned)
    tau_unified: StateDict = {}
    packed: list[StateDict] = [{} for _ in range(n)]
    abs_tau = torch.zeros(n, dtype=torch.float64)
    abs_masked = torch.zeros(n, dtype=torch.float64)
    for key in keys:
        _, taus = stacked_task_vectors(pretrained, finetuned, key)
        uni, masks, abs_sums = _elect_inplace(taus)
        del taus
        tau_unified[key] = uni
        abs_tau += abs_sums
        # per tensor in fp32, accumulated in fp64
        abs_masked += torch.mv(masks.reshape(n, -1).float(), uni.reshape(-1).abs()).double()
        for i in range(n):
            packed[i][key] = pack_mask(masks[i])
        del masks
    rescalers = [float(a / b) if b > 0 else 1.0 for a, b in zip(abs_tau.tolist(), abs_masked.tolist())]
    stats = {"sum_abs_tau": abs_tau.tolist(), "sum_abs_masked_unified": abs_masked.tolist()}
    return EMRMerged(pretrained, tau_unified, packed, rescalers, stats)
