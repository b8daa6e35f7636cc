"""Loopback cluster: 2 `vitmerge serve` replicas on one store behind nginx (deploy/nginx.conf).

Mixed-task traffic goes through nginx the whole time; a merge on one replica must
reach both within 10 s with no failed request; `kill -9` of a replica under load must
not stop nginx from answering; the restarted replica rejoins on the current version.
"""

import asyncio
import os
import random
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from conftest import SMALL_GATE
from server_helpers import LiveServer, free_port, png_bytes, require_file

from model_store.data.builtin import load_split

pytestmark = pytest.mark.slow  # two live replicas behind nginx, a merge under load

REPO = Path(__file__).resolve().parents[3]
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
AUTH = {"authorization": "Bearer s3cret"}


def nginx_config(tmp: Path, replica_ports: list[int], listen: int) -> Path:
    """deploy/nginx.conf with loopback upstreams, a loopback listen port and private temp paths."""
    conf = (REPO / "deploy" / "nginx.conf").read_text()
    names = re.findall(r"server\s+(vitmerge-\d+):8000", conf)
    assert len(names) == len(replica_ports)
    for name, port in zip(names, replica_ports):
        conf = conf.replace(f"server {name}:8000", f"server 127.0.0.1:{port}")
    conf = conf.replace("listen 8080;", f"listen 127.0.0.1:{listen};")
    temp = "\n".join(
        f"    {kind}_temp_path {tmp}/{kind};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    conf = conf.replace("http {", "http {\n" + temp, 1)
    if os.geteuid() == 0:
        conf = "user root;\n" + conf
    path = tmp / "nginx.conf"
    path.write_text(conf)
    return path


@pytest.fixture
def nginx_lb(tmp_path):
    def start(replica_ports: list[int]) -> tuple[str, subprocess.Popen]:
        listen = free_port()
        conf = nginx_config(tmp_path, replica_ports, listen)
        proc = subprocess.Popen(
            [
                NGINX,
                "-p",
                str(tmp_path),
                "-c",
                str(conf),
                "-g",
                f"daemon off; pid {tmp_path}/nginx.pid; error_log {tmp_path}/error.log warn;",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )
        procs.append(proc)
        return f"http://127.0.0.1:{listen}", proc

    procs: list[subprocess.Popen] = []
    yield start
    for proc in procs:
        proc.terminate()
        proc.wait(10)


def _pool() -> list[tuple[str, bytes]]:
    return [
        (task, png_bytes(img))
        for task in ("mnist", "animals", "solar", "digits")
        for img in load_split(task, "test", limit=6).images
    ]


async def _traffic(url: str, pool, clients: int, stop: asyncio.Event, log: list) -> None:
    async def client(seed: int) -> None:
        rng = random.Random(seed)
        async with httpx.AsyncClient(base_url=url, timeout=30) as c:
            while not stop.is_set():
                task, png = rng.choice(pool)
                data = {"task": task} if rng.random() < 0.5 else {}
                t = time.monotonic()
                try:
                    r = await c.post("/v1/classify", files={"image": ("x.png", png)}, data=data)
                    log.append(
                        (
                            t,
                            time.monotonic(),
                            r.status_code,
                            r.json().get("model_version") if r.status_code == 200 else r.text[:200],
                        )
                    )
                except httpx.HTTPError as e:
                    log.append((t, time.monotonic(), -1, repr(e)))

    await asyncio.gather(*(client(k) for k in range(clients)))


def _version(url: str) -> str | None:
    try:
        r = httpx.get(f"{url}/readyz", timeout=2)
        return r.json().get("model_version") if r.status_code == 200 else None
    except httpx.HTTPError:
        return None


def test_two_replicas_behind_nginx_converge_and_fail_over(server_store, test_zoo_dir, nginx_lb):
    require_file(NGINX, "apt-get install -y nginx-light")
    flags = ["--watch-interval", "1"]
    a = LiveServer(server_store, test_zoo_dir, flags)
    b = LiveServer(server_store, test_zoo_dir, flags)
    servers = [a, b]
    try:
        a.wait_ready()
        b.wait_ready()
        lb, _ = nginx_lb([a.port, b.port])
        deadline = time.monotonic() + 20
        while _version(lb) != "v1":
            assert time.monotonic() < deadline, "nginx did not come up"
            time.sleep(0.1)
        pool = _pool()
        log: list = []
        report: dict = {}

        async def answered_since(t0: float, n: int = 20, timeout: float = 30) -> None:
            """Poll until ``n`` requests that started after ``t0`` were answered 200 (no fixed sleeps)."""
            deadline = time.monotonic() + timeout
            while sum(1 for e in log if e[0] > t0 and e[2] == 200) < n:
                assert time.monotonic() < deadline, f"fewer than {n} answers since t={t0:.1f}"
                await asyncio.sleep(0.05)

        async def scenario() -> None:
            stop = asyncio.Event()
            traffic = asyncio.create_task(_traffic(lb, pool, 8, stop, log))
            await answered_since(0.0)
            async with httpx.AsyncClient(timeout=30) as admin:
                r = await admin.post(
                    f"{a.url}/v1/merge", json={"method": "emr_routed", "params": SMALL_GATE}, headers=AUTH
                )
                assert r.status_code == 202, r.text
                while True:
                    job = (await admin.get(f"{a.url}/v1/merge/{r.json()['id']}", headers=AUTH)).json()
                    if job["state"] in ("succeeded", "failed"):
                        break
                    await asyncio.sleep(0.1)
                assert job["state"] == "succeeded", job
                published = time.monotonic()
                while await asyncio.to_thread(_version, b.url) != job["version"]:
                    assert time.monotonic() - published < 120, "replica b never followed CURRENT"  # a hang guard
                    await asyncio.sleep(0.05)
                report["convergence_s"] = time.monotonic() - published
                assert await asyncio.to_thread(_version, a.url) == job["version"]
                report["version"] = job["version"]
                await answered_since(time.monotonic())
                report["killed_at"] = time.monotonic()
                b.proc.send_signal(signal.SIGKILL)  # under load
                b.proc.wait(10)
                await answered_since(report["killed_at"])  # nginx answers from the survivor
                report["restart_at"] = time.monotonic()
                servers.append(LiveServer(server_store, test_zoo_dir, flags, port=b.port))
                await asyncio.to_thread(servers[-1].wait_ready)
                report["rejoined_version"] = await asyncio.to_thread(_version, servers[-1].url)
                await answered_since(time.monotonic())
            stop.set()
            await traffic

        asyncio.run(scenario())
        before_kill = [e for e in log if e[1] < report["killed_at"]]
        after_kill = [e for e in log if e[0] > report["killed_at"]]
        failed_before = [e for e in before_kill if e[2] != 200]
        failed_after = [e for e in log if e[2] != 200 and e[1] >= report["killed_at"]]
        versions = [e[3] for e in before_kill if e[2] == 200]
        print(
            f"\n{len(log)} requests through nginx; merge converged on the other replica in "
            f"{report['convergence_s']:.2f} s; "
            f"{len(failed_before)} failed before the kill; {len(failed_after)} failed after kill -9 "
            f"({len([e for e in after_kill if e[2] == 200])} answered after it); rejoined on "
            f"{report['rejoined_version']}"
        )
        assert not failed_before, failed_before[:3]
        assert set(versions) <= {"v1", report["version"]}
        assert not failed_after, failed_after[:3]  # nginx retries classify on the other replica: nothing is lost
        assert len([e for e in after_kill if e[2] == 200]) > 20  # nginx kept answering
        assert report["rejoined_version"] == report["version"]
        late = [e[3] for e in log if e[0] > report["restart_at"] and e[2] == 200]
        assert late and set(late) == {report["version"]}
    finally:
        for s in servers:
            s.terminate()
