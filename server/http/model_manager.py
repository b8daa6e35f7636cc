"""Which bundle is served: loading, atomic hot swap, startup bootstrap, watching CURRENT.

The served engine (:class:`~server.runtime.protocol.InferenceEngine`) is one reference; a swap replaces it in a
single assignment after the new engine is fully loaded and warmed up beside the old
one. Requests pin the engine they started with, so in-flight work finishes on the
old version and no response mixes versions.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from enum import StrEnum

import torch
from filelock import FileLock

from model_store.bundle import BundleStore
from model_store.devices import resolve_device
from model_store.files import mkdir_published
from server.http.metrics import ServerMetrics
from server.http.settings import ServerSettings
from server.runtime.engine import Engine, EngineOptions
from server.runtime.protocol import InferenceEngine

log = logging.getLogger("vitmerge.models")
#: File in the store that serialises merges (admin jobs and startup merges) across replicas.
MERGE_LOCK = ".merge.lock"
#: the longest wait between two retries of a failed startup merge (a failed startup load is retried every poll)
MAX_MERGE_RETRY_S = 300.0


class ManagerState(StrEnum):
    """Where the manager is: starting, merging the startup bundle, loading it, serving (ready), or failed."""

    STARTING = "starting"
    MERGING = "merging"
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"


class ModelManager:
    """Holds the served engine; loads, swaps and (for replicas) follows ``CURRENT``."""

    def __init__(self, settings: ServerSettings, metrics: ServerMetrics):
        self.settings = settings
        self.metrics = metrics
        self.store = BundleStore(settings.layout, keep=settings.keep_versions)
        self.device = resolve_device(settings.device)
        self.engine: InferenceEngine | None = None
        self.error: str | None = None
        self.state = ManagerState.STARTING
        #: the step a failed :meth:`bootstrap` was in (LOADING: CURRENT would not load; MERGING: the startup merge)
        self.failed_step: ManagerState | None = None
        self._load_lock = threading.Lock()
        self._failed_versions: set[str] = set()
        self._retry_at = 0.0  # monotonic time of the next startup retry
        self._merge_backoff = 0.0

    @property
    def options(self) -> EngineOptions:
        """How the settings ask engines to run (the device resolved once, at startup)."""
        s = self.settings
        return EngineOptions(
            device=str(self.device),
            cache_bytes=s.cache_bytes,
            mixing=s.mixing,
            threshold=s.sparse_threshold,
            cuda_graphs=s.cuda_graphs,
            malloc_reuse=s.malloc_reuse,
            torch_threads=s.torch_threads,
        )

    @property
    def version(self) -> str | None:
        return self.engine.version if self.engine is not None else None

    def build_engine(self, version: str) -> InferenceEngine:
        """Load, verify and warm up ``version`` (does not serve it yet)."""
        s = self.settings
        if s.worker == "process":
            from server.runtime.worker import ProcessEngine

            engine: InferenceEngine = ProcessEngine(self.store.load(version), self.options, self.metrics.cache_lookup)
        else:
            if s.torch_threads is not None:
                torch.set_num_threads(s.torch_threads)
            engine = Engine(self.store.load(version), self.options, self.metrics.cache_lookup)
        engine.warmup()
        return engine

    def swap(self, engine: InferenceEngine) -> None:
        """Serve ``engine`` from the next request on (one reference assignment)."""
        old = self.engine
        self.engine = engine
        self.state, self.error = ManagerState.READY, None
        self.metrics.model_info.info(
            {
                "version": engine.version,
                "method": engine.method,
                "kind": engine.kind,
                "tasks": ",".join(engine.tasks),
                "device": str(engine.device),
            }
        )
        if old is not None and old.version != engine.version:
            self.metrics.swaps.inc()
        log.info("serving bundle %s (%s, %s) on %s", engine.version, engine.method, engine.kind, engine.device)

    def load_and_swap(self, version: str) -> InferenceEngine:
        with self._load_lock:
            engine = self.build_engine(version)
            self.swap(engine)
            return engine

    # -- startup ----------------------------------------------------------------------
    def bootstrap(self, progress: bool = True) -> InferenceEngine:
        """Serve CURRENT; with none, merge the configured zoo with the default method first."""
        try:
            version = self.store.current_version()
            if version is None:
                # replicas starting together on an empty store: one merges, the others wait for it
                mkdir_published(self.store.layout.root)
                with FileLock(str(self.store.layout.root / MERGE_LOCK), thread_local=False):
                    version = self.store.current_version()
                    if version is None:
                        self.state = ManagerState.MERGING
                        log.info(
                            "store %s has no CURRENT bundle: merging zoo '%s' with %s",
                            self.store.layout.root,
                            self.settings.zoo,
                            self.settings.default_method,
                        )
                        from server.http.merge_process import MergeRequestSpec, cleanup_leftovers, run_merge_process

                        before = set(self.store.versions())
                        req = MergeRequestSpec(
                            self.settings,
                            self.settings.default_method,
                            self.settings.default_params,
                            make_current=True,
                            progress=progress,
                        )
                        try:  # in a child process: the zoo build and the merge cannot take this server down
                            version = run_merge_process(req)
                        except Exception:
                            cleanup_leftovers(self.store, before)
                            raise
            self.state = ManagerState.LOADING
            return self.load_and_swap(version)
        except Exception as e:
            merging = self.state == ManagerState.MERGING
            self.failed_step = ManagerState.MERGING if merging else ManagerState.LOADING
            self.state, self.error = ManagerState.FAILED, f"{type(e).__name__}: {e}"
            log.error("startup failed: %s", self.error)
            raise

    async def _retry_startup(self) -> None:
        log.info("retrying startup (last error: %s)", self.error)
        try:
            await asyncio.to_thread(self.bootstrap, False)
        except Exception:  # noqa: BLE001 - bootstrap recorded the error; /readyz reports it
            if self.failed_step == ManagerState.MERGING:
                base = max(self.settings.watch_interval_s, 1.0)
                self._merge_backoff = min(max(self._merge_backoff * 2, base), MAX_MERGE_RETRY_S)
                self._retry_at = time.monotonic() + self._merge_backoff
            else:
                self._retry_at = 0.0

    # -- replicas ---------------------------------------------------------------------
    def current_changed(self) -> str | None:
        """The store's CURRENT when it differs from what we serve (and did not fail before)."""
        current = self.store.current_version()
        if current is None or current == self.version or current in self._failed_versions:
            return None
        return current

    async def watch(self, busy: Callable[[], bool]) -> None:
        """Poll CURRENT every ``watch_interval_s`` and hot-swap when another replica published.

        Until a model is served, a failed startup is retried: a CURRENT that would not load (e.g.
        files unreadable by this user, fixed later with chmod) on every poll, a failed startup merge
        with a back-off doubling up to ``MAX_MERGE_RETRY_S``.
        """
        interval = self.settings.watch_interval_s
        while True:
            await asyncio.sleep(interval)
            if self.engine is None:
                if self.state == ManagerState.FAILED and not busy() and time.monotonic() >= self._retry_at:
                    await self._retry_startup()
                continue
            if busy():
                continue
            try:
                version = await asyncio.to_thread(self.current_changed)
                if version is None:
                    continue
                log.info("CURRENT moved to %s: hot-swapping", version)
                await asyncio.to_thread(self.load_and_swap, version)
            except Exception as e:  # noqa: BLE001 - keep serving the old version
                failed = self.store.current_version()
                if failed:
                    self._failed_versions.add(failed)
                log.error("could not load CURRENT (%s); still serving %s", e, self.version)
