"""Servers started by benchmarks and scripts stop with everything they spawned: on success, failure, Ctrl-C, SIGTERM.

A driver script (a benchmark in miniature) starts a server through :class:`server.http.live.ServerProcess`;
the server spawns a child of its own (as ``vitmerge serve --worker process`` spawns its engine and LitServe
its workers). The driver is then interrupted, fails or ends; afterwards no process of the server's group is
left.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from server_helpers import REPO, free_port

from server.http.live import group_members

#: a server that spawns a grandchild and answers 200 to every GET; ``ignore-term`` makes it ignore SIGTERM
FAKE_SERVER = r"""
import http.server, signal, subprocess, sys
if sys.argv[2] == "ignore-term":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
class Ok(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.end_headers(); self.wfile.write(b"ok")
    def log_message(self, *args):
        pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Ok).serve_forever()
"""

#: a benchmark in miniature: start the server, print its group, then wait, fail or finish as told
DRIVER = r"""
import signal, sys, time
from pathlib import Path
from server.http.live import ServerProcess, terminate_as_interrupt
signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C as in a terminal (a background job ignores it)
port, behaviour, server_code, log = sys.argv[1:5]
cmd = [sys.executable, "-c", server_code, port, behaviour]
with terminate_as_interrupt(), ServerProcess(cmd, Path(log), url=f"http://127.0.0.1:{port}", grace_s=1) as server:
    time.sleep(0.5)  # the grandchild is spawned
    print(server.pgid, flush=True)
    if behaviour in ("fail", "finish"):
        sys.stdin.readline()  # the test has seen the server's group
    if behaviour == "fail":
        raise RuntimeError("the benchmark failed")
    if behaviour in ("wait", "ignore-term"):
        time.sleep(300)
"""


def _gone(pgid: int, timeout_s: float = 10.0) -> list[int]:
    """Members of ``pgid`` still alive after up to ``timeout_s`` (orphans are reaped asynchronously)."""
    deadline = time.monotonic() + timeout_s
    while (left := group_members(pgid)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


def _start(behaviour: str, server_code: str, tmp_path: Path) -> tuple[subprocess.Popen, int]:
    cmd = [sys.executable, "-c", DRIVER, str(free_port()), behaviour, server_code, str(tmp_path / "server.log")]
    driver = subprocess.Popen(
        cmd, cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert driver.stdout is not None
    line = driver.stdout.readline()
    assert line.strip().isdigit(), f"driver did not start its server: {line!r} {driver.stderr.read()}"  # type: ignore[union-attr]
    pgid = int(line)
    assert len(group_members(pgid)) >= 2  # the server and its child are running
    return driver, pgid


@pytest.mark.parametrize(
    ("behaviour", "interrupt"),
    [
        ("wait", signal.SIGINT),  # Ctrl-C
        ("wait", signal.SIGTERM),  # kill <benchmark>
        ("ignore-term", signal.SIGINT),  # a server that ignores SIGTERM is killed after the grace period
        ("fail", None),  # the benchmark raised
        ("finish", None),  # the benchmark ended normally
    ],
)
def test_no_process_of_a_benchmark_server_outlives_the_benchmark(behaviour, interrupt, tmp_path):
    driver, pgid = _start(behaviour, FAKE_SERVER, tmp_path)
    if interrupt is not None:
        driver.send_signal(interrupt)
    else:
        driver.stdin.write("go\n")  # type: ignore[union-attr]
        driver.stdin.flush()  # type: ignore[union-attr]
    driver.wait(30)
    assert _gone(pgid) == []
    if behaviour == "fail":
        assert driver.returncode != 0 and "the benchmark failed" in driver.stderr.read()  # type: ignore[union-attr]


def test_a_real_server_with_an_engine_process_is_stopped_with_its_engine(server_store, tmp_path):
    """``vitmerge serve --worker process`` (the engine in a spawned child) under a driver that gets Ctrl-C."""
    serve = f"""
import os, sys
os.execv(sys.executable, [sys.executable, "-m", "server.cli", "serve", "--store", {str(server_store)!r},
    "--port", sys.argv[1], "--device", "cpu", "--worker", "process", "--watch-interval", "0", "--quiet"])
"""
    driver, pgid = _start("wait", serve, tmp_path)
    driver.send_signal(signal.SIGINT)
    driver.wait(60)
    assert _gone(pgid) == []
