"""Permutation symmetries of a timm ViT state dict (SPEC section 5, MuDSC).

A ViT computes the same function after any of these re-orderings of its units:

* the **residual stream** (``D`` channels): one permutation shared by every tensor
  that reads or writes the stream (patch embedding, cls/pos tokens, every norm,
  qkv inputs, attention/MLP outputs, the final norm and the classifier's input);
  LayerNorm commutes with it because its mean and variance ignore channel order;
* per block, the **attention heads** with a permutation inside each head: q and k
  share one head-internal permutation (``q . k`` is unchanged), v has its own
  (the projection's input columns follow it), and both use the same head order;
* per block, the **MLP hidden units** (fc1 rows / fc2 columns).

Permutations use the *gather* convention: after applying ``p`` to a group, unit
``j`` of the permuted model is unit ``p[j]`` of the original. A group's units are
described once (:func:`unit_slots`) and that description drives both applying
permutations and extracting each unit's weights (MuDSC's weight-space
representation).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from merging.types import StateDict, Tensors

#: (key, axis, start, length): the units of a group are ``tensor.narrow(axis, start, length)``.
Slot = tuple[str, int, int, int]


@dataclass(frozen=True)
class ViTShape:
    """The sizes that define a plain timm ViT's permutation groups."""

    dim: int
    depth: int
    heads: int
    hidden: int

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads

    @classmethod
    def from_state(cls, state: Tensors, heads: int) -> ViTShape:
        """Sizes read from a backbone state dict (the head count is not stored in it)."""
        blocks = {int(m.group(1)) for k in state for m in [re.match(r"blocks\.(\d+)\.", k)] if m}
        dim = state["blocks.0.norm1.weight"].shape[0]
        if dim % heads:
            raise ValueError(f"embed dim {dim} is not divisible by {heads} heads")
        return cls(dim=dim, depth=len(blocks), heads=heads, hidden=state["blocks.0.mlp.fc1.weight"].shape[0])

    def groups(self) -> list[str]:
        """Permutation groups: ``residual`` then, per block, ``attn.<b>`` and ``mlp.<b>``."""
        return ["residual"] + [f"{kind}.{b}" for b in range(self.depth) for kind in ("attn", "mlp")]


_RESIDUAL_BLOCK = (
    ("norm1.weight", 0),
    ("norm1.bias", 0),
    ("attn.qkv.weight", 1),
    ("attn.proj.weight", 0),
    ("attn.proj.bias", 0),
    ("norm2.weight", 0),
    ("norm2.bias", 0),
    ("mlp.fc1.weight", 1),
    ("mlp.fc2.weight", 0),
    ("mlp.fc2.bias", 0),
    ("ls1.gamma", 0),
    ("ls2.gamma", 0),
)
_RESIDUAL_TOP = (
    ("cls_token", 2),
    ("reg_token", 2),
    ("pos_embed", 2),
    ("patch_embed.proj.weight", 0),
    ("patch_embed.proj.bias", 0),
    ("norm.weight", 0),
    ("norm.bias", 0),
    ("fc_norm.weight", 0),
    ("fc_norm.bias", 0),
    ("head.weight", 1),
)


def unit_slots(shape: ViTShape, group: str, keys: set[str] | None = None) -> dict[str, list[Slot]]:
    """Where a group's units live, by role (``in``: tensors producing the unit, ``out``: consuming it).

    ``attn.<b>`` has two unit sets, ``qk`` (q and k rows) and ``v`` (v rows + proj
    columns), returned under roles ``qk.in``, ``v.in`` and ``v.out``.
    """
    d = shape.dim

    def present(slots: list[Slot]) -> list[Slot]:
        return [s for s in slots if keys is None or s[0] in keys]

    if group == "residual":
        top = [(k, ax, 0, d) for k, ax in _RESIDUAL_TOP]
        blocks = [(f"blocks.{b}.{k}", ax, 0, d) for b in range(shape.depth) for k, ax in _RESIDUAL_BLOCK]
        return {"all": present(top + blocks)}
    kind, b = group.split(".")
    p = f"blocks.{b}."
    if kind == "mlp":
        return {
            "in": present([(p + "mlp.fc1.weight", 0, 0, shape.hidden), (p + "mlp.fc1.bias", 0, 0, shape.hidden)]),
            "out": present([(p + "mlp.fc2.weight", 1, 0, shape.hidden)]),
        }
    if kind == "attn":
        qkv = [p + "attn.qkv.weight", p + "attn.qkv.bias"]
        return {
            "qk.in": present([(k, 0, 0, d) for k in qkv] + [(k, 0, d, d) for k in qkv]),
            "v.in": present([(k, 0, 2 * d, d) for k in qkv]),
            "v.out": present([(p + "attn.proj.weight", 1, 0, d)]),
        }
    raise ValueError(f"unknown permutation group '{group}'")


