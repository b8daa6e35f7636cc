"""Server memory after merges: with merges in a child process, a server that ran several
gate-training merges should hold about what a fresh server loading the same bundle holds.

Plays it for real on one machine: ``vitmerge serve`` on an empty store (its startup merge
runs), then N admin merges (routed EMR, gate training) through ``POST /v1/merge``; the
server's RSS (from /proc, the whole process, not its children) is read after each. Then a
fresh server starts on the same store (it only loads ``CURRENT``) and its RSS is read.
Writes ``benchmarks/results/merge_rss.{json,md}``.

    .venv/bin/python benchmarks/merge_rss.py [--zoo tiny] [--merges 2]

Feeds BENCHMARKS.md, section "Server memory after merges (merges in a child process)".
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
from tqdm.auto import tqdm

from server.http.live import ServerProcess, free_port, terminate_as_interrupt

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
WORK = REPO / "benchmarks" / ".merge-rss"
AUTH = {"authorization": "Bearer bench"}


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def _serve(store: Path, zoo: str, log: Path) -> ServerProcess:
    """``vitmerge serve`` in its own process group (the merge child included: stopped with it)."""
    port = free_port()
    cmd = [sys.executable, "-m", "server.cli", "serve", "--store", str(store), "--zoo", zoo, "--port", str(port)]
    cmd += ["--quiet", "--watch-interval", "0", "--admin-token", "bench", "--device", "cpu"]
    return ServerProcess(cmd, log, cwd=REPO, url=f"http://127.0.0.1:{port}", timeout_s=900)


def _merge(url: str, params: dict) -> dict:
    r = httpx.post(f"{url}/v1/merge", json={"method": "emr_routed", "params": params}, headers=AUTH, timeout=30)
    r.raise_for_status()
    job_id = r.json()["id"]
    while True:
        job = httpx.get(f"{url}/v1/merge/{job_id}", headers=AUTH, timeout=30).json()
        if job["state"] in ("succeeded", "failed"):
            if job["state"] == "failed":
                raise RuntimeError(job["error"])
            return job
        time.sleep(0.5)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--zoo", default="tiny", help="preset zoo (built into the store first)")
    ap.add_argument("--merges", type=int, default=2, help="admin merges after the startup merge")
    ap.add_argument("--gate-epochs", type=int, default=2)
    args = ap.parse_args()
    shutil.rmtree(WORK, ignore_errors=True)
    store = WORK / "store"
    store.mkdir(parents=True)
    subprocess.run(
        [sys.executable, "-m", "server.cli", "zoo", "build", "--preset", args.zoo, "--store", str(store), "--quiet"],
        cwd=REPO,
        check=True,
    )
    rows = []
    with tqdm(total=args.merges + 2, desc="merge RSS", unit="step") as bar:
        with _serve(store, args.zoo, WORK / "server.log") as server:
            proc, url = server.proc, server.url
            rows.append({"step": "after startup merge", "rss_mib": round(_rss_mib(proc.pid), 1)})
            bar.update(1)
            for i in range(args.merges):
                job = _merge(url, {"gate_epochs": args.gate_epochs})
                rows.append(
                    {
                        "step": f"after admin merge {i + 1} ({job['version']}, {job['seconds']:.0f} s)",
                        "rss_mib": round(_rss_mib(proc.pid), 1),
                    }
                )
                bar.update(1)
        with _serve(store, args.zoo, WORK / "fresh.log") as fresh:
            time.sleep(1)
            rows.append({"step": "fresh server, same CURRENT", "rss_mib": round(_rss_mib(fresh.proc.pid), 1)})
            bar.update(1)
    fresh_rss = rows[-1]["rss_mib"]
    after = rows[-2]["rss_mib"]
    result = {
        "zoo": args.zoo,
        "merges": args.merges,
        "gate_epochs": args.gate_epochs,
        "rows": rows,
        "ratio_after_merges_vs_fresh": round(after / fresh_rss, 3),
        "cpu_count": os.cpu_count(),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "merge_rss.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        "| server | RSS (MiB) |",
        "|---|---|",
        *(f"| {r['step']} | {r['rss_mib']} |" for r in rows),
        "",
        f"RSS after {args.merges} admin merges / fresh server: **{result['ratio_after_merges_vs_fresh']}x**",
    ]
    (RESULTS / "merge_rss.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    shutil.rmtree(WORK, ignore_errors=True)
    return 0


if __name__ == "__main__":
    with terminate_as_interrupt():  # SIGTERM, too, stops the servers started
        raise SystemExit(main())
