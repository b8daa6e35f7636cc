"""A failed startup load is retried on the watch interval: fixing the store brings the server up by itself.

(A store written by another user used to leave the server 503 for good: the image runs as uid
10001 and safetensors wrote 0600 files. Tests run as root, which reads any file, so a store that
cannot be loaded yet is simulated with a corrupt byte, undone later: the same failed load.)
"""

from __future__ import annotations

import time
from pathlib import Path

from server_helpers import AsgiHarness

from server.http.settings import ServerSettings


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def _wait(cond, timeout: float = 60, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_a_store_fixed_after_a_failed_start_is_served_within_the_watch_interval(server_store, test_zoo_dir):
    heads = server_store / "bundles" / "v1" / "heads.safetensors"
    _flip_last_byte(heads)
    settings = ServerSettings(
        store=server_store, zoo=str(test_zoo_dir), watch_interval_s=0.2, device="cpu", admin_token="s3cret"
    )
    h = AsgiHarness(settings, wait_ready=False)
    try:
        _wait(lambda: h.state.manager.state == "failed", what="startup to fail")
        r = h.request("GET", "/readyz")
        assert r.status_code == 503 and "heads.safetensors" in r.json()["error"]["message"], r.text
        time.sleep(0.5)  # a few polls: still failing, still reported, nothing else merged
        assert h.request("GET", "/readyz").status_code == 503
        assert sorted(p.name for p in (server_store / "bundles").iterdir()) == ["v1"]
        _flip_last_byte(heads)  # the operator fixes the store (chmod, a finished copy, a late mount)
        _wait(lambda: h.state.manager.version == "v1", timeout=30, what="the retry to load v1")
        r = h.request("GET", "/readyz")
        assert r.status_code == 200 and r.json()["model_version"] == "v1", r.text
    finally:
        h.close()
