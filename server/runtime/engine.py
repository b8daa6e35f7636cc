"""The inference engine: one loaded bundle on one device -- the only inference path (server, eval, benchmarks).

:meth:`EngineFrontend.prepare` turns uint8 images into the engine's input with each task's own
preprocessing (:mod:`model_store.data.preprocessing`); ``predict`` takes such a batch, each image
with a given task or none:

1. **route** -- images without a task go through the bundle's router, ``p(x)`` per image (never
   averaged over the batch): the CNN gate (on its own input ``x_gate``), or the backbone router
   (SPEC section 8) on ``x`` itself -- ``rerun``: ``theta_0``'s blocks ``1..k`` and the head before the
   strategy; ``shared_prefix``: the low-rank pass runs its shared prefix for the whole batch, the head
   reads its tokens, and the pass continues per routed task. Given tasks get a one-hot ``p``;
2. **features** -- the bundle kind's strategy (:mod:`server.runtime.strategies`: ``static``,
   ``emr``, ``gated``, ``lowrank``) runs each image with its routed task's weights;
3. **head** -- each image gets the classifier of its task.

The engine never writes to the bundle's tensors; a hot swap builds a new engine.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from model_store.backbone_router import RouterHead, pool_tokens
from model_store.bundle import Bundle
from model_store.data.preprocessing import Images, to_model_input
from model_store.devices import resolve_device
from model_store.errors import ImageDecodeError
from model_store.schema import Preprocessing
from server.runtime.bundle_reader import BundleReader
from server.runtime.cuda_graphs import GraphRunner
from server.runtime.gated_vit import DEFAULT_SPARSE_THRESHOLD, Mixing
from server.runtime.groups import task_groups
from server.runtime.inputs import DecodeOptions, ImageInput, decode_pool, prepare_batch
from server.runtime.protocol import BatchRun, ImageOutput, Source
from server.runtime.strategies import STRATEGIES, KindStrategy, LowRankStrategy, StrategyContext, tensor_bytes
from server.runtime.weight_cache import WeightCache, weights_nbytes


def distinct_preprocessing(per_task: Sequence[Preprocessing]) -> tuple[list[Preprocessing], list[int]]:
    """The distinct input preprocessings of a bundle's tasks (the bundle's own first) and each task's index."""
    variants: list[Preprocessing] = []
    index: list[int] = []
    for prep in per_task:
        found = next((i for i, v in enumerate(variants) if v.pixels_equal(prep)), None)
        if found is None:
            variants.append(prep)
            found = len(variants) - 1
        index.append(found)
    return variants, index


#: the LRU budget of materialised per-task weights (EMR) by default
DEFAULT_CACHE_BYTES = 512 * 2**20


@dataclass(frozen=True)
class EngineOptions:
    """How an engine runs its bundle: one object for :class:`Engine`, the process worker and its child.

    ``device``: ``auto`` (CUDA when available), ``cpu``, ``cuda``, ``cuda:N``; ``cache_bytes``: the LRU
    budget of materialised per-task weights (0: rebuild every batch); ``mixing``/``threshold``: how a gated
    bundle mixes its experts per image (``threshold`` None: :data:`DEFAULT_SPARSE_THRESHOLD`);
    ``cuda_graphs``: on CUDA, replay graphs of fixed-weight modules; ``malloc_reuse``: the process worker's
    child tunes glibc malloc (:func:`model_store.memory.reuse_freed_memory`); ``torch_threads``: the process
    worker's child sets its intra-op threads (None: torch's default; the thread worker's server sets its own).
    """

    device: str = "cpu"
    cache_bytes: int = DEFAULT_CACHE_BYTES
    mixing: Mixing = "sparse"
    threshold: float | None = None
    cuda_graphs: bool = True
    malloc_reuse: bool = False
    torch_threads: int | None = None

    @classmethod
    def of(cls, value: EngineOptions | str | torch.device) -> EngineOptions:
        """``value`` itself, or the default options on the device it names."""
        return value if isinstance(value, EngineOptions) else cls(device=str(value))


