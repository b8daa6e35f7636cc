"""Task Singular Vectors (Gargiulo et al., CVPR 2025; SPEC section 7): low-rank task deltas.

Every 2-D weight of the backbone (attention qkv/proj, MLP fc1/fc2) is a "matrix layer"; task
i's layer task matrix ``D_i = W_i - W_0`` has the SVD ``U_i S_i V_i^T`` (float64, one layer at a
time). Everything else (norms, biases, embeddings, the patch-embedding conv, layer scales) is a
"small tensor".

* **TSV-C** (:func:`tsv_compress`): task i keeps the top ``r = max(1, floor(f min(m, n)))``
  triplets of each ``D_i`` as factors ``B_i = U_i S_i^{1/2}`` (m x r), ``A_i = S_i^{1/2} V_i^T``
  (r x n), so ``W_0 + B_i A_i`` is its rank-r layer, plus its own small tensors ``theta_i``.
* **Exact low-rank deltas** (:func:`exact_lowrank`, the ``lora`` source): each layer keeps the
  numerical rank of its task matrices (the largest over tasks; singular values below float32's
  resolution of ``W_i`` dropped), so ``W_0 + B_i A_i`` IS task i's layer to float32 precision.
  Made for zoos fine-tuned with LoRA (an adapter of rank r on q and v gives the fused ``qkv`` a
  rank-2r delta); a layer whose task matrix is not low-rank is refused, naming it.
* **TSV-M** (:func:`tsv_merge`): per matrix layer ``r = floor(min(m, n) / N)``; the stacked
  ``U`` and ``V`` are orthogonalised by their polar factors; ``W = W_0 + alpha U diag(S) V^T``.
  Small tensors: ``theta_0 + alpha * mean_i tau_i``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import torch

from merging.methods.task_vectors import merge_keys, stacked_task_vectors
from merging.types import StateDict, Tensors
from model_store.quantize import Bits, fake_quantize


def is_matrix_key(key: str, tensor: torch.Tensor) -> bool:
    """A 2-D weight (a linear layer of the backbone): compressed; everything else is a small tensor."""
    return tensor.ndim == 2 and key.endswith(".weight") and min(tensor.shape) > 1


def is_conv_key(key: str, tensor: torch.Tensor) -> bool:
    """A 4-D conv weight (the patch embedding): compressed as an ``out x (in k k)`` matrix with ``conv=True``."""
    return tensor.ndim == 4 and key.endswith(".weight") and min(tensor.shape[0], tensor[0].numel()) > 1


def lowrank_rank(shape: Sequence[int], f: float) -> int:
    """TSV-C's rank of an ``m x n`` layer at fraction ``f``: ``max(1, floor(f * min(m, n)))``."""
    return max(1, int(f * min(shape)))


