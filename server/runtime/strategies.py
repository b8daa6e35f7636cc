"""How each bundle kind turns a routed batch into pre-logit features: one strategy object per kind.

* :class:`StaticStrategy` -- one shared backbone, run once for the whole batch;
* :class:`EMRStrategy` -- task t's backbone ``theta_0 + lam_t * M_t * tau_uni`` is materialised
  on the device from flat buffers (a few kernels for the whole model) into a module built on
  the meta device whose parameters ARE the materialised views (no copy); modules live in an
  LRU :class:`~server.runtime.weight_cache.WeightCache` under a byte budget; images are grouped
  by task and each group runs its task's module;
* :class:`GatedStrategy` -- :class:`~server.runtime.gated_vit.GatedViT` mixes expert tensors per
  image (mixing ``exact`` or ``sparse``);
* :class:`LowRankStrategy` -- low-rank task deltas in ONE pass (SPEC section 7): every linear
  layer runs its shared ``W_0`` once for the whole mixed batch plus rank-r corrections
  ``B_t A_t`` per task group; small tensors are gathered per image. With a backbone router's
  shared prefix (SPEC section 8) the pass splits after block k: :meth:`LowRankStrategy.prefix`
  for the whole batch, then :meth:`LowRankStrategy.features_after` per routed task.

``shared_weights()`` (where a strategy has it): ``theta_0``'s tensors it holds, by name, for a
backbone router's prefix to share instead of loading a copy.

A strategy never writes to the bundle's tensors.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from model_store.architecture import build_model
from model_store.bitpack import pack_mask, unpack_mask
from server.runtime.bundle_reader import BundleReader
from server.runtime.gated_vit import GatedViT, Mixing
from server.runtime.groups import task_groups
from server.runtime.weight_cache import WeightCache, Weights

Run = Callable[[torch.Tensor], torch.Tensor]


def tensor_bytes(module: nn.Module) -> int:
    """Bytes of a module's state (parameters and buffers)."""
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


@dataclass
class StrategyContext:
    """What every strategy gets from the engine."""

    models: BundleReader
    device: torch.device
    cache: WeightCache
    graphed: Callable[[nn.Module], Run]  # the module itself, or a CUDA-graph runner over it
    mixing: Mixing = "sparse"
    threshold: float = 0.1


class KindStrategy(Protocol):
    """Pre-logit features of a batch whose image i is routed with ``p[i]`` (one-hot when the task is given)."""

    def features(self, x: torch.Tensor, p: torch.Tensor) -> torch.Tensor: ...

    def resident_bytes(self) -> dict[str, int]: ...


def template_module(ctx: StrategyContext, weights: Weights) -> nn.Module:
    """A headless timm model whose parameters ARE ``weights`` (assigned, not copied)."""
    model = build_model(ctx.models.architecture, 0)
    model.load_state_dict(weights, strict=True, assign=True)
    return model.to(ctx.device).eval().requires_grad_(False)


