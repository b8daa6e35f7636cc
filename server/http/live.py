"""A live ``vitmerge serve`` process driven from outside, for benchmarks: start one on a store and a free port,
load it with ``hey`` (the Go load generator, so no client Python shares the server's cores), build the demo
store they serve."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

from server.http.readiness import wait_until_ready

CLI = [sys.executable, "-m", "server.cli"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServeProcess:
    """``vitmerge serve`` on ``store`` with one HTTP stack (uvicorn's loop and parser), on a free port."""

    def __init__(self, store: Path, loop: str = "asyncio", parser: str = "h11"):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "VITMERGE_HTTP_LOOP": loop, "VITMERGE_HTTP_PARSER": parser}
        cmd = [*CLI, "serve", "--store", str(store), "--port", str(self.port)]
        cmd += ["--device", "cpu", "--watch-interval", "0", "--quiet"]
        self.log = store / f"serve-{self.port}.log"
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log.open("w"), stderr=subprocess.STDOUT)
        wait_until_ready(self.url, 600, self.proc, self.log.read_text)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


def hey(url: str, body: Path, n: int, c: int, media: str = "image/png", headers: list[str] | None = None) -> dict:
    """Run ``hey`` and parse req/s, p50, p99 and the status codes (``headers``: extra ``"Name: value"``)."""
    extra = [a for h in headers or [] for a in ("-H", h)]
    out = subprocess.run(
        ["hey", "-n", str(n), "-c", str(c), "-m", "POST", "-T", media, *extra, "-D", str(body), url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    pct = {int(p): 1000 * float(s) for p, s in re.findall(r"(\d+)% in ([\d.]+) secs", out)}
    codes = dict(re.findall(r"\[(\d{3})\]\s+(\d+) responses", out))
    return {"rps": rps, "p50_ms": pct.get(50), "p99_ms": pct.get(99), "codes": codes}


def build_demo_store(store: Path) -> None:
    """The demo zoo (shipped in the package) merged with routed EMR, a short gate training, into ``store``."""
    subprocess.run([*CLI, "zoo", "build", "--preset", "tiny", "--store", str(store), "--quiet"], check=True)
    merge = [*CLI, "merge", "--store", str(store), "--zoo", "tiny"]
    subprocess.run([*merge, "--method", "emr_routed", "--param", "gate_epochs=3", "--quiet"], check=True)
