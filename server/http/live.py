"""Live servers driven from outside, for benchmarks, scripts and tests: start ``vitmerge serve`` (or any server
command) on a free port, load it with ``hey`` (the Go load generator, so no client Python shares the server's
cores), build the demo store, write the request bodies of every request form.

Every server runs in its own process group (:class:`ServerProcess`, ``start_new_session``) and, when it is
stopped -- on success, on an exception, on Ctrl-C (``KeyboardInterrupt``) and, inside
:func:`terminate_as_interrupt`, on ``SIGTERM`` / ``SIGHUP`` -- the whole group is signalled: the server, its
engine process, uvicorn or LitServe workers and anything they spawned. A terminal's Ctrl-C reaches only the
foreground group, so without this a server in its own session would outlive the script that started it.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import FrameType, TracebackType

from server.http.readiness import wait_until_ready

CLI = [sys.executable, "-m", "server.cli"]
#: a request form: (path + query, body file, content type, extra headers)
RequestForm = tuple[str, Path, str, list[str]]


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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServeProcess(ServerProcess):
    """``vitmerge serve`` on ``store`` with one HTTP stack (uvicorn's loop and parser), on a free port, CPU;
    ``extra``: more ``serve`` arguments, ``env``: more environment variables."""

    def __init__(
        self,
        store: Path,
        loop: str = "asyncio",
        parser: str = "h11",
        extra: Sequence[str] = (),
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
    ):
        self.port = free_port()
        full_env = {**os.environ, "VITMERGE_HTTP_LOOP": loop, "VITMERGE_HTTP_PARSER": parser, **(env or {})}
        cmd = [*CLI, "serve", "--store", str(store), "--port", str(self.port)]
        cmd += ["--device", "cpu", "--watch-interval", "0", "--quiet", *extra]
        url = f"http://127.0.0.1:{self.port}"
        super().__init__(cmd, store / f"serve-{self.port}.log", cwd=cwd, env=full_env, url=url)


def litserve_process(python: str, script: Path, zoo: Path | str, log: Path, extra: Sequence[str] = ()) -> ServerProcess:
    """``script`` (``benchmarks/litserve_zoo.py``) under another Python (LitServe's virtualenv), serving ``zoo``
    on a free port; LitServe's worker processes are in its group. Ready when ``/health`` answers 200."""
    port = free_port()
    cmd = [python, str(script), str(zoo), str(port), *extra]
    env = {**os.environ, "PYTHONPATH": str(script.resolve().parent.parent)}
    url = f"http://127.0.0.1:{port}"
    return ServerProcess(cmd, log, cwd=script.resolve().parent.parent, env=env, url=url, ready=wait_for_http("/health"))


def _hey_summary(out: str) -> dict:
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    pct = {int(p): 1000 * float(s) for p, s in re.findall(r"(\d+)% in ([\d.]+) secs", out)}
    codes = {k: int(v) for k, v in re.findall(r"\[(\d{3})\]\s+(\d+) responses", out)}
    return {"requests": sum(codes.values()), "rps": rps, "p50_ms": pct.get(50), "p99_ms": pct.get(99), "codes": codes}


def hey(url: str, body: Path, n: int, c: int, media: str = "image/png", headers: list[str] | None = None) -> dict:
    """Run ``hey`` for ``n`` requests and parse req/s, p50, p99 (ms) and the status codes (``headers``: extra
    ``"Name: value"``)."""
    extra = [a for h in headers or [] for a in ("-H", h)]
    cmd = ["hey", "-n", str(n), "-c", str(c), "-m", "POST", "-T", media, *extra, "-D", str(body), url]
    return _hey_summary(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)


def hey_for(url: str, body: Path, seconds: float, c: int, media: str, headers: Sequence[str] = ()) -> dict:
    """``hey -z``: ``seconds`` of load at concurrency ``c``; req/s, p50/p99 ms and statuses."""
    extra = [a for h in headers for a in ("-H", h)]
    cmd = ["hey", "-z", f"{seconds}s", "-c", str(c), "-m", "POST", "-T", media, *extra, "-D", str(body), url]
    return _hey_summary(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)


def build_demo_store(store: Path) -> None:
    """The demo zoo (shipped in the package) merged with routed EMR, a short gate training, into ``store``."""
    subprocess.run([*CLI, "zoo", "build", "--preset", "tiny", "--store", str(store), "--quiet"], check=True)
    merge = [*CLI, "merge", "--store", str(store), "--zoo", "tiny"]
    subprocess.run([*merge, "--method", "emr_routed", "--param", "gate_epochs=3", "--quiet"], check=True)


def request_forms(png: bytes, task: str | None, tmp: Path) -> dict[str, RequestForm]:
    """One image in every request form the server takes (raw PNG, /v1 base64 JSON, /v2 binary and JSON tensors),
    task given or (None) routed: form -> (path + query, body file written under ``tmp``, content type, headers)."""
    b64 = base64.b64encode(png).decode()
    out: dict[str, RequestForm] = {}

    def write(name: str, data: bytes) -> Path:
        path = tmp / f"{name}-{task or 'routed'}"
        path.write_bytes(data)
        return path

    query = f"?task={task}" if task else ""
    out["v1 raw PNG"] = ("/v1/classify" + query, write("raw", png), "image/png", [])
    v1_json = json.dumps({"images": [b64], **({"task": task} if task else {})}).encode()
    out["v1 base64 JSON"] = ("/v1/classify", write("v1json", v1_json), "application/json", [])
    name = task or ""
    inputs = [
        {"name": "IMAGE", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": 4 + len(png)}},
        {"name": "TASK", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": 4 + len(name)}},
    ]
    header = json.dumps({"inputs": inputs, "parameters": {"binary_data_output": True}}).encode()
    raw = struct.pack("<I", len(png)) + png + struct.pack("<I", len(name)) + name.encode()
    out["v2 binary tensors"] = (
        "/v2/models/vitmerge/infer",
        write("v2bin", header + raw),
        "application/octet-stream",
        [f"Inference-Header-Content-Length: {len(header)}"],
    )
    v2_json = {
        "inputs": [
            {"name": "IMAGE", "shape": [1], "datatype": "BYTES", "data": [b64]},
            {"name": "TASK", "shape": [1], "datatype": "BYTES", "data": [name]},
        ]
    }
    out["v2 JSON tensors"] = (
        "/v2/models/vitmerge/infer",
        write("v2json", json.dumps(v2_json).encode()),
        "application/json",
        [],
    )
    return out
