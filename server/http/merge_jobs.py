"""Admin merge jobs: one at a time, each in a child process (server/http/merge_process.py), atomic on success.

A job merges the configured zoo in a child process (a crash or an out-of-memory kill
there fails the job, not the server), publishes the bundle WITHOUT moving ``CURRENT``,
loads and warms it up beside the served one, then moves ``CURRENT`` and swaps. Any
failure before that point removes the new version: the store and the served model
stay as they were. A file lock in the store (``.merge.lock``) makes merges from
several replicas sharing one store exclusive: the loser answers 409.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

from filelock import FileLock, Timeout

from model_store.errors import ModelStoreError
from model_store.files import mkdir_published, utc_timestamp
from server.http.errors import Conflict, InvalidRequest, NotFound
from server.http.metrics import ServerMetrics
from server.http.model_manager import MERGE_LOCK, ModelManager
from server.http.requests import MergeOrder
from server.http.zoo_source import resolve_zoo
from server.runtime.protocol import InferenceEngine

log = logging.getLogger("vitmerge.merge")
State = Literal["queued", "running", "succeeded", "failed"]
MAX_JOBS_KEPT = 100


@dataclass
class MergeJob:
    """A merge request and how it is going."""

    id: str
    method: str
    params: dict[str, Any]
    tasks: list[str] | None
    target_agreement: float | None = None
    grid: dict[str, list[Any]] | None = None
    state: State = "queued"
    phase: str = "queued"
    progress: float = 0.0
    error: str | None = None
    version: str | None = None
    created_at: str = field(default_factory=utc_timestamp)
    finished_at: str | None = None
    seconds: float | None = None
    process: Any = field(default=None, repr=False, compare=False)  # the merge child while it runs

    def as_dict(self) -> dict[str, Any]:
        return {
            k: getattr(self, k)
            for k in (
                "id",
                "method",
                "params",
                "tasks",
                "target_agreement",
                "grid",
                "state",
                "phase",
                "progress",
                "error",
                "version",
                "created_at",
                "finished_at",
                "seconds",
            )
        }


class MergeJobs:
    """Accepts, runs and reports admin merges."""

    def __init__(self, manager: ModelManager, metrics: ServerMetrics):
        self.manager = manager
        self.metrics = metrics
        self.jobs: dict[str, MergeJob] = {}
        self._lock = threading.Lock()
        self._active: MergeJob | None = None
        self._switching = False  # a version switch (``switch_current``) is loading
        self._file_lock = FileLock(
            str(manager.store.layout.root / MERGE_LOCK), thread_local=False
        )  # released by the job thread

    @property
    def busy(self) -> bool:
        return self._active is not None or self._switching

    def submit(self, order: MergeOrder) -> MergeJob:
        """Start a job for a validated order; 422 when the zoo cannot take it, 409 while another merge runs."""
        self._check_zoo(order.method, order.tasks)
        with self._lock:
            self._claim_store()
            job = MergeJob(
                uuid.uuid4().hex[:12],
                order.method,
                order.params.model_dump(),
                order.tasks,
                order.target_agreement,
                order.grid,
            )
            self._active = job
            self.jobs[job.id] = job
            while len(self.jobs) > MAX_JOBS_KEPT:
                self.jobs.pop(next(iter(self.jobs)))
        threading.Thread(target=self._run, args=(job,), name=f"merge-{job.id}", daemon=True).start()
        return job

    def _claim_store(self) -> None:
        """Under ``self._lock``: 409 unless no merge or switch runs here or in another replica; takes the file lock."""
        if self._active is not None:
            raise Conflict(
                f"merge job {self._active.id} is {self._active.state}; one merge at a time", code="merge_in_progress"
            )
        if self._switching:
            raise Conflict("a version switch is loading; retry when it is done", code="merge_in_progress")
        mkdir_published(self.manager.store.layout.root)
        try:
            self._file_lock.acquire(timeout=0)
        except Timeout:
            raise Conflict("another replica is merging into this store", code="merge_in_progress") from None

    def switch_current(self, version: str) -> InferenceEngine:
        """Serve ``version``, already in the store, on every replica: a merge's last steps under its locks.

        Loads and warms it up beside the served engine, then moves ``CURRENT`` and swaps (replicas
        follow ``CURRENT``). 404 for a version not in the store, 409 while a merge runs, 422 when the
        version does not load -- the served engine and ``CURRENT`` stay as they were.
        """
        store = self.manager.store
        if version not in store.versions():
            raise NotFound(
                f"no bundle version '{version}' in the store (versions: {', '.join(store.versions()) or 'none'})",
                code="unknown_version",
            )
        with self._lock:
            self._claim_store()
            self._switching = True
        try:
            engine = self.manager.engine
            if engine is None or engine.version != version or store.current_version() != version:
                try:
                    engine = self.manager.build_engine(version)
                except Exception as e:
                    raise InvalidRequest(
                        f"bundle {version} cannot be loaded ({type(e).__name__}: {e}); still serving "
                        f"{self.manager.version}",
                        code="version_not_loadable",
                    ) from e
                store.set_current(version)
                self.manager.swap(engine)
            return engine
        finally:
            with self._lock:
                self._switching = False
                self._file_lock.release()

    def _check_zoo(self, method: str, tasks: list[str] | None) -> None:
        """422 at once for what the (already built) zoo cannot do: unknown tasks, task vectors without a
        shared base, a method that needs calibration images a task lacks."""
        from merging.pipeline import check_applicable, check_data, select_tasks

        try:
            zoo = resolve_zoo(self.manager.settings, build_missing=False)
        except (FileNotFoundError, ModelStoreError):
            return  # not built yet: the job builds it and fails there if needed
        try:
            chosen = select_tasks(zoo, tasks)
            check_applicable(zoo, method, chosen)
            check_data(zoo, method, chosen)
        except (ValueError, ModelStoreError) as e:
            raise InvalidRequest(str(e), code="invalid_merge_request") from e

    def get(self, job_id: str) -> MergeJob:
        job = self.jobs.get(job_id)
        if job is None:
            raise NotFound(f"no merge job '{job_id}'", code="unknown_job")
        return job

    def _run(self, job: MergeJob) -> None:
        from server.http.merge_process import MergeFailed, MergeRequestSpec, cleanup_leftovers, run_merge_process

        start = time.perf_counter()
        store = self.manager.store
        before = set(store.versions())
        published: str | None = None

        def on_progress(frac: float) -> None:
            job.progress = round(0.8 * frac, 4)

        def on_phase(phase: str) -> None:
            job.phase = phase

        def on_start(proc: Any) -> None:
            job.process = proc

        try:
            job.state, job.phase = "running", "starting merge process"
            req = MergeRequestSpec(
                self.manager.settings,
                job.method,
                job.params,
                job.tasks,
                target_agreement=job.target_agreement,
                grid=job.grid,
            )
            published = run_merge_process(req, on_progress, on_phase, on_start)
            job.phase, job.progress = "loading", 0.85
            engine = self.manager.build_engine(published)
            job.phase, job.progress = "publishing", 0.95
            store.set_current(published)
            self.manager.swap(engine)
            job.version, job.progress, job.phase, job.state = published, 1.0, "done", "succeeded"
            self.metrics.merge_jobs.labels("succeeded").inc()
        except Exception as e:  # noqa: BLE001 - any failure is the job's, reported in its state
            log.error("merge job %s failed: %s", job.id, e)
            try:
                removed = cleanup_leftovers(store, before)
                if removed:
                    log.info("merge job %s: removed %s", job.id, ", ".join(removed))
            except Exception:  # pragma: no cover - best effort
                log.exception("could not clean up after merge job %s", job.id)
            if isinstance(e, MergeFailed):
                job.error = str(e)
            else:
                message = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
                job.error = f"{type(e).__name__}: {message}"
            job.state, job.phase = "failed", "failed"
            self.metrics.merge_jobs.labels("failed").inc()
        finally:
            job.seconds = round(time.perf_counter() - start, 3)
            job.finished_at = utc_timestamp()
            with self._lock:
                self._active = None
                self._file_lock.release()
