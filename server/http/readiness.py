"""Waiting for a ``vitmerge serve`` process to be ready (``/readyz`` 200): for scripts, benchmarks and tests."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable

import httpx


def wait_until_ready(
    url: str,
    timeout_s: float = 120.0,
    process: subprocess.Popen | None = None,
    describe: Callable[[], str] = lambda: "",
    poll_s: float = 0.1,
    on_poll: Callable[[], None] | None = None,
) -> None:
    """Poll ``url/readyz`` until it answers 200.

    Raises RuntimeError when ``process`` exits first and TimeoutError after ``timeout_s``;
    both messages end with ``describe()`` (e.g. the server's log).
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{describe()}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if on_poll is not None:
            on_poll()
        time.sleep(poll_s)
    raise TimeoutError(f"server at {url} not ready after {timeout_s:g} s:\n{describe()}")
