"""The HTTP stack under load: uvicorn on asyncio + h11 vs uvloop + httptools, measured with ``hey``.

One ``vitmerge serve`` per stack on the same store (the demo zoo's routed EMR bundle), single-image
``POST /v1/classify`` requests (a raw PNG body), task given (``?task=``) and routed by the gate, at
concurrency 1, 4 and 16. ``hey`` (Go, Debian package) is the load generator, so the client does not
run Python on the server's two cores. The stacks alternate per (mode, concurrency) cell.

    .venv/bin/python benchmarks/http_stack.py [--requests 1500] [--concurrency 1,4,16] [--store DIR]
        [--litserve /path/to/litserve-venv/bin/python]

With ``--litserve``, a side-by-side table: the same zoo's N task models served by LitServe with batching
(``benchmarks/litserve_zoo.py``, its own virtualenv: litserve pins its own server stack) against
vitmerge, task given, the same base64-JSON request to both, same machine, same run.

Writes benchmarks/results/http_stack.{md,json}.

Feeds BENCHMARKS.md, section
"HTTP stack: asyncio + h11 vs uvloop + httptools, orjson, and LitServe side by side (issue 19)".
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import platform
import shutil
import sys
import tempfile
from pathlib import Path

from PIL import Image

from model_store.data.builtin import load_split
from server.http.live import (
    ServeProcess,
    ServerProcess,
    build_demo_store,
    hey,
    litserve_process,
    terminate_as_interrupt,
)

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
LITSERVE_ZOO = REPO / "benchmarks" / "litserve_zoo.py"
STACKS = {"asyncio + h11": ("asyncio", "h11"), "uvloop + httptools": ("uvloop", "httptools")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=1500)
    ap.add_argument("--concurrency", default="1,4,16")
    ap.add_argument(
        "--store", default=None, help="a store with a CURRENT bundle (default: the tiny zoo merged with emr_routed)"
    )
    ap.add_argument("--litserve", default=None, help="a Python with litserve: adds the LitServe side-by-side table")
    args = ap.parse_args()
    if shutil.which("hey") is None:
        raise SystemExit("hey is not installed: apt-get install hey")
    levels = [int(c) for c in args.concurrency.split(",")]
    with terminate_as_interrupt(), tempfile.TemporaryDirectory() as tmp:
        store = Path(args.store) if args.store else Path(tmp) / "store"
        if not args.store:
            build_demo_store(store)
        png = Path(tmp) / "digit.png"
        Image.fromarray(load_split("digits", "test", limit=1).images[0]).save(png)
        servers: dict[str, ServerProcess] = {}
        rows: list[dict] = []
        side: list[dict] = []
        try:
            for name, stack in STACKS.items():
                servers[name] = ServeProcess(store, *stack)
            if args.litserve:
                side = litserve_rows(args, servers["asyncio + h11"], store, Path(tmp), levels)
            for mode in ("task given", "routed"):
                for c in levels:
                    for name, server in servers.items():
                        url = f"{server.url}/v1/classify" + ("?task=digits" if mode == "task given" else "")
                        hey(url, png, max(50, args.requests // 10), c)  # warm-up
                        rows.append({"stack": name, "mode": mode, "concurrency": c, **hey(url, png, args.requests, c)})
                        print(rows[-1], flush=True)
        finally:
            for server in servers.values():
                server.stop()
    res = {
        "command": " ".join(["python", *sys.argv]),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "requests": args.requests,
        "rows": rows,
        "litserve": side,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "http_stack.json").write_text(json.dumps(res, indent=1))
    md = render(res)
    (RESULTS / "http_stack.md").write_text(md)
    print(md)
    return 0


def litserve_rows(
    args: argparse.Namespace, vitmerge: ServerProcess, store: Path, tmp: Path, levels: list[int]
) -> list[dict]:
    """Task given, one base64 image per JSON request: vitmerge (routed-EMR bundle) vs LitServe (N models)."""
    img = base64.b64encode((tmp / "digit.png").read_bytes()).decode()
    (tmp / "vitmerge.json").write_text(json.dumps({"images": [img], "task": "digits"}))
    (tmp / "litserve.json").write_text(json.dumps({"image": img, "task": "digits"}))
    lit = litserve_process(args.litserve, LITSERVE_ZOO, store / "zoos" / "tiny", tmp / "litserve.log")
    targets = (
        ("vitmerge (routed-EMR bundle, asyncio + h11)", f"{vitmerge.url}/v1/classify", tmp / "vitmerge.json"),
        ("LitServe (N individual models, batch 32, 5 ms)", f"{lit.url}/predict", tmp / "litserve.json"),
    )
    rows = []
    try:
        for c in levels:
            for name, url, body in targets:
                hey(url, body, max(50, args.requests // 10), c, "application/json")
                rows.append({"server": name, "concurrency": c, **hey(url, body, args.requests, c, "application/json")})
                print(rows[-1], flush=True)
    finally:
        lit.stop()
    return rows


def render(res: dict) -> str:
    lines = [
        f"Command: `{res['command']}`; {res['machine']}; {res['requests']} requests per cell (hey).",
        "",
        "| mode | concurrency | stack | req/s | p50 ms | p99 ms | statuses |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in res["rows"]:
        codes = ", ".join(f"{k}: {v}" for k, v in sorted(r["codes"].items()))
        lines.append(
            f"| {r['mode']} | {r['concurrency']} | {r['stack']} | {r['rps']:.0f} | {r['p50_ms']:.1f} | "
            f"{r['p99_ms']:.1f} | {codes} |"
        )
    if res.get("litserve"):
        lines += ["", "Task given, base64-JSON requests, side by side:", ""]
        lines += ["| concurrency | server | req/s | p50 ms | p99 ms | statuses |", "|---|---|---|---|---|---|"]
        for r in res["litserve"]:
            codes = ", ".join(f"{k}: {v}" for k, v in sorted(r["codes"].items()))
            lines.append(
                f"| {r['concurrency']} | {r['server']} | {r['rps']:.0f} | {r['p50_ms']:.1f} | "
                f"{r['p99_ms']:.1f} | {codes} |"
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
