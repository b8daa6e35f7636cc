"""Serving benchmark: HTTP throughput/latency with and without dynamic batching, engine
throughput vs a plain single ViT, and resident memory vs N separate models.

    .venv/bin/python benchmarks/serve.py                 # CPU, tiny zoo (+ ViT-B/16-size engine rows)
    python3 benchmarks/serve.py --device cuda --prepared  # on a GPU machine, with a carried bench store

(a) `vitmerge serve` with batching (max batch 32, max wait 5 ms), (b) the same server with
batching off (max batch 1), each at concurrency 1, 4, 16 with single-image multipart
requests, task NOT given (gate -> routed EMR), images drawn from every task's TEST split;
(c) a plain single timm ViT forward in-process at the mean batch size (a) formed at that
concurrency -- the limit. Engine rows: mixed-task batches of 32 through the engine (task
given; routed with the gate; cache off) vs the plain ViT on the same batches. Memory:
tensor bytes the engine holds vs N separate models (backbone + head each).

Writes benchmarks/results/serve[-<device>].{json,md} and serve[-<device>].png.

Feeds BENCHMARKS.md, section "Serving (issue 5)".
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from model_store.architecture import build_model
from model_store.bundle import BundleStore
from model_store.settings import StoreLayout
from server.http.live import ServerProcess, free_port, terminate_as_interrupt
from server.runtime.engine import Engine, EngineOptions
from server.runtime.strategies import EMRStrategy

REPO = Path(__file__).resolve().parent.parent

RESULTS = REPO / "benchmarks" / "results"
BENCH_STORE = REPO / "benchmarks" / ".serve-store"
CONCURRENCY = (1, 4, 16)


# -- preparation (CPU machine with the offline datasets) ---------------------------------------
def prepare(store: Path, per_task: int = 64) -> None:
    """Bench store with the tiny zoo's default routed-EMR bundle + a pool of TEST images as PNG."""
    from merging.pipeline import merge_and_publish
    from model_store.data.builtin import load_split
    from model_store.zoo_build.presets import build_zoo

    zoo = build_zoo("tiny", REPO / "store" / "zoos" / "tiny", progress=True).zoo
    bstore = BundleStore(StoreLayout(store))
    if bstore.current_version() is None:
        merge_and_publish(zoo, bstore, "emr_routed", {}, progress=True)
    pool = store / "pool"
    if not pool.exists():
        pool.mkdir(parents=True)
        for task in zoo.tasks:
            for i, img in enumerate(load_split(task, "test", limit=per_task).images):
                Image.fromarray(img).save(pool / f"{task}_{i:03d}.png")


def load_pool(store: Path) -> list[tuple[str, bytes]]:
    files = sorted((store / "pool").glob("*.png"))
    rng = np.random.default_rng(0)
    order = rng.permutation(len(files))
    return [(files[i].name.split("_")[0], files[i].read_bytes()) for i in order]


# -- HTTP --------------------------------------------------------------------------------------
class Server(ServerProcess):
    """``vitmerge serve`` on a free port, in its own process group (stopped with its children)."""

    def __init__(self, store: Path, device: str, max_batch: int, max_wait_ms: float = 5.0):
        port = free_port()
        cmd = [sys.executable, "-m", "server.cli", "serve", "--store", str(store), "--port", str(port)]
        cmd += ["--device", device, "--max-batch-size", str(max_batch), "--max-wait-ms", str(max_wait_ms)]
        cmd += ["--watch-interval", "0", "--quiet"]
        env = {**os.environ, "VITMERGE_ZOO": "tiny"}
        super().__init__(cmd, store / f"serve-{port}.log", cwd=REPO, env=env, url=f"http://127.0.0.1:{port}")

    def batches(self) -> tuple[float, float]:
        text = httpx.get(f"{self.url}/metrics").text
        vals = {}
        for line in text.splitlines():
            if line.startswith("vitmerge_batch_size_count") or line.startswith("vitmerge_batch_size_sum"):
                key, _, v = line.rpartition(" ")
                vals[key] = float(v)
        return vals.get("vitmerge_batch_size_count", 0.0), vals.get("vitmerge_batch_size_sum", 0.0)


