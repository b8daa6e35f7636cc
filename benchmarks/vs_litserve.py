"""vitmerge vs the user's alternative (LitServe serving the N task models), same machine, same run, ``hey`` as load.

Demo zoo (``--zoo demo``, default): ``vitmerge serve`` on the demo zoo's routed-EMR bundle and LitServe 0.2.x
with the zoo's N = 4 task models (``benchmarks/litserve_zoo.py``: batching 32 / 5 ms, one CPU worker), the
same one-image base64-JSON request with the task given; vitmerge also routed (no task: the gate picks it)
and in two more request forms (a raw PNG body, ``/v2`` binary tensors), at each concurrency. Every cell
runs ``hey -z SECONDS``; the targets alternate inside each (round, concurrency), a different one first each
round, and the tables give medians over rounds.

Real size (``--zoo vit_s14`` / ``vit_b16``): a synthetic zoo of N = 5 random task models of that
architecture (``lowrank_serve.py``'s: ViT-S/14 at 56 px, ViT-B/16 at 224 px), served by vitmerge as the
low-rank bundle that met the accuracy goal (TSV-C f = 0.045, patch conv compressed, EfficientNet-Lite0 gate
at 96 px centred on the request images), task given and routed, and by LitServe with the N models.
Mixed-task traffic at one concurrency: N ``hey`` processes at once, one per task (its own image; the gate
routes each image to its task), the concurrency split between them; req/s is the sum, p50/p99 over every
request (``hey -o csv``). Memory: the proportional set size (PSS) of each server's process group.

    .venv/bin/python benchmarks/vs_litserve.py --litserve /tmp/litvenv/bin/python [--zoo demo|vit_s14|vit_b16]
        [--concurrency 1,4,16,64] [--seconds 5] [--rounds 3] [--store DIR] [--server-args "--worker process"]
        [--also-worker process]

LitServe lives in its own virtualenv (it pins its own server stack; BENCHMARKS.md says how to make one).
Every server is started in its own process group and stopped with its children on success, failure,
Ctrl-C and SIGTERM. Writes benchmarks/results/vs_litserve-<zoo>.{md,json}.

Feeds BENCHMARKS.md, section "vitmerge vs LitServe: demo zoo at concurrency 1 to 64, and real size side by side".
"""

from __future__ import annotations

import argparse
import base64
import csv
import io
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path

from server.http.live import (
    ServeProcess,
    ServerProcess,
    build_demo_store,
    group_members,
    hey,
    hey_for,
    litserve_process,
    request_forms,
    terminate_as_interrupt,
)

RESULTS = Path(__file__).resolve().parent / "results"
LITSERVE_ZOO = Path(__file__).resolve().parent / "litserve_zoo.py"

LIT = "LitServe (N models, batch 32, 5 ms)"


def mixed_run(targets: list[tuple[str, Path]], seconds: float, c: int, media: str = "application/json") -> dict:
    """One ``hey`` per (url, body) at once, concurrency ``c`` split between them: summed req/s, pooled p50/p99."""
    share = [c // len(targets) + (1 if i < c % len(targets) else 0) for i in range(len(targets))]
    procs = []
    for (url, body), ci in zip(targets, share):
        cmd = ["hey", "-z", f"{seconds}s", "-c", str(max(ci, 1)), "-m", "POST", "-T", media, "-D", str(body)]
        procs.append(subprocess.Popen([*cmd, "-o", "csv", url], stdout=subprocess.PIPE, text=True))
    latencies: list[float] = []
    codes: dict[str, int] = {}
    for p in procs:
        out, _ = p.communicate()
        for row in csv.DictReader(io.StringIO(out)):
            latencies.append(1000 * float(row["response-time"]))
            codes[row["status-code"]] = codes.get(row["status-code"], 0) + 1
    latencies.sort()

    def pct(q: float) -> float | None:
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))] if latencies else None

    return {"rps": len(latencies) / seconds, "p50_ms": pct(0.50), "p99_ms": pct(0.99), "codes": codes}


def pss_mib(server: ServerProcess) -> float:
    """Proportional set size of the server's process group (every worker/engine process; shared pages split)."""
    total = 0
    for pid in group_members(server.pgid):
        try:
            text = Path(f"/proc/{pid}/smaps_rollup").read_text()
        except OSError:
            continue
        total += sum(int(line.split()[1]) for line in text.splitlines() if line.startswith("Pss:"))
    return total / 1024


def medians(runs: list[dict]) -> dict:
    out: dict = {k: statistics.median(r[k] for r in runs if r[k] is not None) for k in ("rps", "p50_ms", "p99_ms")}
    codes: dict[str, int] = {}
    for r in runs:
        for k, v in r["codes"].items():
            codes[k] = codes.get(k, 0) + v
    return {**out, "codes": codes, "runs": runs}


