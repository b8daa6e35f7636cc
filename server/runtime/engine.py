"""The inference engine: one loaded bundle on one device.

``predict`` takes a batch of preprocessed images, each with a given task or none:

1. **route** -- images without a task go through the gate, ``p(x)`` per image
   (never averaged over the batch); given tasks get a one-hot ``p``;
2. **group** by ``argmax p`` and run the right weights, once per task per batch;
3. **head** -- each image gets the classifier of its task.

Strategies by bundle kind (one engine, small strategies):

* ``static`` -- one shared backbone, run once for the whole batch;
* ``emr``    -- task t's backbone ``theta_0 + lam_t * M_t * tau_uni`` is materialised
  on the device from flat buffers (a few kernels for the whole model) into a module
  built on the meta device whose parameters ARE the materialised views (no copy);
  modules live in an LRU :class:`~server.weight_cache.WeightCache` under a byte budget;
* ``gated``  -- :class:`~server.gated_vit.GatedViT` mixes expert tensors per image
  (``exact`` or ``sparse``).

The engine never writes to the bundle's tensors; a hot swap builds a new engine.
"""
from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from model_store.architecture import build_model
from model_store.bitpack import pack_mask, unpack_mask
from model_store.bundle import Bundle
from model_store.data.preprocessing import to_model_input
from model_store.schema import Preprocessing
from server.runtime.bundle_reader import BundleModels
from server.runtime.gated_vit import DEFAULT_SPARSE_THRESHOLD, GatedViT
from server.runtime.weight_cache import WeightCache, Weights, weights_nbytes

Source = Literal["gate", "given"]