class StaticStrategy:
    """One backbone for every task: the whole batch in one forward."""

    def __init__(self, ctx: StrategyContext):
        self.template = template_module(
            ctx, {k: v.to(ctx.device) for k, v in ctx.models.bundle.tensors("backbone").items()}
        )
        self._run = ctx.graphed(self.template)

    def features(self, x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        return self._run(x)

    def resident_bytes(self) -> dict[str, int]:
        return {"backbone": tensor_bytes(self.template)}


class EMRStrategy:
    """EMR: per task group, task t's weights materialised from flat ``theta_0``, ``tau_uni`` and packed masks."""

    def __init__(self, ctx: StrategyContext):
        self.ctx = ctx
        bundle, dev, tasks = ctx.models.bundle, ctx.device, ctx.models.tasks
        tau, base, masks = bundle.tensors("tau_unified"), bundle.tensors("base"), bundle.tensors("masks")
        self.keys = list(tau)
        self.shapes = [tuple(tau[k].shape) for k in self.keys]
        self.numels = [tau[k].numel() for k in self.keys]
        # ONE flat tensor each, so materialising a task is a handful of kernels, not a few per tensor
        self.base_flat = torch.cat([base[k].float().reshape(-1) for k in self.keys]).to(dev)
        self.tau_flat = torch.cat([tau[k].float().reshape(-1) for k in self.keys]).to(dev)
        self.masks_flat = [
            pack_mask(
                torch.cat([unpack_mask(masks[f"{t}/{k}"], s).reshape(-1) for k, s in zip(self.keys, self.shapes)])
            ).to(dev)
            for t in tasks
        ]
        self.lams = [ctx.models.rescaler(t) for t in tasks]
        with torch.device("meta"):
            self.meta_model = build_model(ctx.models.architecture, 0).eval().requires_grad_(False)
        missing = set(self.meta_model.state_dict()) - set(self.keys)
        if missing:
            raise ValueError(f"bundle {bundle.version}: tau_unified lacks {sorted(missing)[:3]}")
        self.model_bytes = 4 * self.tau_flat.numel()
        self.scratch = copy.deepcopy(self.meta_model)  # reused when the cache cannot hold a task

    def shared_weights(self) -> dict[str, torch.Tensor]:
        """``theta_0``'s tensors as views of the flat base (a backbone router's prefix shares them)."""
        return {k: v.view(s) for k, v, s in zip(self.keys, self.base_flat.split(self.numels), self.shapes)}

    def materialise(self, task: int) -> Weights:
        """Task ``task``'s backbone ``theta_0 + lam_t M_t tau_uni`` as views of one flat tensor."""
        mask = unpack_mask(self.masks_flat[task], (self.tau_flat.numel(),), torch.float32)
        flat = torch.addcmul(self.base_flat, mask, self.tau_flat, value=self.lams[task])
        return {k: v.view(s) for k, v, s in zip(self.keys, flat.split(self.numels), self.shapes)}

    def task_module(self, task: int) -> Run:
        """A headless model running task ``task``'s weights.

        Cached (LRU) when one task's weights fit the budget; otherwise the weights are
        materialised into a reusable scratch module (parameters reassigned, no copy).
        """
        cache = self.ctx.cache
        if self.model_bytes > cache.budget:
            cache.record_miss()
            self.scratch.load_state_dict(self.materialise(task), strict=True, assign=True)
            return self.scratch  # weights change every call: never graphed
        return cache.get(self.ctx.models.tasks[task], lambda: self._build(task))._vitmerge_run

    def _build(self, task: int) -> nn.Module:
        model = copy.deepcopy(self.meta_model)  # structure only: parameters live on the meta device
        model.load_state_dict(self.materialise(task), strict=True, assign=True)
        # plain attribute (not a registered submodule): graphs die with the module when the cache evicts it
        object.__setattr__(model, "_vitmerge_run", self.ctx.graphed(model))
        return model

    def features(self, x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        groups = task_groups(p.argmax(1).cpu())
        if len(groups) == 1:
            return self.task_module(groups[0][0])(x)
        out = None
        for t, idx in groups:
            rows = idx.to(x.device)
            y = self.task_module(t)(x[rows])
            if out is None:
                out = torch.empty(x.shape[0], y.shape[1], device=y.device, dtype=y.dtype)
            out[rows] = y
        assert out is not None
        return out

    def resident_bytes(self) -> dict[str, int]:
        return {
            "base": self.base_flat.numel() * 4,
            "tau_unified": self.tau_flat.numel() * 4,
            "masks": sum(m.numel() for m in self.masks_flat),
            "weight_cache": self.ctx.cache.nbytes,
        }


class GatedStrategy:
    """Gated layers: every image mixes the expert tensors with its own ``p`` in one pass."""

    def __init__(self, ctx: StrategyContext):
        self.ctx = ctx
        self.gated = GatedViT.from_bundle(ctx.models).to(ctx.device)

    def features(self, x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        return self.gated.features(x, p, self.ctx.mixing, self.ctx.threshold)

    def resident_bytes(self) -> dict[str, int]:
        return {"gated_vit": tensor_bytes(self.gated.vit)}


class LowRankStrategy:
    """One pass per mixed batch over ``W_0`` + per-task rank-r corrections; each image runs ``argmax p``'s task."""

    def __init__(self, ctx: StrategyContext):
        self.gated = GatedViT.from_bundle(ctx.models).to(ctx.device)
        self._backbone = {k: tuple(v.shape) for k, v in ctx.models.bundle.tensors("backbone").items()}
        router = ctx.models.spec.router
        #: blocks of a backbone router's shared prefix (0: none): the pass can stop after them to route
        self.prefix_blocks = router.k if router is not None and router.variant == "shared_prefix" else 0
        if self.prefix_blocks and not self.gated.static_prefix(self.prefix_blocks):
            raise ValueError(f"bundle {ctx.models.bundle.version}: its shared prefix holds per-task tensors")

    def features(self, x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        hard = torch.nn.functional.one_hot(p.argmax(1), p.shape[1]).to(x.dtype)
        return self.gated.features(x, hard, "sparse")

    def prefix(self, x: torch.Tensor) -> torch.Tensor:
        """The shared prefix's tokens after block ``prefix_blocks`` for the whole batch."""
        return self.gated.prefix(x, self.prefix_blocks)

    def features_after(self, tokens: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        """:meth:`features` continued from :meth:`prefix`'s ``tokens``, each image with ``argmax p``'s task."""
        hard = torch.nn.functional.one_hot(p.argmax(1), p.shape[1]).to(tokens.dtype)
        return self.gated.features(tokens, hard, "sparse", start=self.prefix_blocks)

    def shared_weights(self) -> dict[str, torch.Tensor]:
        """The tensors of ``backbone.safetensors`` (``theta_0``: ``W_0`` of the low-rank layers, a shared prefix) as
        the model holds them, by their timm names (per-task stacks and placeholders left out)."""
        state = self.gated.vit.state_dict(keep_vars=True)
        return {k: state[k] for k, shape in self._backbone.items() if k in state and tuple(state[k].shape) == shape}

    def resident_bytes(self) -> dict[str, int]:
        small = self.gated.small_stack
        return {"lowrank_vit": tensor_bytes(self.gated.vit) + small.numel() * small.element_size()}


#: Bundle kind (``model.json``'s ``kind``) -> its strategy.
STRATEGIES: dict[str, Callable[[StrategyContext], KindStrategy]] = {
    "lowrank": LowRankStrategy,
    "static": StaticStrategy,
    "emr": EMRStrategy,
    "gated": GatedStrategy,
}