# -- the demo zoo -------------------------------------------------------------------------------
def demo(args: argparse.Namespace, tmp: Path) -> list[dict]:
    """Every target at every concurrency, alternating within each round."""
    store = Path(args.store) if args.store else tmp / "store"
    if not args.store:
        build_demo_store(store)
    from PIL import Image

    from model_store.data.builtin import load_split

    png = tmp / "digit.png"
    Image.fromarray(load_split("digits", "test", limit=1).images[0]).save(png)
    given = request_forms(png.read_bytes(), "digits", tmp)
    routed = request_forms(png.read_bytes(), None, tmp)
    (tmp / "litserve.json").write_text(
        json.dumps({"image": base64.b64encode(png.read_bytes()).decode(), "task": "digits"})
    )
    levels = [int(c) for c in args.concurrency.split(",")]
    runs: dict[tuple[str, int], list[dict]] = {}
    with ExitStack() as stack:
        vm = stack.enter_context(ServeProcess(store, extra=shlex.split(args.server_args)))
        lit = stack.enter_context(
            litserve_process(args.litserve, LITSERVE_ZOO, store / "zoos" / "tiny", tmp / "litserve.log")
        )
        targets = {
            LIT: (lit.url + "/predict", tmp / "litserve.json", "application/json", []),
            "vitmerge, task given, base64 JSON": _at(vm.url, given["v1 base64 JSON"]),
            "vitmerge, routed, base64 JSON": _at(vm.url, routed["v1 base64 JSON"]),
            "vitmerge, task given, raw PNG": _at(vm.url, given["v1 raw PNG"]),
            "vitmerge, routed, raw PNG": _at(vm.url, routed["v1 raw PNG"]),
            "vitmerge, task given, /v2 binary": _at(vm.url, given["v2 binary tensors"]),
        }
        if args.also_worker:  # the other worker kind in the same run: which one should be the default
            other = stack.enter_context(ServeProcess(store, extra=["--worker", args.also_worker]))
            targets[f"vitmerge --worker {args.also_worker}, task given, base64 JSON"] = _at(
                other.url, given["v1 base64 JSON"]
            )
            targets[f"vitmerge --worker {args.also_worker}, routed, base64 JSON"] = _at(
                other.url, routed["v1 base64 JSON"]
            )
        for url, body, media, headers in targets.values():  # warm-up (first requests, lazy imports)
            hey(url, body, 200, 4, media, headers)
        names = list(targets)
        for r in range(args.rounds):
            for c in levels:
                for name in names[r % len(names) :] + names[: r % len(names)]:
                    url, body, media, headers = targets[name]
                    res = hey_for(url, body, args.seconds, c, media, headers)
                    runs.setdefault((name, c), []).append(res)
                    print(json.dumps({"round": r, "target": name, "concurrency": c, **res}), flush=True)
    return [{"target": n, "concurrency": c, **medians(rs)} for (n, c), rs in runs.items()]


def _at(base: str, form: tuple[str, Path, str, list[str]]) -> tuple[str, Path, str, list[str]]:
    path, body, media, headers = form
    return base + path, body, media, headers


