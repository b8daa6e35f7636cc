"""Weight similarity of layer groups (Ye et al. Eq. 4) and block ranking."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from merging.types import Tensors

ATTN_KEYS = ("attn.qkv.weight", "attn.proj.weight")
MLP_KEYS = ("mlp.fc1.weight", "mlp.fc2.weight")
_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.")


def layer_similarity(finetuned: Sequence[Tensors], keys: Sequence[str]) -> float:
    """``sum_{i<j} cos(vec(W_i), vec(W_j))``, each vector concatenating the named tensors."""
    if len(finetuned) < 2:
        raise ValueError("similarity needs at least two models")
    vecs = [torch.cat([m[k].float().flatten() for k in keys]) for m in finetuned]
    total = 0.0
    for i in range(len(vecs)):
        for j in range(i + 1, len(vecs)):
            total += float(torch.nn.functional.cosine_similarity(vecs[i], vecs[j], dim=0))
    return total


@dataclass(frozen=True)
class BlockSimilarity:
    block: int
    kind: str  # "attn" | "mlp"
    similarity: float


def block_indices(keys: Sequence[str]) -> list[int]:
    """Transformer block indices present in ``keys`` (``blocks.<i>.``)."""
    return sorted({int(m.group(1)) for k in keys if (m := _BLOCK_RE.match(k))})


def rank_blocks(finetuned: Sequence[Tensors]) -> dict[str, list[BlockSimilarity]]:
    """Attention blocks and MLP blocks, each ordered from LOWEST to highest similarity.

    Attention uses qkv+proj weights concatenated ("concat-layers"), MLP uses fc1+fc2
    ("combined MLP"); the two kinds are ranked separately.
    """
    blocks = block_indices(list(finetuned[0].keys()))
    out: dict[str, list[BlockSimilarity]] = {}
    for kind, suffixes in (("attn", ATTN_KEYS), ("mlp", MLP_KEYS)):
        sims = [
            BlockSimilarity(b, kind, layer_similarity(finetuned, [f"blocks.{b}.{s}" for s in suffixes])) for b in blocks
        ]
        out[kind] = sorted(sims, key=lambda s: (s.similarity, s.block))
    return out
