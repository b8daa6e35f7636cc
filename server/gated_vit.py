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
  weights per image and use a batched matmul (``linear_mode="mix"``), or run every
  expert and mix outputs (``linear_mode="experts"``); both are exact.
* ``sparse`` -- drop experts with ``p_i < threshold`` (never the argmax), renormalise, group images by
  their remaining expert set; a group with one expert runs plain dense layers with
  that expert's weights (as fast as a single ViT), others run the exact mixing.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from model_store.architecture import build_model

LinearMode = Literal["mix", "experts"]
#: Measured on the tiny zoo (BENCHMARKS.md): 0.1 keeps exact routing's accuracy
#: (74.93% vs 74.87%) at 0.91x plain-ViT throughput; 0.05 only reaches 0.80x.
DEFAULT_SPARSE_THRESHOLD = 0.1


class Routing:
    """Routing of the current (sub)batch: per-image weights ``p`` (B, N) or one expert for all."""

    def __init__(self) -> None:
        self.p: torch.Tensor | None = None
        self.expert: int | None = None

    def mix(self, stack: torch.Tensor) -> torch.Tensor:
        """``(N, *s)`` -> ``(B, *s)`` per-image mixture, or ``(*s)`` for a single expert."""
        if self.expert is not None:
            return stack[self.expert]
        assert self.p is not None, "routing not set"
        n = stack.shape[0]
        return (self.p @ stack.reshape(n, -1)).reshape(self.p.shape[0], *stack.shape[1:])


class GatedLinear(nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, routing: Routing, mode: LinearMode = "mix"):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)  # (N, out, in)
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None  # (N, out)
        self.routing, self.mode = routing, mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = self.routing
        if r.expert is not None:
            return F.linear(x, self.weight[r.expert], None if self.bias is None else self.bias[r.expert])
        assert r.p is not None
        squeeze = x.ndim == 2
        if squeeze:
            x = x.unsqueeze(1)
        if self.mode == "experts":
            y = 0
            for i in range(self.weight.shape[0]):
                w = r.p[:, i].view(-1, 1, 1)
                if bool((w != 0).any()):
                    y = y + w * F.linear(x, self.weight[i], None if self.bias is None else self.bias[i])
            assert isinstance(y, torch.Tensor)
        else:
            w = r.mix(self.weight)  # (B, out, in)
            if self.bias is None:
                y = torch.bmm(x, w.transpose(1, 2))
            else:
                y = torch.baddbmm(r.mix(self.bias).unsqueeze(1), x, w.transpose(1, 2))
        return y.squeeze(1) if squeeze else y


class GatedLayerNorm(nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, eps: float, routing: Routing):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)  # (N, D)
        self.bias = nn.Parameter(bias, requires_grad=False)
        self.eps, self.routing = eps, routing

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.layer_norm(x, (x.shape[-1],), None, None, self.eps)
        w, b = self.routing.mix(self.weight), self.routing.mix(self.bias)
        if self.routing.expert is None:
            shape = (w.shape[0],) + (1,) * (x.ndim - 2) + (w.shape[-1],)
            w, b = w.view(shape), b.view(shape)
        return y * w + b


class GatedLayerScale(nn.Module):
    def __init__(self, gamma: torch.Tensor, routing: Routing):
        super().__init__()
        self.gamma = nn.Parameter(gamma, requires_grad=False)  # (N, D)
        self.routing = routing

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.routing.mix(self.gamma)
        return x * (g if self.routing.expert is not None else g.unsqueeze(1))


