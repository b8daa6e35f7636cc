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

from collections.abc import Callable, Sequence
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from model_store.bundle import Bundle
from model_store.data.preprocessing import to_model_input
from model_store.schema import Preprocessing
from server.runtime.bundle_reader import BundleReader
from server.runtime.cuda_graphs import GraphRunner
from server.runtime.gated_vit import DEFAULT_SPARSE_THRESHOLD
from server.runtime.groups import task_groups
from server.runtime.protocol import ImageOutput, Source
from server.runtime.strategies import STRATEGIES, KindStrategy, StrategyContext, tensor_bytes
from server.runtime.weight_cache import WeightCache, weights_nbytes


def preprocess_image(
    image: np.ndarray, prep: Preprocessing, gate_prep: Preprocessing | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One uint8 image -> the ViT's input ``(C, S, S)`` and, when ``gate_prep`` is given, the gate's."""
    batch = image[None]
    x = to_model_input(batch, prep)[0]
    return x, (to_model_input(batch, gate_prep)[0] if gate_prep is not None else None)


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; otherwise the named device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device '{name}' requested but CUDA is not available")
    return device


class EngineFrontend:
    """What the server needs to know about a loaded bundle without touching its weights:
    version, tasks, classes, preprocessing (shared by :class:`Engine` and the process proxy)."""

    def __init__(self, bundle: Bundle, device: str | torch.device):
        self.models = BundleReader(bundle)
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


class Engine(EngineFrontend):
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
        ctx = StrategyContext(self.models, self.device, self.cache, self._graphed, strategy, self.threshold)
        self.kind_strategy: KindStrategy = STRATEGIES[self.kind](ctx)

    def _graphed(self, module: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
        """``module`` itself, or on CUDA a :class:`GraphRunner` over it (fixed weights only)."""
        return GraphRunner(module, self._graph_pool) if self.use_graphs else module

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
            p[routed] = (
                self._gate_run(x_gate.to(self.device).contiguous(memory_format=torch.channels_last)).float().softmax(-1)
            )
        return p, sources

    @torch.inference_mode()
    def features(self, x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        """Pre-logit features ``(B, D)``, each image with its routed weights."""
        return self.kind_strategy.features(x, p)

    @torch.inference_mode()
    def predict(
        self, x: torch.Tensor, given: Sequence[int | None], x_gate: torch.Tensor | None = None
    ) -> list[ImageOutput]:
        """Classify a batch ``x`` ``(B, C, S, S)``; ``given[i]`` is image i's task or None (gate)."""
        if x.shape[0] != len(given):
            raise ValueError(f"{x.shape[0]} images but {len(given)} task entries")
        x = x.to(self.device, non_blocking=True)
        p, sources = self.route(given, x_gate)
        feats = self.features(x, p)
        best_p, best = p.max(1)
        tasks = best.cpu()
        outs = []
        groups = task_groups(tasks)
        for t, idx in groups:
            w, b = self.heads[t]
            outs.append(F.linear(feats[idx.to(feats.device)], w, b).float().softmax(-1).reshape(-1))
        rows, cols = len(tasks), len(self.tasks)  # p: (images, tasks)
        host = torch.cat([best_p.float(), p.float().reshape(-1), *outs]).cpu()  # one device->host copy per batch
        task_prob, p_host = host[:rows], host[rows : rows * (1 + cols)].view(rows, cols)
        flat = host[rows * (1 + cols) :]
        probs: list[torch.Tensor] = [torch.empty(0)] * x.shape[0]
        offset = 0
        for t, idx in groups:
            k = self.heads[t][0].shape[0]
            block = flat[offset : offset + k * len(idx)].view(len(idx), k)
            offset += k * len(idx)
            for j, i in enumerate(idx.tolist()):
                probs[i] = block[j]
        tasks_list = tasks.tolist()
        return [
            ImageOutput(tasks_list[i], float(task_prob[i]), sources[i], probs[i], p_host[i]) for i in range(x.shape[0])
        ]

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
            parts["gate"] = tensor_bytes(self.gate)
        return {**parts, **self.kind_strategy.resident_bytes()}
