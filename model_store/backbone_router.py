"""The backbone router's network (SPEC section 8), shared by the merge (training) and the runtime (serving).

``theta_0``'s patch embedding and blocks ``1..k`` run on an image; the tokens after block ``k`` are
pooled into ``z(x) = [LN(cls), LN(mean of the patch tokens)]`` (each half a LayerNorm without affine
parameters, eps 1e-6: :func:`pool_tokens`); a small head gives ``p(x) = softmax(h(z(x)))`` per image --
linear, or one hidden layer (``Linear -> GELU -> Linear``, width <= 256).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import cast

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from model_store.architecture import build_model
from model_store.schema import Architecture

#: LayerNorm eps of the pooled features
POOL_EPS = 1e-6
#: top-level tensors of a timm ViT that run before its first block (the embeddings)
EMBEDDING_ROOTS = ("patch_embed", "cls_token", "reg_token", "pos_embed", "norm_pre")


def is_prefix_key(key: str, k: int) -> bool:
    """Whether tensor ``key`` of a timm ViT belongs to the patch embedding / embeddings or blocks ``1..k``."""
    parts = key.split(".")
    if parts[0] == "blocks":
        return int(parts[1]) < k
    return parts[0] in EMBEDDING_ROOTS


def prefix_keys(keys: Sequence[str], k: int) -> list[str]:
    """The keys among ``keys`` that the prefix up to block ``k`` needs (see :func:`is_prefix_key`)."""
    return [key for key in keys if is_prefix_key(key, k)]


def pool_tokens(tokens: torch.Tensor, num_prefix_tokens: int = 1) -> torch.Tensor:
    """``(B, T, D)`` tokens -> ``z`` ``(B, 2D)``: the LayerNorm'd CLS token and mean of the patch tokens."""
    d = tokens.shape[-1]
    cls = F.layer_norm(tokens[:, 0], (d,), eps=POOL_EPS)
    patches = F.layer_norm(tokens[:, num_prefix_tokens:].mean(1), (d,), eps=POOL_EPS)
    return torch.cat([cls, patches], -1)


def embed(vit: VisionTransformer, x: torch.Tensor) -> torch.Tensor:
    """A timm ViT's tokens before its first block (patch embedding, class token, positions, ``norm_pre``)."""
    x = vit.patch_embed(x)
    x = vit._pos_embed(x)
    x = vit.patch_drop(x)
    return vit.norm_pre(x)


@torch.inference_mode()
def pooled_features(
    vit: VisionTransformer, x: torch.Tensor, ks: Sequence[int], batch_size: int = 256
) -> dict[int, torch.Tensor]:
    """``z(x)`` after each block ``k`` in ``ks`` from ONE pass of ``vit`` (eval mode) over ``x``."""
    vit.eval()
    out: dict[int, list[torch.Tensor]] = {k: [] for k in ks}
    last = max(ks)
    for start in range(0, len(x), batch_size):
        tokens = embed(vit, x[start : start + batch_size])
        for i in range(last):
            tokens = vit.blocks[i](tokens)
            if i + 1 in out:
                out[i + 1].append(pool_tokens(tokens, vit.num_prefix_tokens))
    width = 2 * int(vit.embed_dim)
    return {k: torch.cat(v) if v else torch.empty(0, width) for k, v in out.items()}


class RouterHead(nn.Module):
    """``h``: linear (``hidden = 0``) or ``Linear -> GELU -> Linear`` from ``z`` to one logit per task."""

    def __init__(self, in_dim: int, num_tasks: int, hidden: int = 0):
        super().__init__()
        self.hidden = hidden
        self.net: nn.Module = (
            nn.Linear(in_dim, num_tasks)
            if hidden == 0
            else nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, num_tasks))
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)

    @classmethod
    def from_state(cls, state: Mapping[str, torch.Tensor]) -> RouterHead:
        """The head whose weights are ``state`` (its :meth:`state_dict` keys); the width is read from the shapes."""
        if "net.weight" in state:
            w = state["net.weight"]
            head = cls(w.shape[1], w.shape[0])
        else:
            first, last = state["net.0.weight"], state["net.2.weight"]
            head = cls(first.shape[1], last.shape[0], first.shape[0])
        head.load_state_dict(dict(state), strict=True)
        return head.eval().requires_grad_(False)


class ViTPrefix(nn.Module):
    """A timm ViT cut after block ``k``: its embeddings and blocks ``1..k`` with the given (``theta_0``'s) tensors.

    The parameters ARE the given tensors (assigned, not copied), so a prefix can share its weights
    with another module holding them.
    """

    def __init__(self, architecture: Architecture, k: int, tensors: Mapping[str, torch.Tensor]):
        super().__init__()
        with torch.device("meta"):
            vit = cast(VisionTransformer, build_model(architecture, 0))
        depth = len(vit.blocks)
        if not 1 <= k <= depth:
            raise ValueError(f"router k={k}: the backbone has {depth} blocks (1 <= k <= {depth})")
        vit.blocks = vit.blocks[:k]
        for name in ("norm", "fc_norm", "head", "attn_pool"):
            if isinstance(getattr(vit, name, None), nn.Module):
                setattr(vit, name, nn.Identity())
        missing = [key for key in vit.state_dict() if key not in tensors]
        if missing:
            raise ValueError(f"the router's prefix lacks theta_0 tensors {missing[:3]}")
        vit.load_state_dict({key: tensors[key] for key in vit.state_dict()}, strict=True, assign=True)
        self.vit = vit.eval().requires_grad_(False)
        self.k = k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens ``(B, T, D)`` after block ``k``."""
        return self.vit.blocks(embed(self.vit, x))


class BackboneRouter(nn.Module):
    """``x -> h(z(x))``: task logits per image (the prefix, the pooling, the head)."""

    def __init__(self, prefix: ViTPrefix, head: RouterHead):
        super().__init__()
        self.prefix, self.head = prefix, head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(pool_tokens(self.prefix(x), self.prefix.vit.num_prefix_tokens))