async def _load(
    url: str, pool: list[tuple[str, bytes]], concurrency: int, total: int
) -> tuple[list[float], int, float, dict]:
    latencies: list[float] = []
    timing: dict[str, list[float]] = {"decode_ms": [], "queue_ms": [], "inference_ms": [], "total_ms": []}
    errors = 0
    counter = iter(range(total))

    async def client(k: int) -> None:
        nonlocal errors
        async with httpx.AsyncClient(base_url=url, timeout=120) as c:
            for i in counter:
                _, png = pool[(i * 7 + k) % len(pool)]
                t = time.perf_counter()
                r = await c.post("/v1/classify", files={"image": ("x.png", png, "image/png")})
                latencies.append(time.perf_counter() - t)
                errors += r.status_code != 200
                if r.status_code == 200:
                    for key, values in timing.items():
                        values.append(r.json()["timing"][key])

    start = time.perf_counter()
    await asyncio.gather(*(client(k) for k in range(concurrency)))
    return (
        latencies,
        errors,
        time.perf_counter() - start,
        {k: float(np.mean(v)) if v else 0.0 for k, v in timing.items()},
    )


def http_rows(store: Path, device: str, pool, requests: dict[int, int], max_wait_ms: float = 5.0) -> list[dict]:
    rows = []
    for name, max_batch in (("batching", 32), ("no batching", 1)):
        with Server(store, device, max_batch, max_wait_ms) as server:
            asyncio.run(_load(server.url, pool, 4, 64))  # warm-up
            for conc in tqdm(CONCURRENCY, desc=f"http {name}"):
                c0, s0 = server.batches()
                lat, errors, seconds, timing = asyncio.run(_load(server.url, pool, conc, requests[conc]))
                c1, s1 = server.batches()
                lat_ms = np.array(lat) * 1000
                rows.append(
                    {
                        "server": name,
                        "concurrency": conc,
                        "requests": len(lat),
                        "errors": errors,
                        "rps": len(lat) / seconds,
                        "p50_ms": float(np.percentile(lat_ms, 50)),
                        "p99_ms": float(np.percentile(lat_ms, 99)),
                        "mean_batch": (s1 - s0) / max(c1 - c0, 1),
                        "server_timing_ms": timing,
                    }
                )
    return rows


# -- in-process: plain ViT and the engine ------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def rate(fn, batches: list, device: torch.device, repeats: int = 3) -> float:
    """Images per second of ``fn`` over ``batches`` (best of ``repeats``, after one warm-up)."""
    fn(batches[0])
    _sync(device)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        for b in batches:
            fn(b)
        _sync(device)
        best = min(best, time.perf_counter() - t)
    return sum(b["n"] for b in batches) / best


def plain_vit(engine: Engine) -> torch.nn.Module:
    """One ordinary timm ViT (task 0's materialised weights + head) -- what a user would deploy per task."""
    task = engine.tasks[0]
    model = build_model(engine.models.architecture, len(engine.class_names[task]))
    weights = (
        engine.kind_strategy.materialise(0)
        if isinstance(engine.kind_strategy, EMRStrategy)
        else engine.models.task_backbone(task)
    )
    model.load_state_dict({**{k: v.cpu() for k, v in weights.items()}, **engine.models.head(task)})
    return model.to(engine.device).eval()


@torch.inference_mode()
def routed_task(engine: Engine, img: np.ndarray) -> int:
    """The task the engine's gate routes ``img`` to."""
    gate_input = engine.preprocess(img, None)[1]
    assert engine.gate is not None and gate_input is not None, "the bundle has no gate"
    return int(engine.gate(gate_input[None].to(engine.device).contiguous(memory_format=torch.channels_last)).argmax(1))


def engine_batches(engine: Engine, images: list[tuple[int, np.ndarray]], batch: int) -> list[dict]:
    out = []
    for start in range(0, len(images) - batch + 1, batch):
        chunk = images[start : start + batch]
        xs, gs = zip(*(engine.preprocess(img, None) for _, img in chunk))
        out.append({"n": batch, "x": torch.stack(xs), "g": torch.stack(gs), "tasks": [t for t, _ in chunk]})
    return out


