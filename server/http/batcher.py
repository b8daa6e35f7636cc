"""Dynamic batching in front of one inference worker thread.

Requests put their images (as they arrived: encoded bytes, or prepared pixels) on an
asyncio queue; the worker decodes and preprocesses a whole batch at once, then runs it
(:meth:`~server.runtime.protocol.InferenceEngine.run`). The batch loop takes the first waiting image, then waits at most
``max_wait_ms`` for up to ``max_batch_size`` images -- but only while some admitted
request is still decoding (otherwise no image can arrive in time and waiting would
only add latency) -- and runs the batch on the
single worker thread that owns the model and the device. Each image carries the
engine it was preprocessed for (pinned when its request arrived), so a hot swap
never mixes versions inside a response: images queued before the swap finish on
the old engine, new requests use the new one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from model_store.errors import ImageDecodeError
from server.http.codec import decode_error
from server.http.errors import QueueFull
from server.http.metrics import ServerMetrics
from server.runtime.inputs import DecodeOptions, ImageInput
from server.runtime.protocol import ImageOutput, InferenceEngine

log = logging.getLogger("vitmerge.batcher")


@dataclass
class WorkItem:
    """One image waiting for inference."""

    engine: InferenceEngine
    input: ImageInput
    future: asyncio.Future
    enqueued: float = field(default_factory=time.perf_counter)


@dataclass
class ItemResult:
    output: ImageOutput
    queue_s: float
    inference_s: float
    batch_size: int
    prepare_s: float = 0.0  # decode + preprocess of the batch this image ran in


class Batcher:
    """Collects images into batches (max size, max wait) for one worker thread."""

    def __init__(
        self,
        max_batch_size: int,
        max_wait_ms: float,
        max_queue: int,
        metrics: ServerMetrics,
        options: DecodeOptions | None = None,
    ):
        self.max_batch_size, self.max_wait = max_batch_size, max_wait_ms / 1000.0
        self.options = options or DecodeOptions()
        self.max_queue = max_queue
        self.metrics = metrics
        self._queue: asyncio.Queue[WorkItem] = asyncio.Queue()
        self._pending = 0
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vitmerge-infer")
        self._task: asyncio.Task | None = None
        self._stopping = False
        self._incoming = 0  # requests admitted and still decoding: images that may join the next batch
        self._running = 0  # images of the batch on the worker now

    # -- lifecycle --------------------------------------------------------------------
    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="vitmerge-batcher")

    @property
    def alive(self) -> bool:
        return self._task is not None and not self._task.done() and not self._stopping

    @property
    def stopping(self) -> bool:
        """True once a graceful stop began (queued images still finish)."""
        return self._stopping

    @property
    def busy(self) -> bool:
        """Admitted work is unfinished: images queued, a batch running, or requests still decoding."""
        return self._pending > 0 or self._running > 0 or self._incoming > 0

    async def stop(self, drain_timeout: float = 30.0) -> None:
        """Refuse new requests, finish what was admitted (bounded: queued images, the running batch, requests
        still decoding), then stop the loop and the worker."""
        self._stopping = True
        deadline = time.monotonic() + drain_timeout
        while self.busy and time.monotonic() < deadline and self._task is not None and not self._task.done():
            await asyncio.sleep(0.01)
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):  # noqa: BLE001 - stopping: the worker's end is not news
                pass
        self._worker.shutdown(wait=True, cancel_futures=True)

    async def run_in_worker(self, fn, *args):
        """Run ``fn`` on the inference thread (model loading/warm-up use this too)."""
        return await asyncio.get_running_loop().run_in_executor(self._worker, fn, *args)

    # -- submitting -------------------------------------------------------------------
    @property
    def pending(self) -> int:
        """Images queued for the worker."""
        return self._pending

    @property
    def running(self) -> int:
        """Images in the batch the worker runs now."""
        return self._running

    @property
    def decoding(self) -> int:
        """Admitted requests still decoding their images."""
        return self._incoming

    @contextlib.contextmanager
    def incoming(self) -> Iterator[None]:
        """Admit a request while it decodes (503 once a stop began): the batch loop only waits for images that
        can still come, and a stop waits for an admitted request to queue its images (:meth:`submit` inside)."""
        self._refuse_if_stopping()
        self._incoming += 1
        try:
            yield
        finally:
            self._incoming -= 1

    def _refuse_if_stopping(self) -> None:
        if self._stopping:
            raise QueueFull("server is shutting down", status=503, code="shutting_down", headers={"Retry-After": "1"})

    def submit(self, engine: InferenceEngine, inputs: list[ImageInput]) -> list[asyncio.Future]:
        """Queue a request's images; raises :class:`QueueFull` (429) when over capacity, 503 once a stop began
        (except for a request admitted before it: called inside :meth:`incoming`, its images still run)."""
        n = len(inputs)
        if self._incoming == 0:
            self._refuse_if_stopping()
        if self._pending + n > self.max_queue:
            raise QueueFull(
                f"queue is full ({self._pending} images waiting, limit {self.max_queue})", headers={"Retry-After": "1"}
            )
        loop = asyncio.get_running_loop()
        futures = []
        for item in inputs:
            fut = loop.create_future()
            self._queue.put_nowait(WorkItem(engine, item, fut))
            futures.append(fut)
        self._pending += n
        self.metrics.queue_depth.set(self._pending)
        return futures

    # -- the loop ---------------------------------------------------------------------
    async def _next_batch(self) -> list[WorkItem]:
        batch = [await self._queue.get()]
        deadline = time.perf_counter() + self.max_wait
        while len(batch) < self.max_batch_size:
            try:
                batch.append(self._queue.get_nowait())
                continue
            except asyncio.QueueEmpty:
                pass
            remaining = deadline - time.perf_counter()
            if remaining <= 0 or self._incoming == 0:  # nothing is on its way: waiting only adds latency
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), remaining))
            except TimeoutError:
                break
        return batch

    async def _loop(self) -> None:
        while True:
            batch = await self._next_batch()
            self._pending -= len(batch)
            self.metrics.queue_depth.set(self._pending)
            live = [item for item in batch if not item.future.done()]  # timed-out requests are skipped
            if not live:
                continue
            self.metrics.batch_size.observe(len(live))
            self._running = len(live)
            try:
                await self._run(live)
            finally:
                self._running = 0

    async def _run(self, live: list[WorkItem]) -> None:
        """One batch on the worker (decoded and prepared there); each image's future gets its result, its decode
        error (that request answers 4xx, the batch ran without it), or the batch's error."""
        t0 = time.perf_counter()
        try:
            results = await self.run_in_worker(_run_batch, live, self.options)
        except Exception as e:  # the engine failed: fail this batch, keep serving
            log.exception("batch of %d failed", len(live))
            for item in live:
                if not item.future.done():
                    item.future.set_exception(e)
            return
        self.metrics.inference.observe(time.perf_counter() - t0)
        for item, result in zip(live, results):
            if item.future.done():
                continue
            if isinstance(result, ItemResult):
                self.metrics.queue_wait.observe(result.queue_s)
                item.future.set_result(result)
            else:
                item.future.set_exception(decode_error(result))


def _run_batch(items: list[WorkItem], options: DecodeOptions) -> list[ItemResult | ImageDecodeError]:
    """Worker thread: group items by pinned engine, one ``run`` (decode, preprocess, predict) per group."""
    start = time.perf_counter()
    results: list[ItemResult | ImageDecodeError | None] = [None] * len(items)
    groups: dict[int, list[int]] = {}
    for i, item in enumerate(items):
        groups.setdefault(id(item.engine), []).append(i)
    for idx in groups.values():
        run = items[idx[0]].engine.run([items[i].input for i in idx], options)
        for i, out in zip(idx, run.outputs):
            results[i] = (
                out
                if isinstance(out, ImageDecodeError)
                else ItemResult(out, start - items[i].enqueued, run.predict_s, len(idx), run.prepare_s)
            )
    return [r for r in results if r is not None]
