"""DARE: drop and rescale task vectors (a pre-processing step for TA / TIES)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import torch

from merging.methods.task_vectors import merge_keys
from merging.types import StateDict, Tensors


class DareView(Mapping[str, torch.Tensor]):
    """Lazy ``theta_0 + dare(tau)`` of one model: computed per tensor on access.

    Tensor ``key`` of model ``index`` uses a generator seeded from
    ``(seed, index, position of key)``, so results never depend on access order
    and a streaming merge over views equals one over materialised dicts.
    """

    def __init__(self, pretrained: Tensors, model: Tensors, p: float, seed: int, index: int):
        if not 0.0 <= p < 1.0:
            raise ValueError(f"p must be in [0, 1), got {p}")
        self.pretrained, self.model, self.p, self.seed, self.index = pretrained, model, p, seed, index
        self._pos = {k: j for j, k in enumerate(model.keys())}

    def __getitem__(self, key: str) -> torch.Tensor:
        base = self.pretrained[key].float()
        tau = self.model[key].float() - base
        gen = torch.Generator().manual_seed((self.seed * 1_000_003 + self.index) * 1_000_003 + self._pos[key])
        keep = torch.rand(tau.shape, generator=gen) >= self.p
        return base + tau * keep / (1.0 - self.p)

    def __iter__(self) -> Iterator[str]:
        return iter(self._pos)

    def __len__(self) -> int:
        return len(self._pos)


def dare_views(pretrained: Tensors, finetuned: Sequence[Tensors], p: float, seed: int) -> list[DareView]:
    """Lazy DARE-processed models (streaming-friendly form of :func:`dare`)."""
    merge_keys(finetuned, pretrained)
    return [DareView(pretrained, m, p, seed, i) for i, m in enumerate(finetuned)]


def dare(pretrained: Tensors, finetuned: Sequence[Tensors], p: float, seed: int) -> list[StateDict]:
    """Drop each element of every ``tau_i`` with probability ``p``, rescale survivors by ``1/(1-p)``.

    Returns new fine-tuned state dicts ``theta_0 + dare(tau_i)`` (seeded, see :class:`DareView`).
    """
    return [dict(view.items()) for view in dare_views(pretrained, finetuned, p, seed)]
