"""Per-image gated execution of a timm ViT (SPEC section 3; Ye et al.).

Every gated tensor keeps its N expert copies; image b runs with
``W(x_b) = sum_i p_i(x_b) W_i``. ``p`` is per image -- a batch mixing tasks gives
every image the output it gets alone (the reference code averages ``p`` over the
batch; we never do).

Module replacement keeps timm's block code: gated ``nn.Linear`` / ``nn.LayerNorm`` /
``LayerScale`` / patch-embedding ``Conv2d`` modules are swapped for the classes
below, which read the current :class:`Routing`; ``cls_token`` and ``pos_embed`` are
mixed in :meth:`GatedViT.forward_features`.

Strategies (one interface, :meth:`GatedViT.classify`):

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

import functools
import operator
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, cast

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from model_store.architecture import build_model
from server.runtime.bundle_reader import BundleReader
from server.runtime.groups import task_groups

LinearMode = Literal["mix", "experts"]
#: Measured on the tiny zoo (BENCHMARKS.md): 0.1 keeps exact routing's accuracy
#: (74.93% vs 74.87%; 98% of images keep one expert) at 0.76-0.80x plain-ViT
#: throughput; 0.01 / 0.05 are slower (0.73x), 0.2 no faster (0.77x).
DEFAULT_SPARSE_THRESHOLD = 0.1
#: The mixed-weights scratch buffer is kept between batches up to this size (bytes);
#: a larger one (big batch x big layer) is freed after each pass instead of held idle.
KEEP_SCRATCH_BYTES = 256 << 20


#: ``(rows, expert)``: a contiguous run of images; ``expert`` when the run uses one expert only
Group = tuple[slice, int | None]
#: ``(offset, numel)`` of one stacked tensor in :attr:`GatedViT.small_stack`
Slot = tuple[int, int]


class Routing:
    """Routing of the current (sub)batch: per-image weights ``p`` (B, N) or one expert for all.

    Also owns the scratch buffer the gated linear layers mix their per-image weights into:
    layers run one after another, so one buffer (grown to the largest ``B x out x in``)
    serves them all. A fresh ``B x`` (gated parameters) allocation per layer and batch
    cost page faults and cache misses -- up to half of the exact strategy's time.
    """

    def __init__(self) -> None:
        self.p: torch.Tensor | None = None
        self.expert: int | None = None
        #: sparse routing: the batch is sorted so that each group is a contiguous run of images
        self.groups: list[Group] | None = None
        #: ``p @`` the small-tensor table of the current pass (``B x S``)
        self.table: torch.Tensor | None = None
        #: hard routing (every group one expert): each image's expert ``(B,)``; small tensors are
        #: gathered with it (an index, not a ``B x S`` matmul over every small tensor)
        self.index: torch.Tensor | None = None
        #: soft routing: the experts with a nonzero weight for some image of the pass, found ONCE per pass
        #: (one host sync before the layer loop, none inside it); ``None``: every expert
        self.active: list[int] | None = None
        self._scratch: torch.Tensor | None = None

    def scratch(self, numel: int, like: torch.Tensor) -> torch.Tensor | None:
        """A reusable flat buffer of ``numel`` elements (dtype/device of ``like``); ``None`` under autograd."""
        if torch.is_grad_enabled():
            return None
        buf, inference = self._scratch, torch.is_inference_mode_enabled()
        if (
            buf is None
            or buf.numel() < numel
            or buf.dtype != like.dtype
            or buf.device != like.device
            or buf.is_inference() != inference
        ):
            buf = self._scratch = torch.empty(numel, dtype=like.dtype, device=like.device)
        return buf[:numel]

    def experts(self, n: int) -> Sequence[int]:
        """The experts a soft-routed layer must run: :attr:`active`, or all ``n`` when it is not set."""
        return range(n) if self.active is None else self.active

    def hard_groups(self) -> list[tuple[slice, int]] | None:
        """The groups of the current pass when every one runs a single expert, else ``None``."""
        if self.groups is None or any(e is None for _, e in self.groups):
            return None
        return cast(list[tuple[slice, int]], self.groups)

    @property
    def scratch_bytes(self) -> int:
        """Bytes held by the scratch buffer."""
        buf = self._scratch
        return 0 if buf is None else buf.numel() * buf.element_size()

    def release(self) -> None:
        """Drop the scratch buffer (it is re-created on the next exact pass)."""
        self._scratch = None

    def mix(self, stack: torch.Tensor, slot: Slot | None = None) -> torch.Tensor:
        """``(N, *s)`` -> ``(B, *s)`` per-image mixture, or ``(*s)`` for a single expert.

        ``slot``: where ``stack`` sits in the table of small tensors that
        :class:`GatedViT` mixes once per pass (one matmul instead of one per tensor).
        """
        if self.expert is not None:
            return stack[self.expert]
        if self.index is not None:
            return stack.index_select(0, self.index)
        assert self.p is not None, "routing not set"
        if slot is not None and self.table is not None:
            return self.table[:, slot[0] : slot[0] + slot[1]].view(self.p.shape[0], *stack.shape[1:])
        n = stack.shape[0]
        return (self.p @ stack.reshape(n, -1)).reshape(self.p.shape[0], *stack.shape[1:])


class GatedLinear(nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, routing: Routing, mode: LinearMode = "mix"):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)  # (N, out, in)
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None  # (N, out)
        self.routing, self.mode = routing, mode
        self.slots: dict[str, Slot] = {}
        self._views: list[tuple[torch.Tensor, torch.Tensor | None]] = []
        self._views_key: tuple[int, torch.dtype] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = self.routing
        if r.expert is not None:
            return F.linear(x, self.weight[r.expert], None if self.bias is None else self.bias[r.expert])
        assert r.p is not None
        if r.groups is not None:
            return self._grouped(x, r.p, r.groups)
        return self._mixed(x, r.p)

    def _grouped(self, x: torch.Tensor, p: torch.Tensor, groups: Sequence[Group]) -> torch.Tensor:
        """Contiguous image groups: a one-expert group is a plain dense layer, others mix."""
        out_f, in_f = self.weight.shape[1:]
        y = x.new_empty(*x.shape[:-1], out_f)
        x2, y2 = x.reshape(-1, in_f), y.view(-1, out_f)
        per_image = x2.shape[0] // x.shape[0]  # tokens per image
        for rows, expert in groups:
            if expert is None:
                y[rows] = self._mixed(x[rows], p[rows])
                continue
            tokens = slice(rows.start * per_image, rows.stop * per_image)
            w_t, b = self._expert(expert)
            if b is None:
                torch.mm(x2[tokens], w_t, out=y2[tokens])
            else:
                torch.addmm(b, x2[tokens], w_t, out=y2[tokens])
        return y

    def _expert(self, i: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Expert ``i``'s ``(W_i^T, b_i)`` as views, cached while the weights stay put (``.to()`` moves them)."""
        key = (self.weight.data_ptr(), self.weight.dtype)
        if self._views_key != key:
            self._views = [
                (w.t(), None if self.bias is None else self.bias[j]) for j, w in enumerate(self.weight.detach())
            ]
            self._views_key = key
        return self._views[i]

    def _mixed(self, x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        """Image b uses ``sum_i p[b, i] (W_i x + b_i)``."""
        squeeze = x.ndim == 2
        if squeeze:
            x = x.unsqueeze(1)
        if self.mode == "experts":
            terms = []
            for i in self.routing.experts(self.weight.shape[0]):  # a zero weight adds exact zeros: no sync
                w = p[:, i].view(-1, 1, 1)
                terms.append(w * F.linear(x, self.weight[i], None if self.bias is None else self.bias[i]))
            y = functools.reduce(operator.add, terms)  # left to right, as a running sum
        else:
            n, out_f, in_f = self.weight.shape
            batch = p.shape[0]
            buf = self.routing.scratch(batch * out_f * in_f, x)
            flat = self.weight.reshape(n, -1)
            w = (torch.mm(p, flat, out=buf.view(batch, -1)) if buf is not None else p @ flat).view(batch, out_f, in_f)
            y = torch.bmm(x, w.transpose(1, 2))
            if self.bias is not None:  # in place: baddbmm would first copy the bias over the whole output
                bias = self.routing.mix(self.bias, self.slots.get("bias")) if p is self.routing.p else p @ self.bias
                y = y.add_(bias.unsqueeze(1)) if buf is not None else y + bias.unsqueeze(1)
        return y.squeeze(1) if squeeze else y


class LowRankLinear(nn.Module):
    """A linear layer with shared ``W_0`` and per-task low-rank deltas ``B_t A_t`` (SPEC section 7).

    ``y = [(x A_t^T) B_t^T + b_t] + x W_0^T``: only the rank-r corrections run per task group (the
    sparse pass sorted the batch by task, so a group is a contiguous run of token rows), written
    straight into the output; then the big GEMM on ``W_0`` runs ONCE for the whole batch and
    accumulates into it (``beta = 1``: no extra pass over the output). The bias rides in the
    correction as one more rank: ``[x A_t^T, 1] [B_t, b_t]^T``. Under soft routing (no groups) every
    task's correction is weighted per image.

    Layouts measured on a 2-core x86 CPU (ViT-B/16 shapes, 1379 token rows): ``x A_t^T`` with
    ``A_t`` stored ``(r, in)`` and read transposed runs ~1.8x faster than with a contiguous
    ``(in, r)`` copy; folding the bias into the correction saves a pass over the output (~2-4%
    of a layer).
    """

    def __init__(
        self, weight: torch.Tensor, bias: torch.Tensor | None, b: torch.Tensor, a: torch.Tensor, routing: Routing
    ):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)  # (out, in): W_0
        n, out_f, rank = b.shape
        bias = bias if bias is not None else b.new_zeros(n, out_f)
        self.a = nn.Parameter(a.contiguous(), requires_grad=False)  # (N, r, in): A_t
        #: (N, out, r + 1): ``[B_t, b_t]``, the task's bias as the last column
        self.b_aug = nn.Parameter(torch.cat([b, bias.to(b.dtype).unsqueeze(-1)], -1), requires_grad=False)
        self.rank, self.routing = rank, routing

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = self.routing
        in_f, out_f = self.weight.shape[1], self.weight.shape[0]
        x2, shape = x.reshape(-1, in_f), (*x.shape[:-1], out_f)
        per_image = x2.shape[0] // x.shape[0]  # tokens per image
        hard = [(slice(0, x.shape[0]), r.expert)] if r.expert is not None else r.hard_groups()
        if hard is None:
            assert r.p is not None, "routing not set"
            y2 = F.linear(x2, self.weight)
            self._soft(x2, y2, r.p.repeat_interleave(per_image, 0))
            return y2.view(shape)
        if torch.is_grad_enabled() and x2.requires_grad:  # autograd: no ``out=``, the same sum functionally
            corr = [self._correction(x2[rows.start * per_image : rows.stop * per_image], t) for rows, t in hard]
            return (torch.cat(corr) + F.linear(x2, self.weight)).view(shape)
        y2 = x2.new_empty(x2.shape[0], out_f)
        h = x2.new_empty(x2.shape[0], self.rank + 1)
        h[:, self.rank] = 1
        for rows, t in hard:
            tokens = slice(rows.start * per_image, rows.stop * per_image)
            torch.mm(x2[tokens], self.a[t].t(), out=h[tokens, : self.rank])
            torch.mm(h[tokens], self.b_aug[t].t(), out=y2[tokens])
        return y2.addmm_(x2, self.weight.t()).view(shape)

    def _correction(self, x2: torch.Tensor, t: int) -> torch.Tensor:
        """Task ``t``'s ``(x A_t^T) B_t^T + b_t`` on token rows, as a new tensor."""
        b_t = self.b_aug[t]
        return torch.addmm(b_t[:, self.rank], torch.mm(x2, self.a[t].t()), b_t[:, : self.rank].t())

    def _soft(self, x2: torch.Tensor, y2: torch.Tensor, p: torch.Tensor) -> None:
        """Soft routing: ``y += sum_t p_t [(x A_t^T) B_t^T + b_t]`` per token row."""
        for t in self.routing.experts(self.a.shape[0]):
            y2.add_(p[:, t : t + 1] * self._correction(x2, t))


