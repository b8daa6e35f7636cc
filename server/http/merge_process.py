"""Merges in a child process, so that heavy work cannot take serving down.

A merge (zoo build, calibration, gate training) runs in a ``forkserver`` child: an
out-of-memory kill or a crash ends the child, not the server; the job reports
``failed`` and whatever the child left half-written in the store (a staging folder, a
version published but not made current) is removed. The server's own memory stays
that of a serving process (the zoo, the Grams, the training graph live and die in the
child). The fork server preloads the merge pipeline once, so later merges start in
milliseconds instead of re-importing torch.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import shutil
import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

from model_store.bundle import STAGING_PREFIX, BundleStore
from server.http.settings import ServerSettings

log = logging.getLogger("vitmerge.merge")
PRELOAD = ["merging.pipeline", "server.http.model_manager"]
_CTX: Any = None


class MergeFailed(RuntimeError):
    """The merge raised in the child (message: ``Type: text``) or the child died."""


@dataclass
class MergeRequestSpec:
    """What the child merges: the server's settings (zoo, store) and the request."""

    settings: ServerSettings
    method: str
    params: dict[str, Any] = field(default_factory=dict)
    tasks: list[str] | None = None
    make_current: bool = False
    progress: bool = False
    target_agreement: float | None = None  # settings chosen without labels (server.runtime.selection)
    grid: dict[str, list[Any]] | None = None


def _context() -> Any:
    global _CTX
    if _CTX is None:
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(PRELOAD)
        _CTX = ctx
    return _CTX


class _PipeProgress:
    """The job-progress bar of the pipeline, reported to the parent at most every 1%."""

    def __init__(self, conn: Connection, total: int):
        self.conn, self.total, self.n, self.sent = conn, max(total, 1), 0, -1.0

    def update(self, n: int = 1) -> None:
        self.n += n
        frac = min(1.0, self.n / self.total)
        if frac - self.sent >= 0.01 or frac == 1.0:
            self.sent = frac
            self.conn.send(("progress", frac))


def _agreement(zoo: Any, images: int, conn: Connection) -> Callable[[Any], dict[str, Any]]:
    """The pipeline's review hook: the new bundle's agreement with the zoo's models (phase reported)."""
    from server.runtime.agreement import agreement_review

    measure = agreement_review(zoo, images)

    def review(bundle: Any) -> dict[str, Any]:
        conn.send(("phase", "measuring agreement"))
        return measure(bundle)

    return review


def _child(req: MergeRequestSpec, conn: Connection) -> None:
    """Child entry point: resolve the zoo, merge, publish; send ``done``/``error`` back."""
    try:
        from merging.pipeline import merge_and_publish
        from server.http.zoo_source import resolve_zoo

        conn.send(("phase", "loading zoo"))
        zoo = resolve_zoo(req.settings, progress=req.progress)
        conn.send(("phase", "merging"))
        store = BundleStore(req.settings.layout, keep=req.settings.keep_versions)
        bar = None if req.progress else _PipeProgress(conn, len(zoo.backbone_lazy(zoo.base)))
        review = _agreement(zoo, req.settings.agreement_images, conn) if req.settings.agreement_images else None
        if req.target_agreement is not None:
            from merging.pipeline import select_and_publish
            from model_store.data.sources import Holdout
            from server.runtime.selection import HeldOutAgreement

            conn.send(("phase", "choosing settings on held-out calibration images"))
            holdout = Holdout()
            outcome, _ = select_and_publish(
                zoo,
                store,
                req.method,
                req.params,
                req.target_agreement,
                HeldOutAgreement(zoo, holdout),
                req.grid,
                req.tasks,
                holdout,
                progress=req.progress,
                make_current=req.make_current,
                bar=bar,
                review=review,
            )
        else:
            outcome = merge_and_publish(
                zoo,
                store,
                req.method,
                req.params,
                req.tasks,
                progress=req.progress,
                make_current=req.make_current,
                bar=bar,
                review=review,
            )
        conn.send(("done", outcome.version))
    except BaseException as e:  # noqa: BLE001 - everything goes back to the parent as text
        message = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        conn.send(("error", f"{type(e).__name__}: {message}"))
    finally:
        conn.close()


def _exit_reason(code: int | None) -> str:
    if code is not None and code < 0:
        try:
            return f"killed by signal {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def cleanup_leftovers(store: BundleStore, before: set[str]) -> list[str]:
    """Remove versions published since ``before`` that are not CURRENT, and stale staging folders."""
    removed = []
    current = store.current_version()
    for version in set(store.versions()) - before:
        if version != current:
            store.remove(version)
            removed.append(version)
    bundles = store.layout.bundles
    if bundles.exists():
        for staging in bundles.glob(f"{STAGING_PREFIX}*"):
            shutil.rmtree(staging, ignore_errors=True)
            removed.append(staging.name)
    return removed


def run_merge_process(
    req: MergeRequestSpec,
    on_progress: Callable[[float], None] | None = None,
    on_phase: Callable[[str], None] | None = None,
    on_start: Callable[[Any], None] | None = None,
) -> str:
    """Run one merge in a child process; returns the published version or raises :class:`MergeFailed`.

    The caller holds the store's merge lock (no one else publishes meanwhile).
    """
    ctx = _context()
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(req, send), name="vitmerge-merge", daemon=True)
    proc.start()
    send.close()
    if on_start is not None:
        on_start(proc)
    result: tuple[str, Any] | None = None
    try:
        while result is None:
            if not recv.poll(0.2):
                if not proc.is_alive() and not recv.poll(0):
                    break
                continue
            try:
                kind, value = recv.recv()
            except EOFError:
                break
            if kind == "progress" and on_progress is not None:
                on_progress(float(value))
            elif kind == "phase" and on_phase is not None:
                on_phase(str(value))
            elif kind in ("done", "error"):
                result = (kind, value)
    finally:
        proc.join(30)
        if proc.is_alive():  # pragma: no cover - a child that will not exit after reporting
            proc.kill()
            proc.join(5)
        recv.close()
    if result is None:
        raise MergeFailed(f"merge process died ({_exit_reason(proc.exitcode)}); the server kept serving")
    if result[0] == "error":
        raise MergeFailed(str(result[1]))
    return str(result[1])


__all__ = ["MergeFailed", "MergeRequestSpec", "cleanup_leftovers", "run_merge_process"]
