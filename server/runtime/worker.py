"""An :class:`~server.runtime.engine.Engine` in a child process: the model gets its own GIL.

With the inference worker as a thread, its Python-heavy kernel launching competes with
request decoding and HTTP handling for one interpreter lock (BENCHMARKS.md, "Serving").
:class:`ProcessEngine` keeps the Engine's interface -- metadata and preprocessing stay in
the server process, ``predict`` and ``run`` run in a spawned child that owns the weights and the
device. ``run`` sends a batch's encoded images (bytes through the pipe) and the child
decodes and preprocesses them itself, so the server process only does HTTP; tensors
(``predict``, prepared pixels) travel through shared memory (torch's multiprocessing
reductions: one file descriptor per tensor); outputs come back as small numpy arrays.
One child per loaded bundle version; it exits when its engine is dropped after a hot
swap (or when the server exits).
"""

from __future__ import annotations

import multiprocessing as mp
import threading
import traceback
import weakref
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing  # registers tensor reductions with multiprocessing

from model_store.bundle import Bundle
from model_store.errors import ImageDecodeError
from server.runtime.engine import EngineFrontend, EngineOptions
from server.runtime.inputs import DecodeOptions, ImageInput
from server.runtime.protocol import BatchRun, ImageOutput


def _child(conn: Any, bundle_dir: str, options: EngineOptions) -> None:
    """Child main loop: load the bundle, then answer ``(op, *args)`` messages until EOF."""
    from model_store.bundle import load_bundle_dir
    from model_store.data.decode import configure_pillow
    from model_store.memory import reuse_freed_memory
    from server.runtime.engine import Engine

    if options.malloc_reuse:  # a spawned child starts with glibc's defaults
        reuse_freed_memory()
    if options.torch_threads is not None:
        torch.set_num_threads(options.torch_threads)
    lookups: list[bool] = []
    try:
        torch.set_grad_enabled(False)
        engine = Engine(load_bundle_dir(Path(bundle_dir), verify=False), options, lookups.append)
        conn.send(("ok", None))
    except Exception as e:  # noqa: BLE001 - reported to the parent
        conn.send(("error", f"{type(e).__name__}: {e}"))
        return
    while True:
        try:
            op, args = conn.recv()
        except (EOFError, OSError):
            return
        try:
            if op == "predict":
                result: Any = ([_plain(o) for o in engine.predict(*args)], list(lookups))
                lookups.clear()
            elif op == "run":
                configure_pillow(args[1].max_pixels)  # the server's image limits hold in this process too
                run = engine.run(*args)
                outputs = [o if isinstance(o, ImageDecodeError) else _plain(o) for o in run.outputs]
                result = ((outputs, run.prepare_s, run.predict_s), list(lookups))
                lookups.clear()
            elif op == "warmup":
                engine.warmup()
                result = list(lookups)
                lookups.clear()
            elif op == "resident":
                result = engine.resident_bytes()
            elif op == "stop":
                conn.send(("ok", None))
                return
            else:
                raise ValueError(f"unknown op {op}")
            conn.send(("ok", result))
        except Exception as e:  # noqa: BLE001 - reported to the parent, the child keeps serving
            conn.send(("error", f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=3)}"))


def _plain(o: ImageOutput) -> tuple:
    """An output as plain values (numpy arrays pickle without torch's shared-memory file descriptors)."""
    return (o.task, o.task_probability, o.source, o.probabilities.numpy(), o.task_probabilities.numpy())


def _output(plain: tuple) -> ImageOutput:
    task, p, source, probs, ps = plain
    return ImageOutput(task, p, source, torch.from_numpy(probs), torch.from_numpy(ps))


def _shutdown(conn: Any, proc: mp.process.BaseProcess) -> None:
    try:
        conn.send(("stop", ()))
    except (OSError, ValueError):
        pass
    proc.join(5)
    if proc.is_alive():
        proc.kill()
    conn.close()


class ProcessEngine(EngineFrontend):
    """The Engine interface with ``predict`` running in a spawned child process."""

    def __init__(
        self,
        bundle: Bundle,
        options: EngineOptions | str | torch.device = "cpu",
        on_cache_lookup: Callable[[bool], None] | None = None,
    ):
        """The child gets ``options`` (its device resolved here: ``auto`` means the same device in both)."""
        super().__init__(bundle, options)  # metadata only: no tensors in this process
        self._on_cache_lookup = on_cache_lookup
        self._lock = threading.Lock()
        ctx = mp.get_context("spawn")  # CUDA cannot be used in a forked child
        self._conn, child = ctx.Pipe(duplex=True)
        self._proc = ctx.Process(
            target=_child,
            args=(child, str(bundle.path), replace(self.options, device=str(self.device))),
            name=f"vitmerge-engine-{bundle.version}",
            daemon=True,
        )
        self._proc.start()
        child.close()
        self._finalizer = weakref.finalize(self, _shutdown, self._conn, self._proc)
        self._call_raw()  # wait until the child has loaded the bundle

    @property
    def alive(self) -> bool:
        return self._proc.is_alive()

    def _call_raw(self, op: str | None = None, *args: Any) -> Any:
        with self._lock:
            try:
                if op is not None:
                    self._conn.send((op, args))
                status, payload = self._conn.recv()
            except (EOFError, OSError, BrokenPipeError) as e:
                raise RuntimeError(
                    f"inference process of bundle {self.version} died (exit code {self._proc.exitcode})"
                ) from e
        if status != "ok":
            raise RuntimeError(f"inference process of bundle {self.version}: {payload}")
        return payload

    def _report(self, lookups: list[bool]) -> None:
        if self._on_cache_lookup is not None:
            for hit in lookups:
                self._on_cache_lookup(hit)

    def predict(
        self, x: torch.Tensor, given: Sequence[int | None], x_gate: torch.Tensor | None = None
    ) -> list[ImageOutput]:
        outs, lookups = self._call_raw("predict", x, list(given), x_gate)
        self._report(lookups)
        return [_output(o) for o in outs]

    def run(self, inputs: Sequence[ImageInput], options: DecodeOptions | None = None) -> BatchRun:
        """Decode, preprocess and predict in the child: only the encoded images cross the pipe."""
        (outs, prepare_s, predict_s), lookups = self._call_raw("run", list(inputs), options or DecodeOptions())
        self._report(lookups)
        return BatchRun([o if isinstance(o, ImageDecodeError) else _output(o) for o in outs], prepare_s, predict_s)

    def warmup(self) -> None:
        self._report(self._call_raw("warmup"))

    def resident_bytes(self) -> dict[str, int]:
        return self._call_raw("resident")

    def close(self) -> None:
        self._finalizer()
