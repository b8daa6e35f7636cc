"""Task Singular Vectors (Gargiulo et al., CVPR 2025; SPEC section 7): low-rank task deltas.

Every 2-D weight of the backbone (attention qkv/proj, MLP fc1/fc2) is a "matrix layer"; task
i's layer task matrix ``D_i = W_i - W_0`` has the SVD ``U_i S_i V_i^T`` (float64, one layer at a
time). Everything else (norms, biases, embeddings, the patch-embedding conv, layer scales) is a
"small tensor".

* **TSV-C** (:func:`tsv_compress`): task i keeps the top ``r = max(1, floor(f min(m, n)))``
  triplets of each ``D_i`` as factors ``B_i = U_i S_i^{1/2}`` (m x r), ``A_i = S_i^{1/2} V_i^T``
  (r x n), so ``W_0 + B_i A_i`` is its rank-r layer, plus its own small tensors ``theta_i``.
* **TSV-M** (:func:`tsv_merge`): per matrix layer ``r = floor(min(m, n) / N)``; the stacked
  ``U`` and ``V`` are orthogonalised by their polar factors; ``W = W_0 + alpha U diag(S) V^T``.
  Small tensors: ``theta_0 + alpha * mean_i tau_i``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from merging.methods.task_vectors import merge_keys, stacked_task_vectors
from merging.types import StateDict, Tensors


def is_matrix_key(key: str, tensor: torch.Tensor) -> bool:
    """A 2-D weight (a linear layer of the backbone): compressed; everything else is a small tensor."""
    return tensor.ndim == 2 and key.endswith(".weight") and min(tensor.shape) > 1


def lowrank_rank(shape: Sequence[int], f: float) -> int:
    """TSV-C's rank of an ``m x n`` layer at fraction ``f``: ``max(1, floor(f * min(m, n)))``."""
    return max(1, int(f * min(shape)))


def _svd(delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD in float64."""
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    return u, s, vh


def factorise(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``rank`` factors ``(B, A)`` of ``delta`` (float32): ``B = U S^{1/2}``, ``A = S^{1/2} V^T``."""
    u, s, vh = _svd(delta)
    root = s[:rank].sqrt()
    return (u[:, :rank] * root).float().contiguous(), (root[:, None] * vh[:rank]).float().contiguous()


@dataclass
class LowRankDeltas:
    """Per task: rank-r factors of every matrix layer and the task's own small tensors."""

    pretrained: Tensors
    factors: list[dict[str, tuple[torch.Tensor, torch.Tensor]]]  # task -> key -> (B (m x r), A (r x n))
    small: list[StateDict]  # task -> key -> theta_i[key]
    rank_fraction: float
    ranks: dict[str, int] = field(default_factory=dict)
    source: str = "tsv_c"

    @property
    def matrix_keys(self) -> list[str]:
        return list(self.ranks)

    def task_state(self, i: int) -> StateDict:
        """Task i's full backbone: ``W_0 + B_i A_i`` per matrix layer, its own small tensors."""
        out = {k: self.pretrained[k].float() + b @ a for k, (b, a) in self.factors[i].items()}
        return {**out, **{k: v.float() for k, v in self.small[i].items()}}

    def stored_numbers(self) -> int:
        """Numbers stored beyond ``theta_0``'s matrix layers: factors + small tensors of every task."""
        factors = sum(b.numel() + a.numel() for task in self.factors for b, a in task.values())
        return factors + sum(v.numel() for task in self.small for v in task.values())


def tsv_compress(pretrained: Tensors, finetuned: Sequence[Tensors], f: float) -> LowRankDeltas:
    """TSV-C at rank fraction ``f`` (0 < f <= 1), key by key (streams over lazy mappings)."""
    if not 0.0 < f <= 1.0:
        raise ValueError(f"rank fraction f must be in (0, 1], got {f}")
    keys = merge_keys(finetuned, pretrained)
    n = len(finetuned)
    factors: list[dict[str, tuple[torch.Tensor, torch.Tensor]]] = [{} for _ in range(n)]
    small: list[StateDict] = [{} for _ in range(n)]
    ranks: dict[str, int] = {}
    for key in keys:
        base = pretrained[key]
        if not is_matrix_key(key, base):
            for i, model in enumerate(finetuned):
                small[i][key] = model[key].float().clone()
            continue
        rank = ranks[key] = lowrank_rank(base.shape, f)
        for i, model in enumerate(finetuned):
            factors[i][key] = factorise(model[key].float() - base.float(), rank)
    return LowRankDeltas(pretrained, factors, small, f, ranks)


def _polar(x: torch.Tensor) -> torch.Tensor:
    """The orthogonal polar factor ``P Q^T`` of ``x = P Sigma Q^T``."""
    p, _, qh = torch.linalg.svd(x, full_matrices=False)
    return p @ qh


def tsv_merge(pretrained: Tensors, finetuned: Sequence[Tensors], alpha: float = 1.0) -> StateDict:
    """TSV-M: one static backbone (SPEC section 7), key by key in float64."""
    keys = merge_keys(finetuned, pretrained)
    n = len(finetuned)
    out: StateDict = {}
    for key in keys:
        base, taus = stacked_task_vectors(pretrained, finetuned, key)
        if not is_matrix_key(key, base):
            out[key] = base + alpha * taus.mean(0)
            continue
        rank = max(1, min(base.shape) // n)
        us, ss, vs = [], [], []
        for i in range(n):
            u, s, vh = _svd(taus[i])
            us.append(u[:, :rank])
            ss.append(s[:rank])
            vs.append(vh[:rank].T)
        u_orth, v_orth = _polar(torch.cat(us, 1)), _polar(torch.cat(vs, 1))
        delta = (u_orth * torch.cat(ss)) @ v_orth.T
        out[key] = base + alpha * delta.float()
        del taus
    return out