@torch.inference_mode()
def engine_rows(engine: Engine, batches: list[dict], label: str) -> list[dict]:
    dev = engine.device
    vit = plain_vit(engine)
    moved = [{**b, "x": b["x"].to(dev), "g": b["g"].to(dev)} for b in batches]
    plain = rate(lambda b: vit(b["x"]).softmax(-1).cpu(), moved, dev)
    cache = engine.cache.budget
    engine.cache.budget = 1 << 40  # every task's weights cached
    given = rate(lambda b: engine.predict(b["x"], b["tasks"]), moved, dev)
    routed = rate(lambda b: engine.predict(b["x"], [None] * b["n"], b["g"]), moved, dev)
    engine.cache.budget = 0
    engine.cache.clear()
    cold = rate(lambda b: engine.predict(b["x"], [None] * b["n"], b["g"]), moved, dev)
    engine.cache.budget = cache
    gate_only = rate(lambda b: engine.gate(b["g"]).softmax(-1).cpu(), moved, dev)
    extra = []
    if engine.use_graphs:  # the same engine without CUDA graphs, and the plain ViT WITH one
        from server.runtime.engine import GraphRunner

        eager = Engine(engine.bundle, EngineOptions(str(dev), cache_bytes=1 << 40, cuda_graphs=False))
        graphed_vit = GraphRunner(vit, torch.cuda.graph_pool_handle())
        extra = [
            (
                "engine, routed, all cached, WITHOUT CUDA graphs",
                rate(lambda b: eager.predict(b["x"], [None] * b["n"], b["g"]), moved, dev),
            ),
            (
                "plain single ViT replayed as a CUDA graph",
                rate(lambda b: graphed_vit(b["x"]).softmax(-1).cpu(), moved, dev),
            ),
        ]
        del eager
    rows = [
        ("plain single ViT (one task's model)", plain),
        ("engine, task given (EMR, grouped by task), all tasks cached", given),
        ("engine, routed (gate + EMR), all tasks cached", routed),
        ("engine, routed, weight cache off (materialise per batch)", cold),
        ("gate alone", gate_only),
        *extra,
    ]
    return [{"model": label, "config": name, "img_s": r, "vs_plain": r / plain} for name, r in rows]


@torch.inference_mode()
def memory_rows(engine: Engine, batches: list[dict], label: str) -> dict:
    """Tensor bytes after mixed-task traffic (cache filled up to its budget)."""
    for b in batches:
        engine.predict(b["x"].to(engine.device), b["tasks"])
    model_bytes = sum(t.numel() * t.element_size() for t in plain_vit(engine).state_dict().values())
    parts = engine.resident_bytes()
    cached = parts.get("weight_cache", 0)
    no_cache = sum(parts.values()) - cached
    n = len(engine.tasks)
    return {
        "model": label,
        "tasks": n,
        "one_model_mb": model_bytes / 2**20,
        "n_models_mb": n * model_bytes / 2**20,
        "engine_no_cache_mb": no_cache / 2**20,
        "engine_with_cache_mb": (no_cache + cached) / 2**20,
        "cached_tasks": len(engine.cache.keys()),
        "engine_all_cached_mb": (no_cache + n * model_bytes) / 2**20,
        "cache_budget_mb": engine.cache.budget / 2**20,
        "gate_mb": parts.get("gate", 0) / 2**20,
        "parts_mb": {k: v / 2**20 for k, v in parts.items()},
    }


def synthetic_vit_b_bundle(root: Path, n_tasks: int = 5, seed: int = 0) -> Path:
    """An EMR + gate bundle of ViT-B/16 size (random weights; speed and memory only, not accuracy)."""
    from merging.synthetic import publish_synthetic, synthetic_gate, synthetic_zoo
    from model_store.schema import Architecture

    store = BundleStore(StoreLayout(root))
    if store.current_version() is not None:
        return root
    arch = Architecture(timm_name="vit_base_patch16_224")
    zoo = synthetic_zoo(arch, n_tasks, seed, delta=1e-3)
    # centred on random images: an uncentred random gate routes every image to one task
    gate = synthetic_gate(n_tasks, 64, seed)[0]
    publish_synthetic(store, "emr_routed", arch, 224, zoo, gate)  # made CURRENT
    return root


