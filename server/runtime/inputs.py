"""A batch of request images -> the engine's input: decode and preprocess once per batch, where inference runs.

The HTTP layer queues each image as it arrived (:class:`ImageInput`: encoded bytes, or pixels a client
already preprocessed); the inference worker turns a whole batch into ``predict``'s ``(x, given, x_gate)``
at once: every image decoded (Pillow, in parallel threads when the batch is large), then ONE
:meth:`~server.runtime.engine.EngineFrontend.prepare` call per task among them (the uint8 kernels run
batched per size) instead of one per image. What is computed is exactly
:meth:`~server.runtime.engine.EngineFrontend.preprocess` of each image; an image that does not decode
fails alone (its error is returned in its place), the rest of the batch runs.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from model_store.data.decode import DEFAULT_MAX_PIXELS, decode_image
from model_store.errors import ImageDecodeError


class Preparer(Protocol):
    """What :func:`prepare_batch` needs of an engine (:class:`~server.runtime.engine.EngineFrontend` is one)."""

    @property
    def input_variants(self) -> Sequence[object]: ...

    def prepare(self, images: Sequence[np.ndarray], task: int | None) -> tuple[torch.Tensor, torch.Tensor | None]: ...


#: a batch whose encoded images add up to more than this is decoded on several threads (Pillow frees the GIL)
PARALLEL_DECODE_BYTES = 256 * 1024
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def decode_pool() -> ThreadPoolExecutor:
    """The process's decode threads (one pool for every engine; created on first use)."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(min(4, os.cpu_count() or 1), thread_name_prefix="vitmerge-decode")
        return _pool


@dataclass
class ImageInput:
    """One image of a request: encoded bytes (``blob``) or prepared pixels (``x``, and ``x_gate`` when routed)."""

    task: int | None  # None: routed by the gate
    blob: bytes | None = None
    x: torch.Tensor | None = None  # (C, S, S) in the bundle's (or the given task's) preprocessing
    x_gate: torch.Tensor | None = None
    what: str = "image"  # how errors name it, e.g. "image 0", "IMAGE[1]"


@dataclass(frozen=True)
class DecodeOptions:
    """How encoded images are decoded (the server's limits)."""

    max_pixels: int = DEFAULT_MAX_PIXELS
    exif_transpose: bool = True


@dataclass
class PreparedBatch:
    """``predict``'s arguments for the images that decoded, and each input's error (None: it is in the batch)."""

    x: torch.Tensor | None
    given: list[int | None]
    x_gate: torch.Tensor | None
    errors: list[ImageDecodeError | None]


def decode_all(
    inputs: Sequence[ImageInput], options: DecodeOptions, pool: ThreadPoolExecutor | None = None
) -> list[np.ndarray | ImageDecodeError | None]:
    """Each input's uint8 pixels (None for prepared pixels), or its decode error."""

    def one(item: ImageInput) -> np.ndarray | ImageDecodeError | None:
        if item.blob is None:
            return None
        try:
            return decode_image(item.blob, options.max_pixels, item.what, exif_transpose=options.exif_transpose)
        except ImageDecodeError as e:
            return e

    size = sum(len(i.blob) for i in inputs if i.blob is not None)
    if pool is not None and len(inputs) > 1 and size > PARALLEL_DECODE_BYTES:
        return list(pool.map(one, inputs))
    return [one(i) for i in inputs]


def prepare_batch(
    frontend: Preparer,
    inputs: Sequence[ImageInput],
    options: DecodeOptions,
    pool: ThreadPoolExecutor | None = None,
) -> PreparedBatch:
    """Decode and preprocess ``inputs`` into one batch (input order kept, images that failed left out)."""
    pixels = decode_all(inputs, options, pool)
    errors = [p if isinstance(p, ImageDecodeError) else None for p in pixels]
    ok = [i for i, e in enumerate(errors) if e is None]
    if not ok:
        return PreparedBatch(None, [], None, errors)
    variants = len(frontend.input_variants)
    rows: dict[int, torch.Tensor] = {}
    gate_rows: dict[int, torch.Tensor] = {}
    groups: dict[int | None, list[int]] = {}
    for i in ok:
        item = inputs[i]
        if item.blob is None:  # prepared pixels
            assert item.x is not None, f"{item.what}: neither bytes nor pixels"
            rows[i] = (
                item.x.unsqueeze(0).expand(variants, *item.x.shape) if variants > 1 and item.x.ndim == 3 else item.x
            )
            if item.task is None and item.x_gate is not None:
                gate_rows[i] = item.x_gate
        else:
            groups.setdefault(item.task, []).append(i)
    if len(groups) == 1 and not rows:  # the common case: one task (or all routed), all encoded: no restacking
        ((task, idx),) = groups.items()
        x, gate = frontend.prepare([pixels[i] for i in idx], task)  # type: ignore[misc]
        return PreparedBatch(x, [task] * len(idx), gate, errors)
    for task, idx in groups.items():
        x, gate = frontend.prepare([pixels[i] for i in idx], task)  # type: ignore[misc]
        for j, i in enumerate(idx):
            rows[i] = x[j]
            if gate is not None:
                gate_rows[i] = gate[j]
    x = torch.stack([rows[i] for i in ok])
    routed = [i for i in ok if inputs[i].task is None]
    x_gate = torch.stack([gate_rows[i] for i in routed]) if routed and all(i in gate_rows for i in routed) else None
    return PreparedBatch(x, [inputs[i].task for i in ok], x_gate, errors)