def _svd(delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD in float64."""
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    return u, s, vh


def factorise(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``rank`` factors ``(B, A)`` of ``delta`` (float32): ``B = U S^{1/2}``, ``A = S^{1/2} V^T``."""
    return _factors(*_svd(delta), rank)


def _factors(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    root = s[:rank].sqrt()
    return (u[:, :rank] * root).float().contiguous(), (root[:, None] * vh[:rank]).float().contiguous()


@dataclass
class LowRankDeltas:
    """Per task: rank-r factors of every matrix layer and the task's own small tensors."""

    pretrained: Tensors
    factors: list[dict[str, tuple[torch.Tensor, torch.Tensor]]]  # task -> key -> (B (m x r), A (r x n))
    small: list[StateDict]  # task -> key -> theta_i[key]
    rank_fraction: float | None  # TSV-C's f; None: ranks chosen per layer (exact low-rank deltas)
    ranks: dict[str, int] = field(default_factory=dict)
    source: str = "tsv_c"
    bits: Bits = 32  # how the bundle stores the factors (SPEC section 9); ``factors`` stay float32 here

    @property
    def matrix_keys(self) -> list[str]:
        return list(self.ranks)

    def task_state(self, i: int) -> StateDict:
        """Task i's full backbone as served: ``W_0 + B_i A_i`` per matrix layer (the factors as they read back
        after quantization at ``bits``), its own small tensors."""
        out = {
            k: self.pretrained[k].float()
            + (fake_quantize(b, self.bits) @ fake_quantize(a, self.bits)).reshape(self.pretrained[k].shape)
            for k, (b, a) in self.factors[i].items()
        }
        return {**out, **{k: v.float() for k, v in self.small[i].items()}}

    def truncated(self, f: float) -> LowRankDeltas:
        """TSV-C at a smaller rank fraction ``f``, from these factors (``B = U S^{1/2}`` and ``A = S^{1/2} V^T``
        keep their leading columns / rows): the same numbers :func:`tsv_compress` at ``f`` gives, no SVD."""
        if self.rank_fraction is None or not 0.0 < f <= self.rank_fraction:
            raise ValueError(f"can truncate TSV-C factors at f={self.rank_fraction} only to 0 < f <= it, got {f}")
        ranks = {}
        for k in self.ranks:
            b, a = self.factors[0][k]
            ranks[k] = lowrank_rank((b.shape[0], a.shape[1]), f)
        factors = [
            {k: (b[:, : ranks[k]].contiguous(), a[: ranks[k]].contiguous()) for k, (b, a) in task.items()}
            for task in self.factors
        ]
        return replace(self, factors=factors, rank_fraction=f, ranks=ranks)

    def stored_numbers(self) -> int:
        """Numbers stored beyond ``theta_0``'s matrix layers: factors + small tensors of every task."""
        factors = sum(b.numel() + a.numel() for task in self.factors for b, a in task.values())
        return factors + sum(v.numel() for task in self.small for v in task.values())


Factors = tuple[torch.Tensor, torch.Tensor]


def _lowrank_deltas(
    pretrained: Tensors,
    finetuned: Sequence[Tensors],
    compress: Callable[[str, torch.Tensor], bool],
    layer: Callable[[str, torch.Tensor, list[torch.Tensor]], tuple[int, list[Factors]]],
) -> tuple[list[dict[str, Factors]], list[StateDict], dict[str, int]]:
    """Key by key: ``layer(key, W_0, task matrices as m x n)`` -> (rank, each task's factors) where ``compress``,
    else every task's own copy (a small tensor)."""
    n = len(finetuned)
    factors: list[dict[str, Factors]] = [{} for _ in range(n)]
    small: list[StateDict] = [{} for _ in range(n)]
    ranks: dict[str, int] = {}
    for key in merge_keys(finetuned, pretrained):
        base = pretrained[key]
        if not compress(key, base):
            for i, model in enumerate(finetuned):
                small[i][key] = model[key].float().clone()
            continue
        deltas = [(model[key].float() - base.float()).reshape(base.shape[0], -1) for model in finetuned]
        ranks[key], per_task = layer(key, base, deltas)
        for i, pair in enumerate(per_task):
            factors[i][key] = pair
    return factors, small, ranks


def tsv_compress(pretrained: Tensors, finetuned: Sequence[Tensors], f: float, conv: bool = False) -> LowRankDeltas:
    """TSV-C at rank fraction ``f`` (0 < f <= 1), key by key (streams over lazy mappings).

    ``conv``: the patch-embedding conv is compressed too, as an ``out x (in k k)`` matrix (SPEC section 7
    keeps it a small tensor: the default); its factors are served as per-task conv weights.
    """
    if not 0.0 < f <= 1.0:
        raise ValueError(f"rank fraction f must be in (0, 1], got {f}")

    def layer(key: str, base: torch.Tensor, deltas: list[torch.Tensor]) -> tuple[int, list[Factors]]:
        rank = lowrank_rank(deltas[0].shape, f)
        return rank, [factorise(d, rank) for d in deltas]

    compress = lambda k, t: is_matrix_key(k, t) or (conv and is_conv_key(k, t))  # noqa: E731
    factors, small, ranks = _lowrank_deltas(pretrained, finetuned, compress, layer)
    return LowRankDeltas(pretrained, factors, small, f, ranks)


def numerical_rank(s: torch.Tensor, weight_norm: float, shape: Sequence[int]) -> int:
    """Singular values of a task matrix above float32's resolution of its layer (``max(m, n) eps ||W||_2``)."""
    tol = max(shape) * torch.finfo(torch.float32).eps * weight_norm
    return int((s > tol).sum())


def exact_lowrank(
    pretrained: Tensors, finetuned: Sequence[Tensors], max_fraction: float = 0.5, names: Sequence[str] | None = None
) -> LowRankDeltas:
    """Low-rank deltas at each layer's own numerical rank (the largest over tasks; at least 1): exact to float32.

    Raises ``ValueError`` naming the first layer whose rank exceeds ``max_fraction * min(m, n)``
    (a fully fine-tuned layer, not a low-rank one: use TSV-C there).
    """

    def layer(key: str, base: torch.Tensor, deltas: list[torch.Tensor]) -> tuple[int, list[Factors]]:
        svds = [_svd(d) for d in deltas]
        norms = [float(torch.linalg.matrix_norm(base.double() + d.double(), 2)) for d in deltas]
        found = [numerical_rank(s, w, base.shape) for (_, s, _), w in zip(svds, norms, strict=True)]
        rank = max(1, *found)
        if rank > max_fraction * min(base.shape):
            worst = max(range(len(found)), key=lambda i: found[i])
            who = names[worst] if names is not None else str(worst)
            raise ValueError(
                f"task '{who}': '{key}' has rank {found[worst]} of {min(base.shape)}: not a low-rank (LoRA) delta; "
                "use tsv_c / tsv_routed (truncated SVD) for fully fine-tuned models"
            )
        return rank, [_factors(*svd, rank) for svd in svds]

    factors, small, ranks = _lowrank_deltas(pretrained, finetuned, is_matrix_key, layer)
    return LowRankDeltas(pretrained, factors, small, None, ranks, source="lora")


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