# -- report ------------------------------------------------------------------------------------
def render(res: dict) -> str:
    lines = [f"Command: `{res['command']}`  ", f"Machine: {res['machine']}; device {res['device']}; {res['date']}.", ""]
    lines += [
        "HTTP, single-image requests, task not given (gate -> routed EMR), tiny zoo:",
        "",
        "| server | concurrency | req/s | p50 ms | p99 ms | mean batch | errors | server-side mean ms: decode / queue "
        "/ inference / total |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in res["http"]:
        t = r["server_timing_ms"]
        lines.append(
            f"| {r['server']} | {r['concurrency']} | {r['rps']:.0f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | "
            f"{r['mean_batch']:.1f} | {r['errors']} | "
            f"{t['decode_ms']:.1f} / {t['queue_ms']:.1f} / {t['inference_ms']:.1f} / {t['total_ms']:.1f} |"
        )
    lines += [
        "",
        "| concurrency | (a) batching req/s | (b) no batching req/s | (a)/(b) | (c) plain ViT in-process img/s at "
        "(a)'s batch | (a)/(c) |",
        "|---|---|---|---|---|---|",
    ]
    for c in res["limit"]:
        lines.append(
            f"| {c['concurrency']} | {c['a']:.0f} | {c['b']:.0f} | {c['a'] / c['b']:.2f}× | {c['c']:.0f} (batch "
            f"{c['batch']}) | {c['a'] / c['c']:.2f}× |"
        )
    lines += [
        "",
        "Engine on mixed-task batches of 32 (in-process, same batches, one run):",
        "",
        "| model | configuration | img/s | vs plain ViT |",
        "|---|---|---|---|",
    ]
    for r in res["engine"]:
        lines.append(f"| {r['model']} | {r['config']} | {r['img_s']:.1f} | {r['vs_plain']:.2f}× |")
    lines += [
        "",
        "Memory (tensor bytes held by the engine vs N separate models, each backbone + head):",
        "",
        "| model | N | one model MB | N models MB | engine, cache off MB | engine after mixed traffic, default budget "
        "MB (tasks cached) | engine, all tasks cached MB | of which gate MB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for m in res["memory"]:
        lines.append(
            f"| {m['model']} | {m['tasks']} | {m['one_model_mb']:.1f} | {m['n_models_mb']:.1f} | "
            f"{m['engine_no_cache_mb']:.1f} ({m['engine_no_cache_mb'] / m['n_models_mb']:.2f}×) | "
            f"{m['engine_with_cache_mb']:.1f} ({m['cached_tasks']}) | {m['engine_all_cached_mb']:.1f} "
            f"({m['engine_all_cached_mb'] / m['n_models_mb']:.2f}×) | {m['gate_mb']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(10, 3.8))
    for name in ("batching", "no batching"):
        rows = [r for r in res["http"] if r["server"] == name]
        ax[0].plot([r["concurrency"] for r in rows], [r["rps"] for r in rows], marker="o", label=f"server, {name}")
        ax[1].plot([r["concurrency"] for r in rows], [r["p99_ms"] for r in rows], marker="o", label=f"server, {name}")
    ax[0].plot(
        [c["concurrency"] for c in res["limit"]],
        [c["c"] for c in res["limit"]],
        marker="s",
        ls="--",
        label="plain ViT in-process (limit)",
    )
    ax[0].set(
        xscale="log", yscale="log", xlabel="concurrent clients", ylabel="requests (images) / s", title="throughput"
    )
    ax[1].set(xscale="log", xlabel="concurrent clients", ylabel="p99 latency (ms)", title="tail latency")
    for a in ax:
        a.set_xticks(list(CONCURRENCY), [str(c) for c in CONCURRENCY])
        a.legend(fontsize=8)
        a.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--store", type=Path, default=BENCH_STORE)
    ap.add_argument("--prepared", action="store_true", help="use the existing bench store (no datasets needed)")
    ap.add_argument("--requests", type=int, default=400, help="requests per concurrency level (x2 at 16)")
    ap.add_argument(
        "--vit-b-batches", type=int, default=2, help="batches of 32 for the ViT-B/16-size engine rows (0 = skip)"
    )
    ap.add_argument("--max-wait-ms", type=float, default=5.0, help="the batching server's max wait")
    ap.add_argument(
        "--http-only", action="store_true", help="only the HTTP rows (server variants via VITMERGE_* env vars)"
    )
    ap.add_argument("--tag", default="", help="suffix of the result files")
    args = ap.parse_args()
    torch.manual_seed(0)
    if not args.prepared:
        prepare(args.store)
    device = torch.device(args.device)
    pool = load_pool(args.store)
    RESULTS.mkdir(parents=True, exist_ok=True)
    res: dict = {
        "command": " ".join(["python", *sys.argv]),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs"
        + (f", {torch.cuda.get_device_name()}" if device.type == "cuda" else ""),
        "device": str(device),
        "date": time.strftime("%Y-%m-%d"),
        "torch": torch.__version__,
    }
    requests = {1: args.requests // 2, 4: args.requests, 16: 2 * args.requests}
    res["http"] = http_rows(args.store, args.device, pool, requests, args.max_wait_ms)
    res["env"] = {k: v for k, v in os.environ.items() if k.startswith("VITMERGE_")}
    suffix = ("" if device.type == "cpu" else f"-{device.type}") + (f"-{args.tag}" if args.tag else "")
    if args.http_only:
        (RESULTS / f"serve{suffix}.json").write_text(json.dumps(res, indent=2) + "\n")
        print(json.dumps(res["http"], indent=1))
        return
    # (c): the plain ViT in-process at the batch size (a) formed
    engine = Engine(BundleStore(StoreLayout(args.store)).load(), str(device))
    images = [(engine.task_index(t), np.asarray(Image.open(io.BytesIO(png)))) for t, png in pool]
    vit = plain_vit(engine)
    res["limit"] = []
    for conc in CONCURRENCY:
        a = next(r for r in res["http"] if r["server"] == "batching" and r["concurrency"] == conc)
        b = next(r for r in res["http"] if r["server"] == "no batching" and r["concurrency"] == conc)
        bs = max(1, round(a["mean_batch"]))
        xs = [engine.preprocess(img, t)[0] for t, img in images[: bs * 16]]
        batches = [{"n": bs, "x": torch.stack(xs[i : i + bs]).to(device)} for i in range(0, len(xs), bs)]
        with torch.inference_mode():
            c = rate(lambda bt: vit(bt["x"]).softmax(-1).cpu(), batches, device)
        res["limit"].append({"concurrency": conc, "a": a["rps"], "b": b["rps"], "c": c, "batch": bs})
    batches = engine_batches(engine, images, 32)
    res["engine"] = engine_rows(engine, batches, f"tiny ViT (zoo `tiny`, {len(engine.tasks)} tasks)")
    res["memory"] = [memory_rows(engine, batches, "tiny ViT (zoo `tiny`)")]
    if args.vit_b_batches > 0:
        root = synthetic_vit_b_bundle(args.store.parent / ".serve-store-vitb-centred-gate")
        big = Engine(BundleStore(StoreLayout(root)).load(), str(device))
        rng = np.random.default_rng(0)
        pixels = [rng.integers(0, 256, (224, 224, 3), dtype=np.uint8) for _ in range(32 * args.vit_b_batches)]
        # each image's task is the one the gate routes it to: task-given and routed rows run the same mix
        fake = [(routed_task(big, img), img) for img in pixels]
        big_batches = engine_batches(big, fake, 32)
        res["engine"] += engine_rows(big, big_batches, "ViT-B/16 size (synthetic, 5 tasks)")
        res["memory"].append(memory_rows(big, big_batches, "ViT-B/16 size (synthetic)"))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"serve{suffix}.json").write_text(json.dumps(res, indent=2) + "\n")
    (RESULTS / f"serve{suffix}.md").write_text(render(res))
    plot(res, RESULTS / f"serve{suffix}.png")
    print(render(res))


if __name__ == "__main__":
    with terminate_as_interrupt():  # SIGTERM, too, stops the servers started
        main()
