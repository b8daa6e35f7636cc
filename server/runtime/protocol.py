"""What the HTTP server needs from an inference engine: the in-process :class:`~server.runtime.engine.Engine`
and the :class:`~server.runtime.worker.ProcessEngine` both satisfy :class:`InferenceEngine`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np
import torch

from model_store.errors import ImageDecodeError
from model_store.schema import BundleKind, Preprocessing
from server.runtime.inputs import DecodeOptions, ImageInput

#: how an image's task was decided: ``gate`` = by the bundle's router (the CNN gate or the backbone router), or given
Source = Literal["gate", "given"]


@dataclass
class ImageOutput:
    """One image's prediction: its task, how sure the router is, class probabilities."""

    task: int
    task_probability: float
    source: Source
    probabilities: torch.Tensor  # (num_classes,) on CPU
    task_probabilities: torch.Tensor  # (num_tasks,) on CPU: the router's p(x), one-hot when the task is given


@dataclass
class BatchRun:
    """A batch of :class:`ImageInput` run: each input's output (or its decode error) and where the time went."""

    outputs: list[ImageOutput | ImageDecodeError]
    prepare_s: float  # decode + preprocess of the whole batch
    predict_s: float  # the engine's forward (routing, features, heads)


class InferenceEngine(Protocol):
    """A loaded bundle that classifies batches: metadata and preprocessing here, ``predict`` wherever it runs."""

    version: str
    method: str
    kind: BundleKind
    tasks: list[str]
    class_names: dict[str, list[str]]
    preprocessing: Preprocessing
    task_preprocessing: list[Preprocessing]
    input_variants: list[Preprocessing]
    gate_preprocessing: Preprocessing | None
    router_kind: Literal["gate", "backbone"] | None
    device: torch.device

    @property
    def has_gate(self) -> bool: ...

    @property
    def has_router(self) -> bool: ...

    @property
    def alive(self) -> bool: ...

    def task_index(self, name: str) -> int: ...

    def preprocess(self, image: np.ndarray, task: int | None) -> tuple[torch.Tensor, torch.Tensor | None]: ...

    def predict(
        self, x: torch.Tensor, given: Sequence[int | None], x_gate: torch.Tensor | None = None
    ) -> list[ImageOutput]: ...

    def run(self, inputs: Sequence[ImageInput], options: DecodeOptions) -> BatchRun: ...

    def warmup(self) -> None: ...

    def resident_bytes(self) -> dict[str, int]: ...
