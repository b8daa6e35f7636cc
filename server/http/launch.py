"""Server processes for benchmarks, scripts and tests that stop with everything they started.

:class:`ServerProcess` runs a command in its own process group (``start_new_session``) and, when it
is stopped -- on success, on an exception, on Ctrl-C (``KeyboardInterrupt``) and, inside
:func:`terminate_as_interrupt`, on ``SIGTERM`` / ``SIGHUP`` -- signals the whole group: the server,
its engine process, uvicorn or LitServe workers and anything they spawned. A terminal's Ctrl-C
reaches only the foreground group, so without this a server in its own session would outlive the
script that started it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import FrameType, TracebackType

from server.http.readiness import wait_until_ready


class ServerProcess:
    """A command in its own process group; :meth:`stop` (or leaving the ``with`` block) ends the group."""

    def __init__(
        self,
        cmd: Sequence[str],
        log: Path,
        *,
        cwd: Path | None = None,
        env: dict[str, str] | None = None,
        url: str | None = None,
        ready: Callable[[ServerProcess], None] | None = None,
        timeout_s: float = 600.0,
        grace_s: float = 20.0,
    ):
        """Start ``cmd`` (output to ``log``); with ``url``, wait until ``url/readyz`` answers 200, or call
        ``ready(self)`` to wait some other way. A start that fails stops the group before raising.
        ``grace_s``: how long :meth:`stop` waits after ``SIGTERM`` before ``SIGKILL``."""
        self.url = url or ""
        self.grace_s = grace_s
        self.log = log
        self._log = log.open("w")
        self.proc = subprocess.Popen(
            list(cmd), cwd=cwd, env=env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )
        self.pgid = self.proc.pid  # a new session's leader: its pid is the group's id
        try:
            if ready is not None:
                ready(self)
            elif url is not None:
                wait_until_ready(url, timeout_s, self.proc, self.read_log, poll_s=0.2)
        except BaseException:
            self.stop()
            raise

    def read_log(self) -> str:
        self._log.flush()
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self) -> None:
        """``SIGTERM`` to the group (graceful drain), ``SIGKILL`` to whatever of it is left after ``grace_s``."""
        signal_group(self.pgid, signal.SIGTERM)
        try:
            self.proc.wait(self.grace_s)
        except subprocess.TimeoutExpired:
            pass
        signal_group(self.pgid, signal.SIGKILL)  # children that outlived the leader, or a leader that hung
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)
        self._log.close()

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()


def signal_group(pgid: int, sig: signal.Signals) -> None:
    """Send ``sig`` to process group ``pgid``; a group that is already gone is fine."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes of group ``pgid``, read from ``/proc`` (Linux)."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) ": state ppid pgrp ...
        if int(fields[2]) == pgid and fields[0] != "Z":
            out.append(int(entry.name))
    return out


@contextlib.contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """Inside: ``SIGTERM`` and ``SIGHUP`` raise ``KeyboardInterrupt`` like Ctrl-C, so ``finally`` blocks (and
    :class:`ServerProcess` exits) run instead of the process dying on the spot."""

    def interrupt(sig: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(signal.Signals(sig).name)

    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def wait_for_http(path: str = "/health", timeout_s: float = 300.0) -> Callable[[ServerProcess], None]:
    """A ``ready`` check for servers without ``/readyz`` (LitServe): ``GET url+path`` answers 200."""
    import httpx

    def ready(server: ServerProcess) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if server.proc.poll() is not None:
                raise RuntimeError(f"server exited with {server.proc.returncode}:\n{server.read_log()}")
            try:
                if httpx.get(server.url + path, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise TimeoutError(f"{server.url}{path} not up after {timeout_s:g} s:\n{server.read_log()}")

    return ready
