"""A real `vitmerge serve` (uvicorn on 127.0.0.1): concurrency, batching, hot swap under load, shutdown."""

import asyncio
import base64
import random
import re
import signal
import time

import httpx
import pytest
from conftest import SMALL_GATE
from server_helpers import LiveServer, metric_value, png_bytes

from model_store.bundle import BundleStore
from model_store.data.builtin import load_split
from model_store.settings import StoreLayout
from server.runtime.engine import Engine

pytestmark = pytest.mark.slow  # live servers under concurrent load

AUTH = {"authorization": "Bearer s3cret"}
#: requests per client (16 clients): enough for every pool item to be asked and for batches to form
PER_CLIENT = 16


@pytest.fixture(scope="module")
def pool(server_store_template):
    """Mixed-task request pool with the expected answer of each (direct engine calls on v1)."""
    engine = Engine(BundleStore(StoreLayout(server_store_template)).load(), "cpu")
    items = []
    for task in engine.tasks:
        for img in load_split(task, "test", limit=8).images:
            for given in (None, task):
                x, g = engine.preprocess(img, None if given is None else engine.task_index(given))
                out = engine.predict(
                    x[None], [None if given is None else engine.task_index(given)], None if g is None else g[None]
                )[0]
                items.append(
                    {
                        "png": png_bytes(img),
                        "task": given,
                        "want_task": engine.tasks[out.task],
                        "want_class": int(out.probabilities.argmax()),
                        "want_p": float(out.probabilities.max()),
                    }
                )
    return items


async def _client(url: str, items: list, n: int, seed: int, log: list, stop: asyncio.Event | None = None) -> None:
    rng = random.Random(seed)
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        i = 0
        while (i < n) if stop is None else not stop.is_set():
            item = rng.choice(items)
            data = {"task": item["task"]} if item["task"] else {}
            try:
                r = await client.post("/v1/classify", files={"image": ("x.png", item["png"], "image/png")}, data=data)
                log.append((item, r.status_code, r.json() if r.status_code == 200 else r.text, time.monotonic()))
            except httpx.HTTPError as e:
                log.append((item, -1, repr(e), time.monotonic()))
            i += 1


@pytest.mark.parametrize("worker", ["thread", "process"])
def test_16_concurrent_clients_mixed_tasks_all_correct_and_batched(server_store, test_zoo_dir, pool, worker):
    server = LiveServer(server_store, test_zoo_dir, ["--max-wait-ms", "5", "--watch-interval", "0", "--worker", worker])
    try:
        server.wait_ready()
        log: list = []

        async def main():
            await asyncio.gather(*(_client(server.url, pool, PER_CLIENT, seed, log) for seed in range(16)))

        start = time.monotonic()
        asyncio.run(main())
        seconds = time.monotonic() - start
        assert len(log) == 16 * PER_CLIENT
        bad = [(s, body) for _, s, body, _ in log if s != 200]
        assert not bad, bad[:3]
        wrong = []
        for item, _, body, _ in log:
            pred = body["predictions"][0]
            if (
                pred["task"]["name"] != item["want_task"]
                or pred["class"]["index"] != item["want_class"]
                or abs(pred["class"]["probability"] - item["want_p"]) > 1e-4
            ):
                wrong.append((item["task"], item["want_task"], item["want_class"], pred))
        assert not wrong, wrong[:3]
        text = httpx.get(f"{server.url}/metrics").text
        batches = metric_value(text, "vitmerge_batch_size_count")
        singles = metric_value(text, "vitmerge_batch_size_bucket", 'le="1.0"')
        images = metric_value(text, "vitmerge_batch_size_sum")
        n = 16 * PER_CLIENT
        print(
            f"\n[{worker}] {n} requests in {seconds:.1f} s ({n / seconds:.0f} req/s); {batches:.0f} batches, mean size "
            f"{images / batches:.2f}"
        )
        assert images == n and batches > singles and images / batches > 1.5
        # every prediction is counted under how its task was chosen and the task it went to
        for source in ("gate", "given"):
            for task in {item["want_task"] for item, *_ in log}:
                want = sum(
                    1 for item, *_ in log if (item["task"] is None) == (source == "gate") and item["want_task"] == task
                )
                label = f'source="{source}",task="{task}"'
                assert (metric_value(text, "vitmerge_predictions_total", label) if want else 0) == want, (label, want)
    finally:
        server.terminate()


