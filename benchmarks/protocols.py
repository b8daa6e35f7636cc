"""/v1 vs /v2 (Open Inference Protocol) on one server: what the request format costs, measured with ``hey``.

One ``vitmerge serve`` (the demo zoo merged with ``emr_routed``), single-image requests of the same
PNG in four forms: ``/v1/classify`` with a raw PNG body and with base64 JSON; ``/v2/.../infer`` with the
binary tensor data extension (what ``tritonclient`` sends by default: JSON header + length-prefixed
BYTES, binary outputs) and with JSON tensors (base64 IMAGE). Task given and routed, concurrency 1, 4
and 16; the forms alternate per (mode, concurrency) cell, 1/10 of the requests as warm-up.

    .venv/bin/python benchmarks/protocols.py [--requests 1000] [--concurrency 1,4,16] [--store DIR]

Writes benchmarks/results/protocols.{md,json}.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import platform
import shutil
import struct
import sys
import tempfile
from pathlib import Path

from http_stack import RESULTS, Server, build_demo_store, hey
from PIL import Image

from model_store.data.builtin import load_split
from server.http.launch import terminate_as_interrupt


def bodies(png: bytes, task: str | None, tmp: Path) -> dict[str, tuple[str, Path, str, list[str]]]:
    """form -> (path + query, body file, content type, extra headers)."""
    b64 = base64.b64encode(png).decode()
    out: dict[str, tuple[str, Path, str, list[str]]] = {}

    def write(name: str, data: bytes) -> Path:
        path = tmp / f"{name}-{task or 'routed'}"
        path.write_bytes(data)
        return path

    query = f"?task={task}" if task else ""
    out["v1 raw PNG"] = ("/v1/classify" + query, write("raw", png), "image/png", [])
    v1_json = json.dumps({"images": [b64], **({"task": task} if task else {})}).encode()
    out["v1 base64 JSON"] = ("/v1/classify", write("v1json", v1_json), "application/json", [])
    tasks = [task or ""]
    inputs = [
        {"name": "IMAGE", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": 4 + len(png)}},
        {"name": "TASK", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": 4 + len(tasks[0])}},
    ]
    header = json.dumps({"inputs": inputs, "parameters": {"binary_data_output": True}}).encode()
    raw = struct.pack("<I", len(png)) + png + struct.pack("<I", len(tasks[0])) + tasks[0].encode()
    out["v2 binary tensors"] = (
        "/v2/models/vitmerge/infer",
        write("v2bin", header + raw),
        "application/octet-stream",
        [f"Inference-Header-Content-Length: {len(header)}"],
    )
    v2_json = {
        "inputs": [
            {"name": "IMAGE", "shape": [1], "datatype": "BYTES", "data": [b64]},
            {"name": "TASK", "shape": [1], "datatype": "BYTES", "data": tasks},
        ]
    }
    out["v2 JSON tensors"] = (
        "/v2/models/vitmerge/infer",
        write("v2json", json.dumps(v2_json).encode()),
        "application/json",
        [],
    )
    return out


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
        with Server(store, "asyncio", "h11") as server:
            for mode, task in (("task given", "digits"), ("routed", None)):
                forms = bodies(png, task, tmp)
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
