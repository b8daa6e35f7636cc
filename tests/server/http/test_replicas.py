"""Two servers sharing one store: a merge on one reaches the other; merges are exclusive."""

import time

from conftest import SMALL_GATE
from server_helpers import AsgiHarness

from server.http.settings import ServerSettings

AUTH = {"authorization": "Bearer s3cret"}


def _settings(store, zoo) -> ServerSettings:
    return ServerSettings(store=store, zoo=str(zoo), admin_token="s3cret", watch_interval_s=0.2, device="cpu")


def test_replicas_converge_and_merges_are_exclusive(server_store, test_zoo_dir):
    a = AsgiHarness(_settings(server_store, test_zoo_dir))
    b = AsgiHarness(_settings(server_store, test_zoo_dir))
    try:
        assert a.state.manager.version == b.state.manager.version == "v1"
        first = a.request("POST", "/v1/merge", json={"method": "emr_routed", "params": SMALL_GATE}, headers=AUTH)
        assert first.status_code == 202
        other = b.request(
            "POST", "/v1/merge", json={"method": "avg"}, headers=AUTH
        )  # store-level lock held by replica a
        assert other.status_code == 409 and "another replica" in other.json()["error"]["message"]
        deadline = time.monotonic() + 120
        while a.request("GET", f"/v1/merge/{first.json()['id']}", headers=AUTH).json()["state"] not in (
            "succeeded",
            "failed",
        ):
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert a.state.manager.version == "v2"
        swapped = time.monotonic()
        while b.state.manager.version != "v2":
            assert time.monotonic() - swapped < 120, "replica b never followed CURRENT"  # a hang guard
            time.sleep(0.05)
        assert b.request("GET", "/readyz").json()["model_version"] == "v2"
        assert b.request("GET", "/v1/models").json()["serving"] == "v2"
    finally:
        a.close()
        b.close()