def preprocess_image(image: np.ndarray, prep: Preprocessing, gate_prep: Preprocessing | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One uint8 image -> the ViT's input ``(C, S, S)`` and, when ``gate_prep`` is given, the gate's."""
    batch = image[None]
    x = to_model_input(batch, prep)[0]
    return x, (to_model_input(batch, gate_prep)[0] if gate_prep is not None else None)


def _groups(tasks: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
    """CPU task indices -> [(task, image indices)], in task order."""
    return [(int(t), (tasks == t).nonzero().flatten()) for t in tasks.unique().tolist()]


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; otherwise the named device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device '{name}' requested but CUDA is not available")
    return device


#: Batch-size buckets for CUDA graphs (a batch is padded up to the next one). Fine-grained:
#: padding a ViT-B group of 9 to 16 cost more than the graph saved (measured on an H100).
GRAPH_BUCKETS = (*range(1, 9), *range(10, 17, 2), *range(20, 33, 4), *range(40, 65, 8), *range(80, 129, 16), *range(160, 257, 32))


class GraphRunner:
    """Replays CUDA graphs of a module with FIXED weights, one per batch-size bucket.

    A tiny model's forward on a GPU is bound by Python and kernel-launch overhead; a
    graph replays all kernels with one call. Rows are independent in a ViT and in an
    eval-mode CNN, so padding a batch to its bucket does not change the real rows.
    The returned tensor is a view of the graph's static output: consume it before the
    next call (the engine copies it at once).
    """

    def __init__(self, module: nn.Module, pool: Any):
        self.module, self.pool = module, pool
        self.graphs: dict[int, tuple[torch.Tensor, torch.Tensor, torch.cuda.CUDAGraph]] = {}

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        bucket = next((b for b in GRAPH_BUCKETS if b >= n), None)
        if bucket is None:
            return self.module(x)
        if bucket not in self.graphs:
            self.graphs[bucket] = self._capture(bucket, x)
        static_in, static_out, graph = self.graphs[bucket]
        static_in[:n].copy_(x)
        graph.replay()
        return static_out[:n]

    def _capture(self, bucket: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.cuda.CUDAGraph]:
        static_in = torch.zeros((bucket, *x.shape[1:]), device=x.device, dtype=x.dtype)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self.module(static_in)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            static_out = self.module(static_in)
        return static_in, static_out, graph


@dataclass
class ImageOutput:
    """One image's prediction: its task, how sure the router is, class probabilities."""

    task: int
    task_probability: float
    source: Source
    probabilities: torch.Tensor  # (num_classes,) on CPU


class EngineInfo:
    """What the server needs to know about a loaded bundle without touching its weights:
    version, tasks, classes, preprocessing (shared by :class:`Engine` and the process proxy)."""

    def __init__(self, bundle: Bundle, device: str | torch.device):
        self.models = BundleModels(bundle)
        self.bundle = bundle
        self.version = bundle.version
        self.method = bundle.manifest.method
        self.kind = self.models.kind
        self.tasks = self.models.tasks
        self.class_names = self.models.class_names
        self.preprocessing: Preprocessing = self.models.preprocessing
        self.gate_preprocessing: Preprocessing | None = self.models.gate_preprocessing if self.models.has_gate else None
        self.device = device if isinstance(device, torch.device) else resolve_device(device)

    @property
    def has_gate(self) -> bool:
        return self.gate_preprocessing is not None

    @property
    def alive(self) -> bool:
        return True

    def task_index(self, name: str) -> int:
        return self.tasks.index(name)

    def preprocess(self, image: np.ndarray, need_gate: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """uint8 ``(H, W[, C])`` -> the ViT's input ``(C, S, S)`` (+ the gate's when needed)."""
        return preprocess_image(image, self.preprocessing, self.gate_preprocessing if need_gate else None)


class Engine(EngineInfo):
    """Routes, groups and classifies batches with one bundle's weights."""

    def __init__(
        self,
        bundle: Bundle,
        device: str | torch.device = "cpu",
        cache_bytes: int = 512 * 2**20,
        strategy: Literal["exact", "sparse"] = "sparse",
        threshold: float | None = None,
        on_cache_lookup: Callable[[bool], None] | None = None,
        cuda_graphs: bool = True,
    ):
        super().__init__(bundle, device)
        self.strategy = strategy
        self.threshold = DEFAULT_SPARSE_THRESHOLD if threshold is None else threshold
        self.cache = WeightCache(cache_bytes, on_cache_lookup)
        dev = self.device
        self.heads: list[tuple[torch.Tensor, torch.Tensor]] = []
        for t in self.tasks:
            head = self.models.head(t)
            self.heads.append((head["head.weight"].float().to(dev), head["head.bias"].float().to(dev)))
        self.use_graphs = cuda_graphs and self.device.type == "cuda"
        self._graph_pool = torch.cuda.graph_pool_handle() if self.use_graphs else None
        self.gate: nn.Module | None = self.models.gate_model().to(dev) if self.models.has_gate else None
        self._gate_run = self._graphed(self.gate) if self.gate is not None else None
        self.template: nn.Module | None = None
        self.gated: GatedViT | None = None
        if self.kind == "gated":
            b = bundle
            heads = [self.models.head(t) for t in self.tasks]
            self.gated = GatedViT(self.models.architecture, dict(b.tensors("backbone")), dict(b.tensors("experts")), heads).to(dev)
        elif self.kind == "static":
            self.template = self._template({k: v.to(dev) for k, v in bundle.tensors("backbone").items()})
            self._template_run = self._graphed(self.template)
        else:
            self._init_emr(bundle)

    # -- building blocks -----------------------------------------------------------
    def _graphed(self, module: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
        """``module`` itself, or on CUDA a :class:`GraphRunner` over it (fixed weights only)."""
        return GraphRunner(module, self._graph_pool) if self.use_graphs else module

    def _template(self, weights: Weights) -> nn.Module:
        """A headless timm model whose parameters ARE ``weights`` (assigned, not copied)."""
        model = build_model(self.models.architecture, 0)
        model.load_state_dict(weights, strict=True, assign=True)
        return model.to(self.device).eval().requires_grad_(False)

    def _init_emr(self, bundle: Bundle) -> None:
        """Flat device buffers: ``theta_0``, ``tau_uni`` and each task's packed mask as ONE tensor each,
        so materialising a task is a handful of kernels, not a few per tensor."""
        tau = bundle.tensors("tau_unified")
        base = bundle.tensors("base")
        masks = bundle.tensors("masks")
        self._keys = list(tau)
        self._shapes = [tuple(tau[k].shape) for k in self._keys]
        self._numels = [tau[k].numel() for k in self._keys]
        dev = self.device
        self._base_flat = torch.cat([base[k].float().reshape(-1) for k in self._keys]).to(dev)
        self._tau_flat = torch.cat([tau[k].float().reshape(-1) for k in self._keys]).to(dev)
        self._masks_flat = [pack_mask(torch.cat([unpack_mask(masks[f"{t}/{k}"], s).reshape(-1) for k, s in zip(self._keys, self._shapes)])).to(dev) for t in self.tasks]
        self._lams = [self.models.rescaler(t) for t in self.tasks]
        with torch.device("meta"):
            self._meta_model = build_model(self.models.architecture, 0).eval().requires_grad_(False)
        missing = set(self._meta_model.state_dict()) - set(self._keys)
        if missing:
            raise ValueError(f"bundle {self.version}: tau_unified lacks {sorted(missing)[:3]}")
        self._model_bytes = 4 * self._tau_flat.numel()
        self._scratch = copy.deepcopy(self._meta_model)  # reused when the cache cannot hold a task

    def task_module(self, task: int) -> Callable[[torch.Tensor], torch.Tensor]:
        """EMR: a headless model running task ``task``'s weights ``theta_0 + lam_t M_t tau_uni``.

        Cached (LRU) when one task's weights fit the budget; otherwise the weights are
        materialised into a reusable scratch module (parameters reassigned, no copy).
        """
        if self._model_bytes > self.cache.budget:
            self.cache.record_miss()
            self._scratch.load_state_dict(self._materialise(task), strict=True, assign=True)
            return self._scratch  # weights change every call: never graphed
        return self.cache.get(self.tasks[task], lambda: self._task_module(task))._vitmerge_run

    def _materialise(self, task: int) -> Weights:
        """Task ``task``'s backbone as views of one flat tensor."""
        n = self._tau_flat.numel()
        mask = unpack_mask(self._masks_flat[task], (n,), torch.float32)
        flat = torch.addcmul(self._base_flat, mask, self._tau_flat, value=self._lams[task])
        return {k: v.view(s) for k, v, s in zip(self._keys, flat.split(self._numels), self._shapes)}

    def _task_module(self, task: int) -> nn.Module:
        model = copy.deepcopy(self._meta_model)  # structure only: parameters live on the meta device
        model.load_state_dict(self._materialise(task), strict=True, assign=True)
        # plain attribute (not a registered submodule): graphs die with the module when the cache evicts it
        object.__setattr__(model, "_vitmerge_run", self._graphed(model))
        return model

    # -- preprocessing (called from request threads) --------------------------------

    # -- the hot path ---------------------------------------------------------------
    @torch.inference_mode()
    def route(self, given: Sequence[int | None], x_gate: torch.Tensor | None) -> tuple[torch.Tensor, list[Source]]:
        """``p`` ``(B, N)``: one-hot for given tasks, the gate's softmax for the rest."""
        p = torch.zeros(len(given), len(self.tasks), device=self.device)
        sources: list[Source] = []
        routed = [i for i, g in enumerate(given) if g is None]
        for i, g in enumerate(given):
            sources.append("gate" if g is None else "given")
            if g is not None:
                p[i, g] = 1.0
        if routed:
            if self.gate is None:
                raise ValueError(f"bundle {self.version} has no gate: name the task")
            if x_gate is None or x_gate.shape[0] != len(routed):
                raise ValueError(f"expected gate input for {len(routed)} images")
            assert self._gate_run is not None
            p[routed] = self._gate_run(x_gate.to(self.device).contiguous(memory_format=torch.channels_last)).float().softmax(-1)
        return p, sources

    @torch.inference_mode()
    def features(self, x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        """Pre-logit features ``(B, D)``, each image with its routed weights."""
        if self.gated is not None:
            return self.gated.features(x, p, self.strategy, self.threshold)
        if self.kind == "static":
            return self._template_run(x)
        tasks = p.argmax(1).cpu()
        groups = _groups(tasks)
        if len(groups) == 1:
            return self.task_module(groups[0][0])(x)
        out = None
        for t, idx in groups:
            y = self.task_module(t)(x[idx.to(x.device)])
            if out is None:
                out = torch.empty(x.shape[0], y.shape[1], device=y.device, dtype=y.dtype)
            out[idx.to(x.device)] = y
        assert out is not None
        return out

    @torch.inference_mode()
    def predict(self, x: torch.Tensor, given: Sequence[int | None], x_gate: torch.Tensor | None = None) -> list[ImageOutput]:
        """Classify a batch ``x`` ``(B, C, S, S)``; ``given[i]`` is image i's task or None (gate)."""
        if x.shape[0] != len(given):
            raise ValueError(f"{x.shape[0]} images but {len(given)} task entries")
        x = x.to(self.device, non_blocking=True)
        p, sources = self.route(given, x_gate)
        feats = self.features(x, p)
        best_p, best = p.max(1)
        tasks = best.cpu()
        outs = []
        groups = _groups(tasks)
        for t, idx in groups:
            w, b = self.heads[t]
            outs.append(F.linear(feats[idx.to(feats.device)], w, b).float().softmax(-1).reshape(-1))
        host = torch.cat([best_p.float(), *outs]).cpu()  # one device->host copy per batch
        task_prob, flat = host[: len(tasks)], host[len(tasks) :]
        probs: list[torch.Tensor] = [torch.empty(0)] * x.shape[0]
        offset = 0
        for t, idx in groups:
            k = self.heads[t][0].shape[0]
            block = flat[offset : offset + k * len(idx)].view(len(idx), k)
            offset += k * len(idx)
            for j, i in enumerate(idx.tolist()):
                probs[i] = block[j]
        tasks_list = tasks.tolist()
        return [ImageOutput(tasks_list[i], float(task_prob[i]), sources[i], probs[i]) for i in range(x.shape[0])]

    # -- lifecycle ------------------------------------------------------------------
    def warmup(self) -> None:
        """One forward per task (and through the gate) so the first request is not slow."""
        prep = self.preprocessing
        x = torch.zeros(len(self.tasks), prep.channels, prep.size, prep.size)
        self.predict(x, list(range(len(self.tasks))))
        if self.gate_preprocessing is not None:
            gp = self.gate_preprocessing
            self.predict(x[:1], [None], torch.zeros(1, gp.channels, gp.size, gp.size))

    def resident_bytes(self) -> dict[str, int]:
        """Bytes of tensors this engine holds, by part (weights cache included)."""
        parts: dict[str, int] = {"heads": sum(weights_nbytes({"w": w, "b": b}) for w, b in self.heads)}
        if self.gate is not None:
            parts["gate"] = sum(t.numel() * t.element_size() for t in self.gate.state_dict().values())
        if self.gated is not None:
            parts["gated_vit"] = sum(t.numel() * t.element_size() for t in self.gated.vit.state_dict().values())
        elif self.kind == "static":
            assert self.template is not None
            parts["backbone"] = sum(t.numel() * t.element_size() for t in self.template.state_dict().values())
        else:
            parts["base"] = self._base_flat.numel() * 4
            parts["tau_unified"] = self._tau_flat.numel() * 4
            parts["masks"] = sum(m.numel() for m in self._masks_flat)
            parts["weight_cache"] = self.cache.nbytes
        return parts
