"""Per-image gated execution of a timm ViT (SPEC section 3; Ye et al.).

Every gated tensor keeps its N expert copies; image b runs with
``W(x_b) = sum_i p_i(x_b) W_i``. ``p`` is per image -- a batch mixing tasks gives
every image the output it gets alone (the reference code averages ``p`` over the
batch; we never do).

Module replacement keeps timm's block code: gated ``nn.Linear`` / ``nn.LayerNorm`` /
``LayerScale`` / patch-embedding ``Conv2d`` modules are swapped for the layers of
:mod:`server.runtime.layers.gated` (and :mod:`~server.runtime.layers.lowrank` for a ``lowrank``
bundle's matrix layers), which read the current :class:`~server.runtime.layers.routing.Routing`;
``cls_token`` and ``pos_embed`` are mixed in :meth:`GatedViT.forward_features`.

Mixing modes (one interface, :meth:`GatedViT.classify`; the engine's ``mixing`` option):

* ``exact``  -- one pass over the batch with per-image mixing. Linear layers mix
  weights per image into one reused scratch buffer and use a batched matmul
  (``linear_mode="mix"``, the default: fewer FLOPs), or run every expert and mix
  outputs (``linear_mode="experts"``); both are exact. The patch embedding mixes its
  weights per image too (a per-patch linear map).
* ``sparse`` -- drop experts with ``p_i < threshold`` (never the argmax), renormalise, sort
  the batch by remaining expert set and run one pass: ungated layers see the whole
  batch, each gated linear layer runs once per group (a plain dense layer with that
  expert's weights for a one-expert group, exact mixing otherwise).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, cast

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from model_store.architecture import build_model
from server.runtime.bundle_reader import BundleReader
from server.runtime.groups import task_groups
from server.runtime.layers.gated import GatedConv2d, GatedLayerNorm, GatedLayerScale, GatedLinear, LinearMode
from server.runtime.layers.lowrank import LowRankLinear
from server.runtime.layers.routing import Group, Routing, Slot

#: How a gated bundle mixes its experts per image (see the module docstring).
Mixing = Literal["exact", "sparse"]
#: Measured on the tiny zoo (BENCHMARKS.md): 0.1 keeps exact routing's accuracy
#: (74.93% vs 74.87%; 98% of images keep one expert) at 0.76-0.80x plain-ViT
#: throughput; 0.01 / 0.05 are slower (0.73x), 0.2 no faster (0.77x).
DEFAULT_SPARSE_THRESHOLD = 0.1
#: The mixed-weights scratch buffer is kept between batches up to this size (bytes);
#: a larger one (big batch x big layer) is freed after each pass instead of held idle.
KEEP_SCRATCH_BYTES = 256 << 20


@dataclass
class GatedOutput:
    """Per image: the chosen task (argmax p) and that task's logits."""

    tasks: torch.Tensor
    logits: list[torch.Tensor]


def _set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, module)


