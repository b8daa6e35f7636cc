"""The inference routes are served by the middleware's fast path, with the app's own answers and errors."""

import numpy as np
from server_helpers import AsgiHarness, png_bytes

from server.http.settings import ServerSettings


def test_inference_routes_take_the_fast_path_and_answer_as_the_app_would(server_store_template):
    h = AsgiHarness(ServerSettings(store=server_store_template, watch_interval_s=0, device="cpu"))
    try:
        fast = {r.path for r in h.app.state.fast_routes}
        assert fast == {
            "/v1/classify",
            "/classify",
            "/v2/models/{name}/infer",
            "/v2/models/{name}/versions/{version}/infer",
        }
        engine = h.state.manager.engine
        png = png_bytes(np.zeros((28, 28), dtype=np.uint8))
        image = {"content-type": "image/png"}
        ok = h.request("POST", f"/v1/classify?task={engine.tasks[0]}", content=png, headers=image)
        assert ok.status_code == 200 and ok.headers["x-model-version"] == engine.version
        assert ok.json()["predictions"][0]["task"]["name"] == engine.tasks[0]
        # errors: the app's JSON bodies, request ids and statuses
        bad = h.request("POST", "/v1/classify?task=nope", content=png, headers={**image, "x-request-id": "r1"})
        assert bad.status_code == 422 and bad.json()["error"] == {
            "code": "unknown_task",
            "message": f"unknown task 'nope'; this model serves: {', '.join(engine.tasks)}",
            "request_id": "r1",
        }
        broken = h.request("POST", "/v1/classify", content=b"\x89PNG broken", headers=image)
        assert broken.status_code == 400 and broken.json()["error"]["code"] == "invalid_image"
        v2 = h.request("POST", "/v2/models/other/infer", json={"inputs": []})
        assert v2.status_code == 404 and set(v2.json()) == {"error"}  # the protocol's error form
        # other methods still go through the app: 405 from its router
        assert h.request("GET", "/v1/classify").status_code == 405
        metrics = h.request("GET", "/metrics").text
        counted = [
            line.split("status=")[1][1:4]
            for line in metrics.splitlines()
            if line.startswith("vitmerge_requests_total{") and 'route="/v1/classify"' in line and "POST" in line
        ]
        assert sorted(counted) == ["200", "400", "422"]  # the fast path's requests are counted under their route
    finally:
        h.close()