class GatedLayerNorm(nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, eps: float, routing: Routing):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)  # (N, D)
        self.bias = nn.Parameter(bias, requires_grad=False)
        self.eps, self.routing = eps, routing
        self.slots: dict[str, Slot] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.layer_norm(x, (x.shape[-1],), None, None, self.eps)
        w, b = (
            self.routing.mix(self.weight, self.slots.get("weight")),
            self.routing.mix(self.bias, self.slots.get("bias")),
        )
        if self.routing.expert is None:
            shape = (w.shape[0],) + (1,) * (x.ndim - 2) + (w.shape[-1],)
            w, b = w.view(shape), b.view(shape)
        # in place when autograd is off: no second fresh activation-sized buffer (page faults)
        return torch.addcmul(b, y, w) if torch.is_grad_enabled() else torch.addcmul(b, y, w, out=y)


class GatedLayerScale(nn.Module):
    def __init__(self, gamma: torch.Tensor, routing: Routing):
        super().__init__()
        self.gamma = nn.Parameter(gamma, requires_grad=False)  # (N, D)
        self.routing = routing
        self.slots: dict[str, Slot] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.routing.mix(self.gamma, self.slots.get("gamma"))
        return x * (g if self.routing.expert is not None else g.unsqueeze(1))


class GatedConv2d(nn.Module):
    """Patch-embedding convolution, mixed per image: non-overlapping patches (timm's
    patch embedding) run as a per-image linear map with mixed weights; any other
    convolution runs every expert and mixes the outputs."""

    def __init__(self, conv: nn.Conv2d, weight: torch.Tensor, bias: torch.Tensor | None, routing: Routing):
        super().__init__()
        self.stride, self.padding = conv.stride, conv.padding
        self.weight = nn.Parameter(weight, requires_grad=False)  # (N, D, C, k, k)
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None
        self.routing = routing
        self.slots: dict[str, Slot] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = self.routing
        if r.expert is not None:
            return self._conv(x, r.expert)
        hard = r.hard_groups()
        if hard is not None:  # one expert per (contiguous) group: a plain convolution per group
            return torch.cat([self._conv(x[rows], e) for rows, e in hard])
        assert r.p is not None
        n, d = self.weight.shape[:2]
        kernel = tuple(self.weight.shape[-2:])
        if tuple(self.stride) == kernel and tuple(self.padding) == (0, 0):
            # non-overlapping patches: a per-image linear map of each patch, mixed weights + bmm
            patches = F.unfold(x, kernel, stride=kernel)  # (B, C*k*k, L)
            w = r.mix(self.weight.reshape(n, d, -1), self.slots.get("weight"))  # (B, D, C*k*k)
            y = torch.bmm(w, patches)
            if self.bias is not None:
                y = y.add_(r.mix(self.bias, self.slots.get("bias")).unsqueeze(-1))
            return y.view(x.shape[0], d, x.shape[-2] // kernel[0], x.shape[-1] // kernel[1])
        y = F.conv2d(
            x, self.weight.flatten(0, 1), None if self.bias is None else self.bias.flatten(), self.stride, self.padding
        )
        y = y.view(y.shape[0], n, d, *y.shape[2:])
        return torch.einsum("bn,bnd...->bd...", r.p, y)

    def _conv(self, x: torch.Tensor, expert: int) -> torch.Tensor:
        """Expert ``expert``'s convolution."""
        bias = None if self.bias is None else self.bias[expert]
        return F.conv2d(x, self.weight[expert], bias, self.stride, self.padding)


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
        strategy: Literal["exact", "sparse"] = "exact",
        threshold: float = DEFAULT_SPARSE_THRESHOLD,
    ) -> torch.Tensor:
        """Pre-logit features ``(B, D)`` with per-image routing ``p`` ``(B, N)``."""
        if p.shape != (x.shape[0], self.num_experts):
            raise ValueError(f"p must have shape ({x.shape[0]}, {self.num_experts}), got {tuple(p.shape)}")
        p = p.to(x.dtype)
        if strategy == "exact":
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
            factors = b.tensors("factors")
            for k in [k for k, w in static.items() if w.ndim != 2]:  # a compressed conv: per-task weights
                w = static.pop(k).float()
                experts[k] = w + torch.bmm(factors[f"{k}.B"].float(), factors[f"{k}.A"].float()).reshape(-1, *w.shape)
            lowrank = {k.removesuffix(".weight"): (factors[f"{k}.B"], factors[f"{k}.A"]) for k in static}
        return cls(models.architecture, static, experts, heads, linear_mode, lowrank=lowrank)

    @torch.inference_mode()
    def classify(
        self,
        x: torch.Tensor,
        p: torch.Tensor,
        strategy: Literal["exact", "sparse"] = "exact",
        threshold: float = DEFAULT_SPARSE_THRESHOLD,
    ) -> GatedOutput:
        """Route per image, then apply the head of ``argmax p`` to each image."""
        feats = self.features(x, p, strategy, threshold)
        tasks = p.argmax(1)
        logits: list[torch.Tensor] = [torch.empty(0)] * x.shape[0]
        for t, idx in task_groups(tasks):
            out = self.heads[t](feats[idx])
            for j, i in enumerate(idx.tolist()):
                logits[i] = out[j]
        return GatedOutput(tasks, logits)
