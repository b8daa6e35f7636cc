"""Which tensors of a ViT are gated (Ye et al.; SPEC section 3).

Gated (each stores N expert copies, mixed per image by the gate's ``p(x)``):

* embeddings: ``patch_embed.*``, ``cls_token``, ``reg_token``, ``pos_embed``;
* every norm: ``norm_pre``, ``blocks.*.norm1/norm2``, ``norm``, ``fc_norm``;
* a CLIP tower's visual projection (``fc_norm.proj.weight``): it sits right before each
  task's head, and fine-tuned CLIP towers each carry their own;
* the ``m`` attention blocks and the ``m`` MLP blocks with the LOWEST weight
  similarity (Eq. 4; ranked separately): all of ``blocks.b.attn.*`` with the
  block's layer scale ``ls1``, resp. ``blocks.b.mlp.*`` with ``ls2``.

Everything else is merged by a static base method (AvgMean or RegMean).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from merging.methods.similarity import rank_blocks
from merging.types import StateDict, Tensors
from model_store.architecture import PROJECTION_KEY

_EMBED_RE = re.compile(r"^(patch_embed\.|cls_token$|reg_token$|pos_embed$)")
_NORM_RE = re.compile(r"(^|\.)(norm|norm_pre|fc_norm|norm\d+)\.(weight|bias)$")


@dataclass(frozen=True)
class GatingPlan:
    """The gated tensors and the blocks chosen for gating."""

    gated_keys: tuple[str, ...]
    attn_blocks: tuple[int, ...]
    mlp_blocks: tuple[int, ...]
    similarity: dict[str, list[tuple[int, float]]]


def is_always_gated(key: str) -> bool:
    """Embeddings, norms (outside gated blocks too) and a CLIP tower's projection."""
    if key == PROJECTION_KEY or _EMBED_RE.match(key):
        return True
    return bool(_NORM_RE.search(key) and ".attn." not in key and ".mlp." not in key)


def gating_plan(finetuned: Sequence[Tensors], m: int) -> GatingPlan:
    """Choose the gated tensors for ``m`` gated attention and MLP blocks."""
    keys = list(finetuned[0].keys())
    ranked = rank_blocks(finetuned)
    depth = len(ranked["attn"])
    if not 0 <= m <= depth:
        raise ValueError(f"m must be between 0 and the depth ({depth}), got {m}")
    attn = tuple(sorted(s.block for s in ranked["attn"][:m]))
    mlp = tuple(sorted(s.block for s in ranked["mlp"][:m]))
    prefixes = [f"blocks.{b}.attn." for b in attn] + [f"blocks.{b}.ls1." for b in attn]
    prefixes += [f"blocks.{b}.mlp." for b in mlp] + [f"blocks.{b}.ls2." for b in mlp]
    gated = tuple(k for k in keys if is_always_gated(k) or any(k.startswith(p) for p in prefixes))
    sims = {kind: [(s.block, s.similarity) for s in items] for kind, items in ranked.items()}
    return GatingPlan(gated, attn, mlp, sims)


def expert_stacks(finetuned: Sequence[Tensors], keys: Sequence[str]) -> StateDict:
    """``(N, ...)`` stacks of the fine-tuned tensors named in ``keys``."""
    return {k: torch.stack([m[k].float() for m in finetuned]) for k in keys}