class EngineFrontend:
    """What the server needs to know about a loaded bundle without touching its weights:
    version, tasks, classes, preprocessing (shared by :class:`Engine` and the process proxy)."""

    def __init__(self, bundle: Bundle, options: EngineOptions | str | torch.device = "cpu"):
        self.options = EngineOptions.of(options)
        self.models = BundleReader(bundle)
        self.bundle = bundle
        self.version = bundle.version
        self.method = bundle.manifest.method
        self.kind = self.models.kind
        self.tasks = self.models.tasks
        self.class_names = self.models.class_names
        self.preprocessing: Preprocessing = self.models.preprocessing
        self.task_preprocessing: list[Preprocessing] = self.models.spec.task_preprocessing()
        self.gate_preprocessing: Preprocessing | None = self.models.gate_preprocessing if self.models.has_gate else None
        #: how images without a task are routed: a CNN ``gate``, a ``backbone`` router, or not at all (None)
        self.router_kind = self.models.spec.router_kind
        self.device = resolve_device(self.options.device)
        variants, index = distinct_preprocessing([self.preprocessing, *self.task_preprocessing])
        #: the distinct model-input preprocessings (the bundle's first) and each task's among them: a routed
        #: image is prepared once per variant, and gets its routed task's after routing (one variant: 4-D input)
        self.input_variants: list[Preprocessing] = variants
        self.task_variant: list[int] = index[1:]

    @property
    def has_gate(self) -> bool:
        """Whether routed images need the CNN gate's own input (``x_gate``)."""
        return self.gate_preprocessing is not None

    @property
    def has_router(self) -> bool:
        """Whether images may come without a task (the bundle has a gate or a backbone router)."""
        return self.router_kind is not None

    @property
    def alive(self) -> bool:
        return True

    def task_index(self, name: str) -> int:
        return self.tasks.index(name)

    def prepare(self, images: Images, task: int | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """uint8 images (a batch, or a list of any sizes) -> the engine's input for ``task`` (None: routed).

        Returns ``(x, x_gate)``: ``x`` is ``(B, C, S, S)``, or ``(B, V, C, S, S)`` with one slice per input
        variant when the tasks differ in preprocessing (a given task's input in every slice; a routed image's
        once per variant, chosen after routing); ``x_gate`` the CNN gate's input for routed images, else None
        (a backbone router reads ``x``: the bundle's own preprocessing, slice 0).
        """
        if isinstance(task, bool):  # the old ``need_gate`` flag would read as task 0 or 1
            raise TypeError("prepare/preprocess take a task index or None (routed), not a bool")
        if task is not None:
            x = to_model_input(images, self.task_preprocessing[task])
            if len(self.input_variants) > 1:
                x = x.unsqueeze(1).expand(-1, len(self.input_variants), -1, -1, -1)
            return x, None
        xs = [to_model_input(images, prep) for prep in self.input_variants]
        x = xs[0] if len(xs) == 1 else torch.stack(xs, 1)
        gate = to_model_input(images, self.gate_preprocessing) if self.gate_preprocessing is not None else None
        return x, gate

    def preprocess(self, image: np.ndarray, task: int | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One uint8 ``(H, W[, C])`` image -> :meth:`prepare`'s ``(x, x_gate)`` without the batch dimension."""
        x, gate = self.prepare(image[None], task)
        return x[0], (gate[0] if gate is not None else None)


class Engine(EngineFrontend):
    """Routes, groups and classifies batches with one bundle's weights.

    ``options``: an :class:`EngineOptions`, or just a device (the default options there);
    ``on_cache_lookup(hit)``: called on every lookup of the per-task weight cache (metrics).
    """

    def __init__(
        self,
        bundle: Bundle,
        options: EngineOptions | str | torch.device = "cpu",
        on_cache_lookup: Callable[[bool], None] | None = None,
    ):
        super().__init__(bundle, options)
        opts = self.options
        self.mixing = opts.mixing
        self.threshold = DEFAULT_SPARSE_THRESHOLD if opts.threshold is None else opts.threshold
        self.cache = WeightCache(opts.cache_bytes, on_cache_lookup)
        dev = self.device
        self.heads: list[tuple[torch.Tensor, torch.Tensor]] = []
        for t in self.tasks:
            head = self.models.head(t)
            self.heads.append((head["head.weight"].float().to(dev), head["head.bias"].float().to(dev)))
        self.use_graphs = opts.cuda_graphs and self.device.type == "cuda"
        self._graph_pool = torch.cuda.graph_pool_handle() if self.use_graphs else None
        self.gate: nn.Module | None = self.models.gate_model().to(dev) if self.models.has_gate else None
        self._gate_run = self._graphed(self.gate) if self.gate is not None else None
        self._variant_of = torch.tensor(self.task_variant, device=dev)
        ctx = StrategyContext(self.models, self.device, self.cache, self._graphed, self.mixing, self.threshold)
        self.kind_strategy: KindStrategy = STRATEGIES[self.kind](ctx)
        #: the backbone router: the whole module (``rerun``) or, with a shared prefix, its head only
        self.router: nn.Module | None = None
        self.router_head: RouterHead | None = None
        self._router_run: Callable[[torch.Tensor], torch.Tensor] | None = None
        self._router_shared: set[int] = set()  # data pointers of the tensors the router shares with the strategy
        if self.models.spec.router is not None:
            self._load_router()

    def _load_router(self) -> None:
        """The backbone router on the device; its prefix shares ``theta_0``'s tensors the strategy holds."""
        if self.models.router_spec.variant == "shared_prefix":
            if not isinstance(self.kind_strategy, LowRankStrategy) or not self.kind_strategy.prefix_blocks:
                raise ValueError(f"bundle {self.version}: a shared-prefix router needs a lowrank bundle")
            self.router_head = self.models.router_head().to(self.device)
            return
        shared = self.kind_strategy.shared_weights() if hasattr(self.kind_strategy, "shared_weights") else {}
        self.router = self.models.router_model(shared).to(self.device)
        self._router_shared = {t.data_ptr() for t in shared.values()}
        self._router_run = self._graphed(self.router)

    def _graphed(self, module: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
        """``module`` itself, or on CUDA a :class:`GraphRunner` over it (fixed weights only)."""
        return GraphRunner(module, self._graph_pool) if self.use_graphs else module

    # -- the hot path ---------------------------------------------------------------
    def _given(self, given: Sequence[int | None]) -> tuple[torch.Tensor, list[Source], list[int]]:
        """One-hot ``p`` rows for the given tasks (zeros for the rest), each image's source, the routed rows."""
        p = torch.zeros(len(given), len(self.tasks), device=self.device)
        sources: list[Source] = []
        for i, g in enumerate(given):
            sources.append("gate" if g is None else "given")
            if g is not None:
                p[i, g] = 1.0
        routed = [i for i, g in enumerate(given) if g is None]
        if routed and not self.has_router:
            raise ValueError(f"bundle {self.version} has no gate: name the task")
        return p, sources, routed

    @torch.inference_mode()
    def route(
        self, given: Sequence[int | None], x_gate: torch.Tensor | None = None, x: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, list[Source]]:
        """``p`` ``(B, N)``: one-hot for given tasks, the router's softmax for the rest (the CNN gate reads
        ``x_gate``, one row per routed image; a backbone router the routed rows of ``x``)."""
        p, sources, routed = self._given(given)
        if not routed:
            return p, sources
        if self.gate is not None:
            if x_gate is None or x_gate.shape[0] != len(routed):
                raise ValueError(f"expected gate input for {len(routed)} images")
            assert self._gate_run is not None
            p[routed] = (
                self._gate_run(x_gate.to(self.device).contiguous(memory_format=torch.channels_last)).float().softmax(-1)
            )
            return p, sources
        if x is None or x.shape[0] != len(given):
            raise ValueError(f"the backbone router reads the images: expected x of {len(given)} images")
        rows = torch.tensor(routed, device=self.device)
        xr = (x[:, 0] if x.ndim == 5 else x).to(self.device)[rows]  # the bundle's own preprocessing
        if self._router_run is not None:
            p[rows] = self._router_run(xr).float().softmax(-1)
        else:
            p[rows] = self._head_probabilities(self._low_rank.prefix(xr))
        return p, sources

    @property
    def _low_rank(self) -> LowRankStrategy:
        assert isinstance(self.kind_strategy, LowRankStrategy)
        return self.kind_strategy

    def _head_probabilities(self, tokens: torch.Tensor) -> torch.Tensor:
        """The shared-prefix router's ``p`` from the prefix's tokens after block k."""
        assert self.router_head is not None
        return self.router_head(pool_tokens(tokens)).float().softmax(-1)

    def _shared_prefix_pass(
        self, x: torch.Tensor, given: Sequence[int | None]
    ) -> tuple[torch.Tensor, list[Source], torch.Tensor]:
        """Routing and features in ONE pass (a shared-prefix router): the prefix for the whole batch, ``p`` of the
        routed rows from its tokens, then the rest per routed task. Returns ``(p, sources, features)``."""
        p, sources, routed = self._given(given)
        tokens = self._low_rank.prefix(x[:, 0] if x.ndim == 5 else x)
        if routed:
            rows = torch.tensor(routed, device=self.device)
            p[rows] = self._head_probabilities(tokens[rows])
        if x.ndim == 5:  # a routed image whose task has its own preprocessing: its prefix again, on that input
            variant = self._variant_of[p.argmax(1)]
            redo = (variant != 0).nonzero().flatten()  # a host sync, only for bundles whose tasks differ in input
            if len(redo):
                tokens[redo] = self._low_rank.prefix(x[redo, variant[redo]])
        return p, sources, self._low_rank.features_after(tokens, p)

    @torch.inference_mode()
    def features(self, x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        """Pre-logit features ``(B, D)``, each image with its routed weights."""
        return self.kind_strategy.features(x, p)

    @torch.inference_mode()
    def all_head_logits(self, x: torch.Tensor, task: int) -> list[torch.Tensor]:
        """Every task head's logits (one ``(B, classes)`` per task) on features made with ``task``'s weights:
        the task-free "joint" accuracy (argmax over every head, FS-Merge Tables 3-4) reads them."""
        if x.ndim == 5:
            x = x[:, self.task_variant[task]]
        p = torch.zeros(x.shape[0], len(self.tasks), device=self.device)
        p[:, task] = 1.0
        feats = self.features(x.to(self.device), p)
        return [F.linear(feats, w, b).float().cpu() for w, b in self.heads]

    @torch.inference_mode()
    def predict(
        self, x: torch.Tensor, given: Sequence[int | None], x_gate: torch.Tensor | None = None
    ) -> list[ImageOutput]:
        """Classify a batch ``x`` (:meth:`prepare`'s: ``(B, C, S, S)`` or ``(B, V, C, S, S)``); ``given[i]`` is
        image i's task or None (routed)."""
        if x.shape[0] != len(given):
            raise ValueError(f"{x.shape[0]} images but {len(given)} task entries")
        x = x.to(self.device, non_blocking=True)
        if self.router_head is not None:  # a shared prefix: the router's pass is every image's prefix
            p, sources, feats = self._shared_prefix_pass(x, given)
            best_p, best = p.max(1)
        else:
            p, sources = self.route(given, x_gate, x)
            best_p, best = p.max(1)
            if x.ndim == 5:  # tasks differ in preprocessing: each image's routed task's input
                x = x[torch.arange(x.shape[0], device=x.device), self._variant_of[best].to(x.device)]
            feats = self.features(x, p)
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

    def run(self, inputs: Sequence[ImageInput], options: DecodeOptions | None = None) -> BatchRun:
        """Requests' images as they arrived -> each one's output or decode error: the batch decoded and
        preprocessed at once (:mod:`server.runtime.inputs`), then one :meth:`predict`."""
        t0 = time.perf_counter()
        batch = prepare_batch(self, inputs, options or DecodeOptions(), decode_pool())
        t1 = time.perf_counter()
        outs = iter(self.predict(batch.x, batch.given, batch.x_gate) if batch.x is not None else [])
        outputs: list[ImageOutput | ImageDecodeError] = [e if e is not None else next(outs) for e in batch.errors]
        return BatchRun(outputs, t1 - t0, time.perf_counter() - t1)

    # -- lifecycle ------------------------------------------------------------------
    def warmup(self) -> None:
        """One forward per task (and through the router) so the first request is not slow."""
        prep = self.preprocessing
        x = torch.zeros(len(self.tasks), prep.channels, prep.size, prep.size)
        if len(self.input_variants) > 1:
            x = x.unsqueeze(1).expand(-1, len(self.input_variants), -1, -1, -1)
        self.predict(x, list(range(len(self.tasks))))
        if self.gate_preprocessing is not None:
            gp = self.gate_preprocessing
            self.predict(x[:1], [None], torch.zeros(1, gp.channels, gp.size, gp.size))
        elif self.has_router:
            self.predict(x[:1], [None])

    def resident_bytes(self) -> dict[str, int]:
        """Bytes of tensors this engine holds, by part (weights cache included)."""
        parts: dict[str, int] = {"heads": sum(weights_nbytes({"w": w, "b": b}) for w, b in self.heads)}
        if self.gate is not None:
            parts["gate"] = tensor_bytes(self.gate)
        router = self.router if self.router is not None else self.router_head
        if router is not None:  # what the router holds beyond the tensors it shares with the strategy
            own = [t for t in router.state_dict().values() if t.data_ptr() not in self._router_shared]
            parts["router"] = sum(t.numel() * t.element_size() for t in own)
        return {**parts, **self.kind_strategy.resident_bytes()}
