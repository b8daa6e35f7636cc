"""Which engine placement serves the demo zoo fastest: the worker kind x torch's intra-op threads, with ``hey``.

``vitmerge serve`` with ``--worker thread`` (the engine in the server process) and ``--worker process`` (in
its own process, the batch's images decoded there), each with torch's default intra-op threads (this
machine's cores) and with one (``VITMERGE_TORCH_THREADS=1``); single-image base64-JSON requests, task given
and routed, at each concurrency (``hey -z``). All variants run at once (one server each, idle but for its
own cells), alternating per (round, concurrency, mode), a different one first each round; medians. The
bound of several front-end processes: uvicorn's workers (2) on one socket, each with its own engine.

    .venv/bin/python benchmarks/worker_kinds.py [--store DIR] [--concurrency 1,4,16,64] [--seconds 4] [--rounds 2]

Writes benchmarks/results/worker_kinds.{md,json}.

Feeds BENCHMARKS.md, section "Where a request's time goes".
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path

from server.http.live import (
    ServeProcess,
    ServerProcess,
    build_demo_store,
    free_port,
    hey_for,
    request_forms,
    terminate_as_interrupt,
)

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"

VARIANTS = {
    "thread, torch threads default": (["--worker", "thread"], {}),
    "thread, 1 torch thread": (["--worker", "thread"], {"VITMERGE_TORCH_THREADS": "1"}),
    "process, torch threads default": (["--worker", "process"], {}),
    "process, 1 torch thread": (["--worker", "process"], {"VITMERGE_TORCH_THREADS": "1"}),
}
#: the bound of "several front-end processes": uvicorn's own workers on one socket, EACH with its own engine
#: (thread worker, one torch thread) -- N model copies, no shared engine; not a vitmerge serve option
FRONTENDS = "2 uvicorn workers, an engine each (bound)"


def frontends(store: Path, workers: int = 2) -> ServerProcess:
    """``uvicorn --workers`` over the app factory (settings from ``VITMERGE_*``), in its own process group."""
    port = free_port()
    code = (
        "import uvicorn; uvicorn.run('server.http.app:create_app', factory=True, host='127.0.0.1', "
        f"port={port}, workers={workers}, log_level='warning', access_log=False)"
    )
    env = {**os.environ, "VITMERGE_STORE": str(store), "VITMERGE_DEVICE": "cpu", "VITMERGE_WATCH_INTERVAL_S": "0"}
    env["VITMERGE_TORCH_THREADS"] = "1"
    url = f"http://127.0.0.1:{port}"
    return ServerProcess([sys.executable, "-c", code], store / f"frontends-{port}.log", cwd=REPO, env=env, url=url)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--store", default=None)
    ap.add_argument("--concurrency", default="1,4,16,64")
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--variants", default=";".join([*VARIANTS, FRONTENDS]), help="';'-separated variant names")
    args = ap.parse_args()
    names = args.variants.split(";")
    runs: dict[tuple[str, str, int], list[dict]] = {}
    with terminate_as_interrupt(), tempfile.TemporaryDirectory() as tmp_dir, ExitStack() as stack:
        tmp = Path(tmp_dir)
        store = Path(args.store) if args.store else tmp / "store"
        if not args.store:
            build_demo_store(store)
        from PIL import Image

        from model_store.data.builtin import load_split

        png = tmp / "digit.png"
        Image.fromarray(load_split("digits", "test", limit=1).images[0]).save(png)
        forms = {
            "task given": request_forms(png.read_bytes(), "digits", tmp),
            "routed": request_forms(png.read_bytes(), None, tmp),
        }
        servers = {
            n: stack.enter_context(
                frontends(store) if n == FRONTENDS else ServeProcess(store, extra=VARIANTS[n][0], env=VARIANTS[n][1])
            )
            for n in names
        }
        for server in servers.values():
            for form in forms.values():
                path, body, media, headers = form["v1 base64 JSON"]
                hey_for(server.url + path, body, 1, 4, media, headers)  # warm-up
        for r in range(args.rounds):
            for c in (int(x) for x in args.concurrency.split(",")):
                for mode, form in forms.items():
                    path, body, media, headers = form["v1 base64 JSON"]
                    for name in names[r % len(names) :] + names[: r % len(names)]:
                        res = hey_for(servers[name].url + path, body, args.seconds, c, media, headers)
                        runs.setdefault((name, mode, c), []).append(res)
                        print(json.dumps({"variant": name, "mode": mode, "concurrency": c, **res}), flush=True)
    rows = [
        {
            "variant": n,
            "mode": m,
            "concurrency": c,
            **{k: statistics.median(x[k] for x in rs) for k in ("rps", "p50_ms", "p99_ms")},
            "codes": [x["codes"] for x in rs],
        }
        for (n, m, c), rs in runs.items()
    ]
    lines = [f"Command: `python {' '.join(sys.argv)}`", "", "| mode | c | variant | req/s | p50 ms | p99 ms |"]
    lines.append("|---|---|---|---|---|---|")
    for r in sorted(rows, key=lambda r: (r["mode"], r["concurrency"], r["variant"])):
        lines.append(
            f"| {r['mode']} | {r['concurrency']} | {r['variant']} | {r['rps']:.0f} | {r['p50_ms']:.1f} | "
            f"{r['p99_ms']:.1f} |"
        )
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "worker_kinds.json").write_text(json.dumps({"command": sys.argv, "rows": rows}, indent=1))
    (RESULTS / "worker_kinds.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
