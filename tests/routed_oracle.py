"""A test oracle for the serving Engine: routed inference written the plain way (SPEC sections 3-4).

Not used by the server: tests compare :class:`server.runtime.engine.Engine` with it.

* EMR and static bundles: ``t = argmax p(x)`` per image, images grouped by task,
  each group runs task t's weights (EMR: ``theta_0 + lam_t M_t tau_uni``) and head t.
* gated bundles: :class:`server.runtime.gated_vit.GatedViT` mixes the gated tensors per
  image with ``p(x)`` (``exact`` or ``sparse``) and applies head ``argmax p``.

A request that names its task skips the gate. Per-task models are standalone timm
models with ``theta_0 + lam_t M_t tau_uni`` loaded (:meth:`BundleReader.build`), built once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from server.runtime.bundle_reader import BundleReader
from server.runtime.gated_vit import DEFAULT_SPARSE_THRESHOLD, GatedViT
from server.runtime.groups import task_groups


@dataclass
class Routed:
    """Per image: task index, the task probability, and the logits of that task's head."""

    tasks: torch.Tensor
    task_probability: torch.Tensor
    logits: list[torch.Tensor]


class RoutedModel:
    """Gate + per-task weights of one bundle, with per-image routing."""

    def __init__(
        self,
        models: BundleReader,
        mixing: Literal["exact", "sparse"] = "sparse",
        threshold: float = DEFAULT_SPARSE_THRESHOLD,
    ):
        self.models = models
        self.mixing, self.threshold = mixing, threshold
        self.gate: nn.Module | None = models.gate_model() if models.has_gate else None
        self._task_models: dict[str, nn.Module] = {}
        self.gated: GatedViT | None = None
        if models.kind == "gated":
            self.gated = GatedViT.from_bundle(models)

    def task_model(self, task: str) -> nn.Module:
        if task not in self._task_models:
            self._task_models[task] = self.models.build(task)
        return self._task_models[task]

    @torch.inference_mode()
    def route(self, x_gate: torch.Tensor) -> torch.Tensor:
        """``p(x)`` per image, ``(B, N)``."""
        if self.gate is None:
            raise ValueError(f"bundle {self.models.bundle.version} has no gate: name the task")
        return self.gate(x_gate.contiguous(memory_format=torch.channels_last)).softmax(-1)

    @torch.inference_mode()
    def classify(self, x: torch.Tensor, x_gate: torch.Tensor | None = None, task: str | None = None) -> Routed:
        """Classify a batch: with ``task`` given for all images, or routed by the gate."""
        n = len(self.models.tasks)
        if task is not None:
            i = self.models.tasks.index(task)
            p = torch.zeros(x.shape[0], n)
            p[:, i] = 1.0
        else:
            if x_gate is None:
                raise ValueError("routing needs the gate's input (x_gate) or a task")
            p = self.route(x_gate)
        tasks = p.argmax(1)
        if self.gated is not None:
            out = self.gated.classify(x, p, self.mixing, self.threshold)
            return Routed(out.tasks, p.gather(1, out.tasks[:, None]).squeeze(1), out.logits)
        logits: list[torch.Tensor] = [torch.empty(0)] * x.shape[0]
        for t, idx in task_groups(tasks):
            out = self.task_model(self.models.tasks[t])(x[idx])
            for j, k in enumerate(idx.tolist()):
                logits[k] = out[j]
        return Routed(tasks, p.gather(1, tasks[:, None]).squeeze(1), logits)