class GatedViT(nn.Module):
    """A timm ViT whose gated tensors are mixed per image."""

    cls_stack: torch.Tensor | None
    pos_stack: torch.Tensor | None
    small_stack: torch.Tensor

    def __init__(
        self,
        architecture,
        static: dict[str, torch.Tensor],
        experts: dict[str, torch.Tensor],
        heads: Sequence[dict[str, torch.Tensor]],
        linear_mode: LinearMode = "mix",
        keep_scratch_bytes: int = KEEP_SCRATCH_BYTES,
        lowrank: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
    ):
        """``lowrank``: linear layers (module name) with shared ``W_0`` (in ``static``) and per-task
        factors ``(B (N, m, r), A (N, r, n))``; their biases are experts like every small tensor."""
        super().__init__()
        self.keep_scratch_bytes = keep_scratch_bytes
        self.vit = cast(VisionTransformer, build_model(architecture, 0))
        if getattr(self.vit, "reg_token", None) is not None:
            raise NotImplementedError("register tokens are not supported by the gated ViT")
        self.routing = Routing()
        self.num_experts = next(iter(experts.values())).shape[0]
        placeholder = {k: v[0] for k, v in experts.items()}
        self.vit.load_state_dict({**static, **placeholder}, strict=True)
        self._replace(experts, linear_mode, lowrank or {})
        #: layers that run each expert with a nonzero weight under soft routing (the default "mix" mode
        #: mixes weights instead): only then does a soft pass find its active experts (a host sync)
        self._runs_experts = any(
            isinstance(m, LowRankLinear) or (isinstance(m, GatedLinear) and m.mode == "experts")
            for m in self.vit.modules()
        )
        self.register_buffer("cls_stack", experts.get("cls_token"), persistent=False)  # moves with .to(device)
        self.register_buffer("pos_stack", experts.get("pos_embed"), persistent=False)
        self.slots: dict[str, Slot] = {}
        self.register_buffer("small_stack", self._small_table(), persistent=False)
        self.heads = nn.ModuleList()
        for head in heads:
            lin = nn.Linear(head["head.weight"].shape[1], head["head.weight"].shape[0])
            lin.load_state_dict({"weight": head["head.weight"], "bias": head["head.bias"]})
            self.heads.append(lin)
        self.eval()

    def _replace(
        self, experts: dict[str, torch.Tensor], mode: LinearMode, lowrank: dict[str, tuple[torch.Tensor, torch.Tensor]]
    ) -> None:
        modules = dict(self.vit.named_modules())
        owners = sorted({k.rsplit(".", 1)[0] for k in experts if "." in k} | set(lowrank))
        for name in owners:
            mod = modules[name]
            w, b = experts.get(f"{name}.weight"), experts.get(f"{name}.bias")
            if name in lowrank:
                if not isinstance(mod, nn.Linear) or w is not None:
                    raise NotImplementedError(f"low-rank deltas need a linear layer with a shared weight: {name}")
                factor_b, factor_a = lowrank[name]
                _set_module(self.vit, name, LowRankLinear(mod.weight.detach(), b, factor_b, factor_a, self.routing))
                continue
            if w is None and type(mod).__name__ != "LayerScale":
                raise NotImplementedError(f"cannot gate module {name}: its weight is not gated")
            if isinstance(mod, nn.Linear):
                new: nn.Module = GatedLinear(cast(torch.Tensor, w), b, self.routing, mode)
            elif isinstance(mod, nn.LayerNorm) and b is not None:
                new = GatedLayerNorm(cast(torch.Tensor, w), b, mod.eps, self.routing)
            elif isinstance(mod, nn.Conv2d):
                new = GatedConv2d(mod, cast(torch.Tensor, w), b, self.routing)
            elif type(mod).__name__ == "LayerScale":
                new = GatedLayerScale(experts[f"{name}.gamma"], self.routing)
            else:
                raise NotImplementedError(f"cannot gate module {name} ({type(mod).__name__})")
            _set_module(self.vit, name, new)

    def _small_table(self) -> torch.Tensor:
        """``(N, S)``: every small stacked tensor (norms, biases, layer scales, embeddings,
        patch-embedding weights) side by side, each module told its slot; one matmul
        per pass mixes them all. Large linear weights stay out (mixed in their layer).
        A copy taken at construction: the gated weights are fixed for a GatedViT's life."""
        owners: list[tuple[Any, str, torch.Tensor | None]] = [
            (self, "cls", self.cls_stack),
            (self, "pos", self.pos_stack),
        ]
        for mod in self.vit.modules():
            if isinstance(mod, GatedLinear):
                owners.append((mod, "bias", mod.bias))
            elif isinstance(mod, (GatedLayerNorm, GatedConv2d)):
                owners += [(mod, "weight", mod.weight), (mod, "bias", mod.bias)]
            elif isinstance(mod, GatedLayerScale):
                owners.append((mod, "gamma", mod.gamma))
        parts, offset = [], 0
        for mod, name, stack in owners:
            if stack is None:
                continue
            flat = stack.detach().reshape(self.num_experts, -1)
            mod.slots[name] = (offset, flat.shape[1])
            parts.append(flat)
            offset += flat.shape[1]
        return torch.cat(parts, 1) if parts else torch.zeros(self.num_experts, 0)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        vit, r = self.vit, self.routing
        x = vit.patch_embed(x)
        batch = x.shape[0]
        # mixing a (N, 1, L, D) stack gives (B, 1, L, D); one expert or a static tensor (1, L, D)
        cls = r.mix(self.cls_stack, self.slots.get("cls")) if self.cls_stack is not None else vit.cls_token
        pos = r.mix(self.pos_stack, self.slots.get("pos")) if self.pos_stack is not None else vit.pos_embed
        assert cls is not None and pos is not None, "the gated ViT needs a class token and position embeddings"
        cls = cls.reshape(-1, 1, cls.shape[-1]).expand(batch, -1, -1)
        pos = pos.reshape(-1, *pos.shape[-2:])
        if vit.no_embed_class:
            x = torch.cat([cls, x + pos], dim=1)
        else:
            x = torch.cat([cls, x], dim=1) + pos
        x = vit.norm_pre(x)
        x = vit.blocks(x)
        return vit.norm(x)

    def _pre_logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.vit.forward_head(self.forward_features(x), pre_logits=True)

    def _run(
        self,
        x: torch.Tensor,
        p: torch.Tensor | None = None,
        expert: int | None = None,
        groups: list[Group] | None = None,
    ) -> torch.Tensor:
        r = self.routing
        r.p, r.expert, r.groups = p, expert, groups
        hard = r.hard_groups()
        if hard is not None:
            r.index = torch.cat([torch.full((s.stop - s.start,), e, dtype=torch.long) for s, e in hard]).to(x.device)
        elif p is not None:
            r.table = p @ self.small_stack
            if self._runs_experts:  # the pass's one host sync, before the layer loop
                r.active = (p != 0).any(0).nonzero().flatten().tolist()
        try:
            return self._pre_logits(x)
        finally:
            r.p, r.expert, r.groups, r.table, r.index, r.active = None, None, None, None, None, None
            if r.scratch_bytes > self.keep_scratch_bytes:
                r.release()

    @torch.inference_mode()
    def features(
        self,
        x: torch.Tensor,
        p: torch.Tensor,
        mixing: Mixing = "exact",
        threshold: float = DEFAULT_SPARSE_THRESHOLD,
    ) -> torch.Tensor:
        """Pre-logit features ``(B, D)`` with per-image routing ``p`` ``(B, N)``."""
        if p.shape != (x.shape[0], self.num_experts):
            raise ValueError(f"p must have shape ({x.shape[0]}, {self.num_experts}), got {tuple(p.shape)}")
        p = p.to(x.dtype)
        if mixing == "exact":
            return self._run(x, p=p)
        return self._sparse(x, p, threshold)

    def _sparse(self, x: torch.Tensor, p: torch.Tensor, threshold: float) -> torch.Tensor:
        """Drop small experts, sort the batch by remaining expert set, run ONE pass.

        Ungated layers see the whole batch; a gated linear layer runs once per group (a
        plain dense layer for a one-expert group); norms and embeddings mix per image
        with the renormalised ``p`` (one-hot for a one-expert image: exactly that expert).
        """
        top = torch.nn.functional.one_hot(p.argmax(1), p.shape[1]).bool()
        kept = p * ((p >= threshold) | top)  # the argmax expert is always kept
        kept = kept / kept.sum(1, keepdim=True).clamp(min=1e-12)
        n = p.shape[1]
        code = ((kept > 0).long() << torch.arange(n, device=p.device)).sum(1)  # expert set as a bit mask
        order = torch.argsort(code, stable=True)
        sets, counts = torch.unique_consecutive(code[order], return_counts=True)
        experts = [[i for i in range(n) if c >> i & 1] for c in sets.tolist()]
        if len(experts) == 1 and len(experts[0]) == 1:
            return self._run(x, expert=experts[0][0])
        groups, start = [], 0
        for ex, count in zip(experts, counts.tolist()):
            groups.append((slice(start, start + count), ex[0] if len(ex) == 1 else None))
            start += count
        feats = self._run(x[order], p=kept[order], groups=groups)
        out = torch.empty_like(feats)
        out[order] = feats
        return out

    @classmethod
    def from_bundle(cls, models: BundleReader, linear_mode: LinearMode = "mix") -> GatedViT:
        """The model of a ``gated`` or ``lowrank`` bundle: static tensors, expert stacks, factors, every task's head."""
        b = models.bundle
        heads = [models.head(t) for t in models.tasks]
        lowrank = None
        static, experts = dict(b.tensors("backbone")), dict(b.tensors("experts"))
        if models.kind == "lowrank":
            factors = models.lowrank_factors()  # float32: quantized factors are dequantized at load
            for k in [k for k, w in static.items() if w.ndim != 2]:  # a compressed conv: per-task weights
                w = static.pop(k).float()
                experts[k] = w + torch.bmm(*factors[k]).reshape(-1, *w.shape)
            lowrank = {k.removesuffix(".weight"): factors[k] for k in static}
        return cls(models.architecture, static, experts, heads, linear_mode, lowrank=lowrank)

    @torch.inference_mode()
    def classify(
        self,
        x: torch.Tensor,
        p: torch.Tensor,
        mixing: Mixing = "exact",
        threshold: float = DEFAULT_SPARSE_THRESHOLD,
    ) -> GatedOutput:
        """Route per image, then apply the head of ``argmax p`` to each image."""
        feats = self.features(x, p, mixing, threshold)
        tasks = p.argmax(1)
        logits: list[torch.Tensor] = [torch.empty(0)] * x.shape[0]
        for t, idx in task_groups(tasks):
            out = self.heads[t](feats[idx])
            for j, i in enumerate(idx.tolist()):
                logits[i] = out[j]
        return GatedOutput(tasks, logits)
