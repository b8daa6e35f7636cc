"""The HTTP path under ``hey`` on a GPU (``gpu_check.sh`` step 3), and the demo store it serves.

    python3 benchmarks/gpu_http.py prepare [STORE]   # CPU machine with the offline datasets (~2 min)
    python3 benchmarks/gpu_http.py run STORE OUT     # the GPU machine

``run``: ``vitmerge serve --device cuda`` on STORE's routed-EMR bundle (the demo zoo), single-image raw-PNG
and base64-JSON requests, task given and routed, concurrency 16 and 64 (``hey -z 8s`` each), with the engine
in the server process (``--worker thread``) and in its own process (``--worker process``). Writes
OUT/gpu_http.{json,md}. Every server is stopped with its children, whatever happens.

Feeds BENCHMARKS.md, section "The GPU run: benchmarks/gpu_check.sh (prepared, not yet run)".
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from server.http.live import ServeProcess, build_demo_store, hey_for, request_forms, terminate_as_interrupt

DEFAULT_STORE = Path(__file__).resolve().parent / ".gpu-store"


def prepare(store: Path) -> None:
    """The demo zoo merged with routed EMR, and a pool of 16 TEST images per task (``cuda_check.py`` reads it)."""
    from PIL import Image

    from model_store.data.builtin import load_split
    from model_store.zoo import Zoo

    if not (store / "CURRENT").exists():
        build_demo_store(store)
    pool = store / "pool"
    pool.mkdir(exist_ok=True)
    for task in Zoo.load(store / "zoos" / "tiny").tasks:
        for i, img in enumerate(load_split(task, "test", limit=16).images):
            Image.fromarray(img).save(pool / f"{task}_{i:03d}.png")
    print(f"prepared {store}: carry it to the GPU machine with the working tree")


def run(store: Path, out: Path) -> None:
    png = sorted((store / "pool").glob("digits_*.png"))[0].read_bytes()
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for worker in ("thread", "process"):
        with ServeProcess(store, extra=["--device", "cuda", "--worker", worker]) as server:
            for mode, task in (("task given", "digits"), ("routed", None)):
                forms = request_forms(png, task, out)
                for form in ("v1 raw PNG", "v1 base64 JSON"):
                    path, body, media, headers = forms[form]
                    hey_for(server.url + path, body, 2, 16, media, headers)  # warm-up
                    for c in (16, 64):
                        r = hey_for(server.url + path, body, 8, c, media, headers)
                        rows.append({"worker": worker, "mode": mode, "form": form, "concurrency": c, **r})
                        print(json.dumps(rows[-1]), flush=True)
    (out / "gpu_http.json").write_text(json.dumps(rows, indent=1))
    lines = [
        "| worker | mode | request | c | req/s | p50 ms | p99 ms | statuses |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['worker']} | {r['mode']} | {r['form']} | {r['concurrency']} | {r['rps']:.0f} | "
            f"{r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['codes']} |"
        )
    (out / "gpu_http.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    with terminate_as_interrupt():
        if sys.argv[1:2] == ["prepare"]:
            prepare(Path(sys.argv[2]) if len(sys.argv) > 2 else DEFAULT_STORE)
        elif sys.argv[1:2] == ["run"] and len(sys.argv) == 4:
            run(Path(sys.argv[2]), Path(sys.argv[3]))
        else:
            raise SystemExit(__doc__)