def test_merge_while_16_clients_classify_zero_failures(server_store, test_zoo_dir, pool):
    server = LiveServer(server_store, test_zoo_dir, ["--watch-interval", "0"])
    try:
        server.wait_ready()
        log: list = []
        job: dict = {}

        async def main():
            stop = asyncio.Event()
            clients = [asyncio.create_task(_client(server.url, pool, 0, seed, log, stop)) for seed in range(16)]
            while len(log) < 50:  # traffic flows on v1
                await asyncio.sleep(0.05)
            async with httpx.AsyncClient(base_url=server.url, timeout=60) as admin:
                r = await admin.post("/v1/merge", json={"method": "emr_routed", "params": SMALL_GATE}, headers=AUTH)
                assert r.status_code == 202, r.text
                while True:
                    job.update((await admin.get(f"/v1/merge/{r.json()['id']}", headers=AUTH)).json())
                    if job["state"] in ("succeeded", "failed"):
                        break
                    await asyncio.sleep(0.2)
                job["done_at"] = time.monotonic()
            while sum(1 for *_, t in log if t > job["done_at"] + 0.2) < 50:  # traffic flows on v2
                await asyncio.sleep(0.05)
            stop.set()
            await asyncio.gather(*clients)

        asyncio.run(main())
        assert job["state"] == "succeeded", job
        failed = [(s, body) for _, s, body, _ in log if s != 200]
        assert not failed, failed[:3]
        versions = [body["model_version"] for _, _, body, _ in log]
        assert set(versions) == {"v1", "v2"}, set(versions)
        after = [body["model_version"] for _, _, body, t in log if t > job["done_at"] + 0.2]
        assert after and set(after) == {"v2"}
        print(
            f"\n{len(log)} requests during the merge, 0 failed; {versions.count('v1')} on v1, {versions.count('v2')} "
            "on v2"
        )
    finally:
        server.terminate()


def test_graceful_shutdown_drains_in_flight_requests(server_store, test_zoo_dir, pool):
    """SIGTERM while a hundred images wait (one image per batch): every request is answered, correctly; the
    server's log says what was queued when the signal came -- more than nothing, so the drain had work."""
    server = LiveServer(server_store, test_zoo_dir, ["--max-batch-size", "1", "--watch-interval", "0"])
    server.wait_ready()
    routed = [item for item in pool if item["task"] is None]  # 32 images, the gate picks their tasks
    body = {"images": [base64.b64encode(item["png"]).decode() for item in routed]}

    async def main():
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            requests = [asyncio.create_task(client.post("/v1/classify", json=body)) for _ in range(4)]
            deadline = time.monotonic() + 60  # a hang guard
            while metric_value((await client.get("/metrics")).text, "vitmerge_queue_depth") < 16:
                assert time.monotonic() < deadline and not any(r.done() for r in requests)
                await asyncio.sleep(0.01)
            server.proc.send_signal(signal.SIGTERM)
            return await asyncio.gather(*requests)

    try:
        answers = asyncio.run(main())
        code = server.proc.wait(60)
    finally:
        server.terminate()
    assert [r.status_code for r in answers] == [200] * 4, [r.text[:200] for r in answers]
    for r in answers:
        got = [(p["task"]["name"], p["class"]["index"]) for p in r.json()["predictions"]]
        assert got == [(item["want_task"], item["want_class"]) for item in routed]
    assert code in (0, -signal.SIGTERM)  # uvicorn re-raises the signal after its graceful shutdown
    lines = [ln for ln in server.log.read_text().splitlines() if "SIGTERM: stopping gracefully" in ln]
    assert len(lines) == 1, server.log.read_text()[-2000:]
    queued = int(re.search(r"; (\d+) image\(s\) queued", lines[0]).group(1))
    assert queued > 0, lines[0]  # the stop began with images waiting: they were drained, not lost