class GatedConv2d(nn.Module):
    """Patch-embedding convolution: ``sum_i p_i conv_i(x)`` (all experts, then mix)."""

    def __init__(self, conv: nn.Conv2d, weight: torch.Tensor, bias: torch.Tensor | None, routing: Routing):
        super().__init__()
        self.stride, self.padding = conv.stride, conv.padding
        self.weight = nn.Parameter(weight, requires_grad=False)  # (N, D, C, k, k)
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None
        self.routing = routing

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = self.routing
        if r.expert is not None:
            return F.conv2d(x, self.weight[r.expert], None if self.bias is None else self.bias[r.expert], self.stride, self.padding)
        assert r.p is not None
        n, d = self.weight.shape[:2]
        y = F.conv2d(x, self.weight.flatten(0, 1), None if self.bias is None else self.bias.flatten(), self.stride, self.padding)
        y = y.view(y.shape[0], n, d, *y.shape[2:])
        return torch.einsum("bn,bnd...->bd...", r.p, y)


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

    def __init__(self, architecture, static: dict[str, torch.Tensor], experts: dict[str, torch.Tensor], heads: Sequence[dict[str, torch.Tensor]], linear_mode: LinearMode = "mix"):
        super().__init__()
        self.vit = build_model(architecture, 0)
        if getattr(self.vit, "reg_token", None) is not None:
            raise NotImplementedError("register tokens are not supported by the gated ViT")
        self.routing = Routing()
        self.num_experts = next(iter(experts.values())).shape[0]
        placeholder = {k: v[0] for k, v in experts.items()}
        self.vit.load_state_dict({**static, **placeholder}, strict=True)
        self._replace(experts, linear_mode)
        self.register_buffer("cls_stack", experts.get("cls_token"), persistent=False)  # moves with .to(device)
        self.register_buffer("pos_stack", experts.get("pos_embed"), persistent=False)
        self.heads = nn.ModuleList()
        for head in heads:
            lin = nn.Linear(head["head.weight"].shape[1], head["head.weight"].shape[0])
            lin.load_state_dict({"weight": head["head.weight"], "bias": head["head.bias"]})
            self.heads.append(lin)
        self.eval()

    def _replace(self, experts: dict[str, torch.Tensor], mode: LinearMode) -> None:
        modules = dict(self.vit.named_modules())
        owners = sorted({k.rsplit(".", 1)[0] for k in experts if "." in k})
        for name in owners:
            mod = modules[name]
            w, b = experts.get(f"{name}.weight"), experts.get(f"{name}.bias")
            if isinstance(mod, nn.Linear):
                new: nn.Module = GatedLinear(w, b, self.routing, mode)
            elif isinstance(mod, nn.LayerNorm):
                new = GatedLayerNorm(w, b, mod.eps, self.routing)
            elif isinstance(mod, nn.Conv2d):
                new = GatedConv2d(mod, w, b, self.routing)
            elif type(mod).__name__ == "LayerScale":
                new = GatedLayerScale(experts[f"{name}.gamma"], self.routing)
            else:
                raise NotImplementedError(f"cannot gate module {name} ({type(mod).__name__})")
            _set_module(self.vit, name, new)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        vit, r = self.vit, self.routing
        x = vit.patch_embed(x)
        batch = x.shape[0]
        # mixing a (N, 1, L, D) stack gives (B, 1, L, D); one expert or a static tensor (1, L, D)
        cls = r.mix(self.cls_stack) if self.cls_stack is not None else vit.cls_token
        cls = cls.reshape(-1, 1, cls.shape[-1]).expand(batch, -1, -1)
        pos = r.mix(self.pos_stack) if self.pos_stack is not None else vit.pos_embed
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

    def _run(self, x: torch.Tensor, p: torch.Tensor | None = None, expert: int | None = None) -> torch.Tensor:
        self.routing.p, self.routing.expert = p, expert
        try:
            return self._pre_logits(x)
        finally:
            self.routing.p, self.routing.expert = None, None

    @torch.inference_mode()
    def features(self, x: torch.Tensor, p: torch.Tensor, strategy: Literal["exact", "sparse"] = "exact", threshold: float = DEFAULT_SPARSE_THRESHOLD) -> torch.Tensor:
        """Pre-logit features ``(B, D)`` with per-image routing ``p`` ``(B, N)``."""
        if p.shape != (x.shape[0], self.num_experts):
            raise ValueError(f"p must have shape ({x.shape[0]}, {self.num_experts}), got {tuple(p.shape)}")
        p = p.to(x.dtype)
        if strategy == "exact":
            return self._run(x, p=p)
        top = torch.nn.functional.one_hot(p.argmax(1), p.shape[1]).bool()
        kept = p * ((p >= threshold) | top)  # the argmax expert is always kept
        kept = kept / kept.sum(1, keepdim=True).clamp(min=1e-12)
        support = kept > 0
        out = torch.empty(x.shape[0], self.vit.num_features, dtype=x.dtype, device=x.device)
        patterns, inverse = torch.unique(support, dim=0, return_inverse=True)
        for g, pattern in enumerate(patterns):
            idx = (inverse == g).nonzero().flatten()
            experts = pattern.nonzero().flatten()
            if len(experts) == 1:
                out[idx] = self._run(x[idx], expert=int(experts[0]))
            else:
                out[idx] = self._run(x[idx], p=kept[idx])
        return out

    @torch.inference_mode()
    def classify(self, x: torch.Tensor, p: torch.Tensor, strategy: Literal["exact", "sparse"] = "exact", threshold: float = DEFAULT_SPARSE_THRESHOLD) -> GatedOutput:
        """Route per image, then apply the head of ``argmax p`` to each image."""
        feats = self.features(x, p, strategy, threshold)
        tasks = p.argmax(1)
        logits: list[torch.Tensor] = [torch.empty(0)] * x.shape[0]
        for t in tasks.unique().tolist():
            idx = (tasks == t).nonzero().flatten()
            out = self.heads[t](feats[idx])
            for j, i in enumerate(idx.tolist()):
                logits[i] = out[j]
        return GatedOutput(tasks, logits)
