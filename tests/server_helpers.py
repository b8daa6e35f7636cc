"""Helpers for the server tests: crafted images, an in-process ASGI harness, a real uvicorn."""

from __future__ import annotations

import asyncio
import io
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from server.http.app import create_app
from server.http.readiness import wait_until_ready
from server.http.settings import ServerSettings

REPO = Path(__file__).resolve().parent.parent


def png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def image_bytes(arr: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def huge_png_header(width: int = 100_000, height: int = 100_000) -> bytes:
    """A valid PNG signature + IHDR claiming ``width x height`` pixels, with a tiny IDAT."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", ihdr)
        + _chunk(b"IDAT", zlib.compress(b"\x00" * 16))
        + _chunk(b"IEND", b"")
    )


def gif_bomb(width: int = 65_535, height: int = 65_535) -> bytes:
    """A GIF whose logical screen claims ``width x height`` pixels (one 1x1 frame)."""
    header = b"GIF89a" + struct.pack("<HHBBB", width, height, 0x80, 0, 0) + b"\x00\x00\x00\xff\xff\xff"
    frame = b"," + struct.pack("<HHHHB", 0, 0, 1, 1, 0) + b"\x02\x02\x44\x01\x00"
    return header + frame + b";"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class AsgiHarness:
    """The real app (lifespan included) behind ``httpx.ASGITransport`` on a background loop."""

    def __init__(self, settings: ServerSettings, wait_ready: bool = True):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.app = create_app(settings)
        self.state = self.app.state.vitmerge
        self._lifespan = self.app.router.lifespan_context(self.app)
        self.call(self._lifespan.__aenter__())
        self.client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=self.app), base_url="http://testserver", timeout=60
        )
        if wait_ready:
            self.wait_ready()

    def call(self, coro, timeout: float = 120):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def request(self, method: str, url: str, **kwargs) -> httpx.Response:
        return self.call(self.client.request(method, url, **kwargs))

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.request("GET", "/readyz").status_code == 200:
                return
            if self.state.manager.state == "failed":
                raise RuntimeError(f"server failed to start: {self.state.manager.error}")
            time.sleep(0.05)
        raise TimeoutError("server not ready")

    def close(self) -> None:
        self.call(self.client.aclose())
        self.call(self._lifespan.__aexit__(None, None, None))
        # join the loop's executor threads: a thread that ran torch keeps an OpenMP team alive, and
        # once there are more of those than cores libgomp stops spinning, which slows every later
        # torch call in this process (measured 1.6x on a gate training with 10 such idle threads)
        self.call(self.loop.shutdown_default_executor())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


class LiveServer:
    """``vitmerge serve`` in a subprocess on a free loopback port."""

    def __init__(
        self,
        store: Path,
        zoo: Path,
        extra: list[str] | None = None,
        env: dict[str, str] | None = None,
        port: int | None = None,
    ):
        self.port = port or free_port()
        self.store = store
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = store / f"serve-{self.port}.log"
        script = Path(sys.executable).parent / "vitmerge"  # the console script: exactly the Dockerfile's entrypoint
        launcher = [str(script)] if script.exists() else [sys.executable, "-m", "server.cli"]
        cmd = [
            *launcher,
            "serve",
            "--store",
            str(store),
            "--zoo",
            str(zoo),
            "--port",
            str(self.port),
            "--admin-token",
            "s3cret",
            "--quiet",
            *(extra or []),
        ]
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=self.log.open("w"), stderr=subprocess.STDOUT, env=full_env)

    def wait_ready(self, timeout: float = 120) -> None:
        wait_until_ready(self.url, timeout, self.proc, self.log.read_text)

    def terminate(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode


def metric_value(text: str, name: str, labels: str = "") -> float:
    """The value of ``name{labels}`` in Prometheus text (sum over matching lines)."""
    total, found = 0.0, False
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        if key == name + (f"{{{labels}}}" if labels else "") or (not labels and key.startswith(name + "{")):
            total += float(value)
            found = True
    if not found:
        raise KeyError(f"{name}{{{labels}}} not in metrics")
    return total


def require(module: str, install: str):
    """Import ``module`` or FAIL (never skip) with the command that installs it: the set-up installs every
    test dependency."""
    import importlib

    import pytest

    try:
        return importlib.import_module(module)
    except ImportError as e:
        pytest.fail(f"{module} is missing ({e}); install it with: {install}   (or run `make setup`)", pytrace=False)


def require_file(path: str, install: str) -> None:
    """FAIL (never skip) when a tool the set-up installs is missing."""
    import pytest

    if not Path(path).exists():
        pytest.fail(f"{path} is missing; install it with: {install}   (or run `make setup` as root)", pytrace=False)


class BlockingEngine:
    """The served engine, except that a batch (``run``: decode + predict, the batcher's call; or ``predict``)
    waits until :attr:`release` is set (a test double for a slow batch: it holds the worker so that later images
    stay queued). Everything else is the real engine's."""

    def __init__(self, engine, timeout: float = 60):
        self._engine, self.timeout = engine, timeout
        self.release, self.entered = threading.Event(), threading.Event()

    def __getattr__(self, name: str):
        return getattr(self._engine, name)

    def predict(self, *args, **kwargs):
        self.entered.set()
        self.release.wait(self.timeout)
        return self._engine.predict(*args, **kwargs)

    def run(self, *args, **kwargs):
        self.entered.set()
        self.release.wait(self.timeout)
        return self._engine.run(*args, **kwargs)


def wait_for(cond, timeout: float = 60, what: str = "condition") -> None:
    """Poll ``cond`` until true (a hang guard of ``timeout`` seconds, not a promise about speed)."""
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
#: as root (no sandbox), headless, and with no network of its own: nothing but the page's own requests
CHROMIUM_FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1400,1100",
)


def headless_chromium(profile: Path):
    """Debian's Chromium driven by selenium through Debian's chromedriver, with a fresh profile in ``profile``.

    FAILS (never skips) when the set-up did not install them; the browser's console is logged (``get_log``)."""
    webdriver = require("selenium.webdriver", "pip install selenium==4.51.0")
    for path in (CHROMIUM, CHROMEDRIVER):
        require_file(path, "apt-get install -y chromium chromium-driver")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))  # a given driver: no Selenium Manager
