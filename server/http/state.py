"""What one running server owns: settings, metrics, the model manager, merge jobs, the batcher, the decode pool."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from server.http.batcher import Batcher, ItemResult
from server.http.errors import NotReady, Timeout
from server.http.merge_jobs import MergeJobs
from server.http.metrics import ServerMetrics
from server.http.model_manager import ModelManager
from server.http.settings import ServerSettings
from server.runtime.inputs import DecodeOptions, ImageInput
from server.runtime.protocol import InferenceEngine

log = logging.getLogger("vitmerge.server")


class ServerState:
    """Everything one running server owns."""

    def __init__(self, settings: ServerSettings, progress: bool = False):
        self.settings = settings
        self.progress = progress
        self.metrics = ServerMetrics()
        self.manager = ModelManager(settings, self.metrics)
        self.jobs = MergeJobs(self.manager, self.metrics)
        self.batcher: Batcher | None = None
        self.decode_pool = ThreadPoolExecutor(settings.decode_threads, thread_name_prefix="vitmerge-decode")
        self._tasks: list[asyncio.Task] = []
        self.on_ready: list[Callable[[InferenceEngine], None]] = []

    async def start(self) -> None:
        s = self.settings
        options = DecodeOptions(s.max_image_pixels, s.exif_transpose)
        self.batcher = Batcher(s.max_batch_size, s.max_wait_ms, s.max_queue, self.metrics, options)
        self.batcher.start()
        self._tasks.append(asyncio.create_task(self._bootstrap(), name="vitmerge-bootstrap"))
        if s.watch_interval_s > 0:
            self._tasks.append(asyncio.create_task(self.manager.watch(lambda: self.jobs.busy), name="vitmerge-watch"))

    async def _bootstrap(self) -> None:
        try:
            engine = await asyncio.to_thread(self.manager.bootstrap, self.progress)
        except Exception:  # noqa: BLE001 - the manager recorded the error; /readyz reports it
            return
        for callback in self.on_ready:
            try:
                callback(engine)
            except Exception:  # pragma: no cover - informational only
                log.exception("on_ready callback failed")

    def stop_signal(self, name: str) -> None:
        """A stop signal (``SIGTERM``) arrived: log the work in flight that the graceful stop now finishes.

        Called from the signal handler (the loop's thread, between two bytecodes): it only reads counters and
        leaves the logging to the loop. uvicorn then closes the listening socket, waits for open requests and
        runs the lifespan's :meth:`stop`.
        """
        b = self.batcher
        counts = (b.pending, b.running, b.decoding) if b is not None else (0, 0, 0)
        message = "%s: stopping gracefully; %d image(s) queued, %d running, %d request(s) decoding finish first"
        try:
            asyncio.get_running_loop().call_soon_threadsafe(log.info, message, name, *counts)
        except RuntimeError:  # no loop running (a signal before serving began)
            log.info(message, name, *counts)

    async def stop(self) -> None:
        """Graceful: refuse new requests, finish the admitted ones (queued and running images), then stop
        background tasks and threads."""
        if self.batcher is not None:
            await self.batcher.stop(drain_timeout=self.settings.request_timeout_s)
        for task in self._tasks:
            task.cancel()
        self.decode_pool.shutdown(wait=False, cancel_futures=True)

    @property
    def ready(self) -> bool:
        engine = self.manager.engine
        return engine is not None and engine.alive and self.batcher is not None and self.batcher.alive

    def engine(self) -> InferenceEngine:
        engine = self.manager.engine
        if self.batcher is not None and self.batcher.stopping:
            raise NotReady(
                "server is shutting down (draining queued requests); retry on another replica",
                code="shutting_down",
                headers={"Retry-After": "1"},
            )
        if engine is None or not engine.alive or self.batcher is None or not self.batcher.alive:
            raise NotReady(
                f"model not loaded (state: {self.manager.state}"
                f"{'; ' + self.manager.error if self.manager.error else ''})",
                headers={"Retry-After": "5"},
            )
        return engine

    async def classify(
        self, engine: InferenceEngine, inputs: list[ImageInput] | Callable[[], list[ImageInput]]
    ) -> tuple[list[ItemResult], float]:
        """The request path both protocols share: queue the images (as they arrived; the inference worker decodes
        and preprocesses each batch at once) -> batch -> predict. ``inputs`` may be a function that makes them
        (a large body's parsing): it runs in the decode pool, off the event loop.

        Returns each image's result and when the request was queued (``perf_counter``); 504 past the request
        timeout; an image that did not decode fails its request (400/413).
        """
        assert self.batcher is not None
        with self.batcher.incoming():
            if callable(inputs):
                inputs = await asyncio.get_running_loop().run_in_executor(self.decode_pool, inputs)
            queued = time.perf_counter()
            futures = self.batcher.submit(engine, inputs)
        try:
            done = await asyncio.wait_for(
                asyncio.gather(*futures, return_exceptions=True), self.settings.request_timeout_s
            )
        except TimeoutError:
            raise Timeout(f"request did not finish within {self.settings.request_timeout_s:g} s") from None
        results: list[ItemResult] = []
        for r in done:
            if isinstance(r, BaseException):
                raise r
            results.append(r)
        for r in results:
            self.metrics.predictions.labels(engine.tasks[r.output.task], r.output.source).inc()
        return results, queued