@dataclass
class ViTPerm:
    """One model's permutations: the residual stream, per block heads+units and MLP units.

    ``qk[b]`` and ``v[b]`` are full index vectors over the block's ``D`` attention
    channels that respect head groups (see :func:`head_structured`).
    """

    residual: torch.Tensor
    qk: list[torch.Tensor] = field(default_factory=list)
    v: list[torch.Tensor] = field(default_factory=list)
    mlp: list[torch.Tensor] = field(default_factory=list)

    @classmethod
    def identity(cls, shape: ViTShape) -> ViTPerm:
        ar = torch.arange
        return cls(
            ar(shape.dim),
            [ar(shape.dim) for _ in range(shape.depth)],
            [ar(shape.dim) for _ in range(shape.depth)],
            [ar(shape.hidden) for _ in range(shape.depth)],
        )

    def copy(self) -> ViTPerm:
        return ViTPerm(
            self.residual.clone(),
            [p.clone() for p in self.qk],
            [p.clone() for p in self.v],
            [p.clone() for p in self.mlp],
        )

    def get(self, group: str) -> tuple[torch.Tensor, ...]:
        if group == "residual":
            return (self.residual,)
        kind, b = group.split(".")
        return (self.qk[int(b)], self.v[int(b)]) if kind == "attn" else (self.mlp[int(b)],)

    def set(self, group: str, *perms: torch.Tensor) -> None:
        if group == "residual":
            (self.residual,) = perms
            return
        kind, b = group.split(".")
        if kind == "attn":
            self.qk[int(b)], self.v[int(b)] = perms
        else:
            (self.mlp[int(b)],) = perms

    def without(self, group: str, shape: ViTShape) -> ViTPerm:
        """A copy with ``group`` reset to the identity."""
        out = self.copy()
        ident = ViTPerm.identity(shape)
        out.set(group, *ident.get(group))
        return out

    def equals(self, other: ViTPerm) -> bool:
        pairs = [
            (self.residual, other.residual),
            *zip(self.qk, other.qk),
            *zip(self.v, other.v),
            *zip(self.mlp, other.mlp),
        ]
        return all(torch.equal(a, b) for a, b in pairs)


def head_structured(head_order: torch.Tensor, inner: torch.Tensor) -> torch.Tensor:
    """Full channel index from a head order ``(H,)`` and per-head inner permutations ``(H, hd)``.

    Channel ``h * hd + j`` of the result is channel ``head_order[h] * hd + inner[h, j]``.
    """
    hd = inner.shape[1]
    return (head_order[:, None] * hd + inner).reshape(-1)


def _gather(t: torch.Tensor, axis: int, start: int, length: int, perm: torch.Tensor) -> torch.Tensor:
    idx = torch.arange(t.shape[axis])
    idx[start : start + length] = start + perm
    return t.index_select(axis, idx)


def apply_perm(state: Tensors, perm: ViTPerm, shape: ViTShape) -> StateDict:
    """The state dict with every permutation of ``perm`` applied (a classifier ``head.*`` too)."""
    out = {k: v for k, v in state.items()}
    keys = set(out)
    for group in shape.groups():
        slots = unit_slots(shape, group, keys)
        perms = perm.get(group)
        if group == "residual" or group.startswith("mlp"):
            roles = {role: perms[0] for role in slots}
        else:
            roles = {"qk.in": perms[0], "v.in": perms[1], "v.out": perms[1]}
        for role, role_slots in slots.items():
            for key, axis, start, length in role_slots:
                out[key] = _gather(out[key], axis, start, length, roles[role])
    _check_known(keys, shape)
    return out


def _check_known(keys: set[str], shape: ViTShape) -> None:
    """Refuse tensors the permutation machinery does not know (they would silently break)."""
    known = {s[0] for g in shape.groups() for slots in unit_slots(shape, g).values() for s in slots}
    known |= {"head.bias"}
    unknown = sorted(k for k in keys if k not in known)
    if unknown:
        raise ValueError(f"permutation of a ViT with unsupported tensors {unknown[:5]} (plain timm ViTs only)")


def unit_weights(state: Tensors, shape: ViTShape, group: str) -> dict[str, torch.Tensor]:
    """Each unit's weights as one row (MuDSC Eq. 6): incoming ``||`` outgoing weights.

    Returns ``{"residual": (D, F)}``, ``{"mlp": (hidden, F)}`` or ``{"qk": (D, F), "v": (D, F)}``
    (rows in the units' current order). The classifier head is left out: heads of
    different tasks are not comparable.
    """
    keys = {k for k in state if not k.startswith("head.")}
    slots = unit_slots(shape, group, keys)

    def rows(role_slots: list[Slot]) -> list[torch.Tensor]:
        return [state[k].narrow(ax, s, n).movedim(ax, 0).reshape(n, -1).float() for k, ax, s, n in role_slots]

    if group == "residual":
        return {"residual": torch.cat(rows(slots["all"]), 1)}
    if group.startswith("mlp"):
        return {"mlp": torch.cat(rows(slots["in"]) + rows(slots["out"]), 1)}
    return {"qk": torch.cat(rows(slots["qk.in"]), 1), "v": torch.cat(rows(slots["v.in"]) + rows(slots["v.out"]), 1)}


def random_perm(shape: ViTShape, generator: torch.Generator) -> ViTPerm:
    """A random valid permutation of every group (for tests)."""

    def rp(n: int) -> torch.Tensor:
        return torch.randperm(n, generator=generator)

    def heads() -> tuple[torch.Tensor, torch.Tensor]:
        order = rp(shape.heads)
        qk = head_structured(order, torch.stack([rp(shape.head_dim) for _ in range(shape.heads)]))
        v = head_structured(order, torch.stack([rp(shape.head_dim) for _ in range(shape.heads)]))
        return qk, v

    attn = [heads() for _ in range(shape.depth)]
    return ViTPerm(
        rp(shape.dim), [a[0] for a in attn], [a[1] for a in attn], [rp(shape.hidden) for _ in range(shape.depth)]
    )


def invert(p: torch.Tensor) -> torch.Tensor:
    """The inverse permutation index."""
    inv = torch.empty_like(p)
    inv[p] = torch.arange(len(p))
    return inv


def permute_head(head: Mapping[str, torch.Tensor], residual: torch.Tensor) -> StateDict:
    """A classifier ``{"weight", "bias"}`` whose input follows a residual permutation."""
    return {k: (v[:, residual] if k.endswith("weight") else v) for k, v in head.items()}
