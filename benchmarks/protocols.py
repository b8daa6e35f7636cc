"""/v1 vs /v2 (Open Inference Protocol) on one server: what the request format costs, measured with ``hey``.

One ``vitmerge serve`` (the demo zoo merged with ``emr_routed``), single-image requests of the same
PNG in four forms: ``/v1/classify`` with a raw PNG body and with base64 JSON; ``/v2/.../infer`` with the
binary tensor data extension (what ``tritonclient`` sends by default: JSON header + length-prefixed
BYTES, binary outputs) and with JSON tensors (base64 IMAGE). Task given and routed, concurrency 1, 4
and 16; the forms alternate per (mode, concurrency) cell, 1/10 of the requests as warm-up.

    .venv/bin/python benchmarks/protocols.py [--requests 1000] [--concurrency 1,4,16] [--store DIR]

Writes benchmarks/results/protocols.{md,json}.

Feeds BENCHMARKS.md, section "Request formats: /v1 vs the Open Inference Protocol (/v2) (issue 20)".
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
from pathlib import Path

from PIL import Image

from model_store.data.builtin import load_split
from server.http.live import ServeProcess, build_demo_store, hey, request_forms, terminate_as_interrupt

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--concurrency", default="1,4,16")
    ap.add_argument("--store", default=None, help="a store with a CURRENT routed bundle (default: tiny + emr_routed)")
    args = ap.parse_args()
    if shutil.which("hey") is None:
        raise SystemExit("hey is not installed: apt-get install hey")
    levels = [int(c) for c in args.concurrency.split(",")]
    rows: list[dict] = []
    with terminate_as_interrupt(), tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        store = Path(args.store) if args.store else tmp / "store"
        if not args.store:
            build_demo_store(store)
        png_path = tmp / "digit.png"
        Image.fromarray(load_split("digits", "test", limit=1).images[0]).save(png_path)
        png = png_path.read_bytes()
        with ServeProcess(store, "asyncio", "h11") as server:
            for mode, task in (("task given", "digits"), ("routed", None)):
                forms = request_forms(png, task, tmp)
                for c in levels:
                    for form, (path, body, media, headers) in forms.items():
                        url = server.url + path
                        hey(url, body, max(50, args.requests // 10), c, media, headers)  # warm-up
                        row = {"form": form, "mode": mode, "concurrency": c, "body_bytes": body.stat().st_size}
                        rows.append({**row, **hey(url, body, args.requests, c, media, headers)})
                        print(rows[-1], flush=True)
    res = {
        "command": " ".join(["python", *sys.argv]),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "requests": args.requests,
        "rows": rows,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "protocols.json").write_text(json.dumps(res, indent=1))
    md = render(res)
    (RESULTS / "protocols.md").write_text(md)
    print(md)
    return 0


def _ms(value: float | None) -> str:
    return "–" if value is None else f"{value:.1f}"


def render(res: dict) -> str:
    lines = [
        f"Command: `{res['command']}`; {res['machine']}; {res['requests']} requests per cell (hey).",
        "",
        "| mode | concurrency | request form | body bytes | req/s | p50 ms | p99 ms | statuses |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in res["rows"]:
        codes = ", ".join(f"{k}: {v}" for k, v in sorted(r["codes"].items()))
        lines.append(
            f"| {r['mode']} | {r['concurrency']} | {r['form']} | {r['body_bytes']} | {r['rps']:.0f} | "
            f"{_ms(r['p50_ms'])} | {_ms(r['p99_ms'])} | {codes} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