# -- real size ----------------------------------------------------------------------------------
def request_images(n: int, seed: int, size: tuple[int, int] = (320, 240)) -> list[bytes]:
    """Smooth random photos-to-be (low-res colour noise upsampled, a little grain) as JPEG, quality 90."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        small = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize(size, Image.BILINEAR)
        arr = np.clip(np.asarray(small, dtype=np.int16) + rng.integers(-12, 13, (size[1], size[0], 3)), 0, 255)
        buf = io.BytesIO()
        Image.fromarray(arr.astype(np.uint8)).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def real_store(arch_name: str, n: int, root: Path, pool: int = 96) -> tuple[Path, list[bytes]]:
    """A store with the synthetic zoo's TSV bundle (f=0.045, conv, gate at 96 px centred on the request images)
    and, per task, one request image the gate routes to that task."""
    import torch

    from merging.synthetic import ARCHS, publish_synthetic, synthetic_zoo
    from model_store.architecture import build_gate, gate_state
    from model_store.bundle import BundleStore
    from model_store.data.decode import decode_image
    from model_store.data.preprocessing import to_model_input
    from model_store.schema import Preprocessing
    from model_store.settings import StoreLayout

    arch, size = ARCHS[arch_name]
    zoo = synthetic_zoo(arch, n, 0)
    images = request_images(pool, 1)
    gate_prep = Preprocessing(size=96, channels=3, mean=[0.5] * 3, std=[0.5] * 3)
    x = to_model_input([decode_image(b) for b in images], gate_prep).contiguous(memory_format=torch.channels_last)
    torch.manual_seed(0)
    gate = build_gate("efficientnet_lite0", n).eval()
    with torch.inference_mode():
        head = gate.get_classifier()
        assert isinstance(head, torch.nn.Linear)
        head.bias -= gate(x).mean(0)
        routed = gate(x).argmax(1).tolist()
    chosen = [next((b for b, t in zip(images, routed) if t == task), None) for task in range(n)]
    if any(c is None for c in chosen):
        raise RuntimeError(f"the centred gate routes none of {pool} images to some task: {routed}")
    store = BundleStore(StoreLayout(root))
    version = publish_synthetic(store, "lowrank", arch, size, zoo, gate_state(gate), 0.045, True, 96)
    store.set_current(version)
    return root, [c for c in chosen if c is not None]


def real_size(args: argparse.Namespace, tmp: Path) -> list[dict]:
    """vitmerge (task given, routed) and LitServe under mixed-task traffic at one concurrency."""
    n = 5
    store, images = real_store(args.zoo, n, tmp / "store")
    tasks = [f"task{i}" for i in range(n)]
    given, routed, lit_bodies = [], [], []
    for t, img in zip(tasks, images):
        b64 = base64.b64encode(img).decode()
        for folder, body in ((given, {"images": [b64], "task": t}), (routed, {"images": [b64]})):
            path = tmp / f"{len(folder)}-{'given' if 'task' in body else 'routed'}.json"
            path.write_text(json.dumps(body))
            folder.append(path)
        path = tmp / f"lit-{t}.json"
        path.write_text(json.dumps({"image": b64, "task": t}))
        lit_bodies.append(path)
    c = int(args.concurrency.split(",")[-1])
    runs: dict[str, list[dict]] = {}
    memory: dict[str, float] = {}
    with (
        ServeProcess(store, extra=shlex.split(args.server_args)) as vm,
        litserve_process(args.litserve, LITSERVE_ZOO, f"synthetic:{args.zoo}:{n}", tmp / "litserve.log") as lit,
    ):
        targets = {
            f"vitmerge TSV f=0.045 conv, task given ({args.zoo})": [(vm.url + "/v1/classify", b) for b in given],
            f"vitmerge TSV f=0.045 conv, routed ({args.zoo})": [(vm.url + "/v1/classify", b) for b in routed],
            f"{LIT} ({args.zoo})": [(lit.url + "/predict", b) for b in lit_bodies],
        }
        servers = dict(zip(targets, (vm, vm, lit)))
        for urls in targets.values():  # warm-up: a short mixed run each
            mixed_run(urls, min(5.0, args.seconds), n)
        names = list(targets)
        for r in range(args.rounds):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                res = mixed_run(targets[name], args.seconds, c)
                runs.setdefault(name, []).append(res)
                memory[name] = max(memory.get(name, 0.0), pss_mib(servers[name]))
                print(json.dumps({"round": r, "target": name, "concurrency": c, **res}), flush=True)
    return [{"target": k, "concurrency": c, "pss_mib": memory[k], **medians(rs)} for k, rs in runs.items()]


# -- report -------------------------------------------------------------------------------------
def render(res: dict) -> str:
    lines = [f"Command: `{res['command']}`; {res['machine']}.", ""]
    rows = res["rows"]
    mem = any("pss_mib" in r for r in rows)
    head = "| concurrency | server, request | req/s | × LitServe | p50 ms | p99 ms |" + (" PSS MiB |" if mem else "")
    head += " statuses |"
    lines += [head, "|" + "---|" * (head.count("|") - 1)]
    lit = {r["concurrency"]: r["rps"] for r in rows if r["target"].startswith("LitServe")}
    for r in sorted(rows, key=lambda r: (r["concurrency"], not r["target"].startswith("LitServe"))):
        ratio = r["rps"] / lit[r["concurrency"]] if r["concurrency"] in lit else float("nan")
        codes = ", ".join(f"{k}: {v}" for k, v in sorted(r["codes"].items()))
        cells = [str(r["concurrency"]), r["target"], f"{r['rps']:.1f}", f"{ratio:.2f}×"]
        cells += [f"{r['p50_ms']:.1f}", f"{r['p99_ms']:.1f}"] + ([f"{r['pss_mib']:.0f}"] if mem else []) + [codes]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--litserve", required=True, help="a Python with litserve (its own virtualenv)")
    ap.add_argument("--zoo", choices=["demo", "vit_s14", "vit_b16"], default="demo")
    ap.add_argument("--concurrency", default="1,4,16,64", help="real size: the last level is used")
    ap.add_argument("--seconds", type=float, default=5.0, help="hey -z per cell")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--store", default=None, help="demo: a store with the routed bundle (default: build it)")
    ap.add_argument("--server-args", default="", help="extra `vitmerge serve` flags, e.g. '--worker thread'")
    ap.add_argument(
        "--also-worker", default="", help="demo: a second vitmerge server with this --worker kind in the same run"
    )
    args = ap.parse_args()
    if shutil.which("hey") is None:
        raise SystemExit("hey is not installed: apt-get install hey")
    with terminate_as_interrupt(), tempfile.TemporaryDirectory() as tmp:
        rows = demo(args, Path(tmp)) if args.zoo == "demo" else real_size(args, Path(tmp))
    res = {
        "command": " ".join(["python", *sys.argv]),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "rows": rows,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"vs_litserve-{args.zoo}.json").write_text(json.dumps(res, indent=1))
    md = render(res)
    (RESULTS / f"vs_litserve-{args.zoo}.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
