"""Where a request's CPU time goes: ``vitmerge serve`` under ``hey``, sampled by ``py-spy``.

One server on a store (default: the demo zoo merged with ``emr_routed``), single-image requests at
one concurrency for ``--seconds``; ``py-spy record`` samples every thread of the server and its
children (the engine process with ``--worker process``) that is on a CPU, and each sample is put in
one stage: the first "work" stage (decode ... queueing) any frame of its stack belongs to, else the
stage of its innermost frame that belongs to one (HTTP parsing, JSON, pydantic, routing ...). The server's
CPU time (``/proc``: user + system of its process group) divided by the requests answered gives
CPU ms per request; each stage gets its share of the samples of that.

    .venv/bin/python benchmarks/request_profile.py [--store DIR] [--seconds 15] [--concurrency 16]
        [--forms raw,json,v2bin] [--modes given,routed] [--server-args "--worker process"]

Needs ``py-spy`` (``pip install py-spy``; not a dependency of the package) and ``hey``.
Writes benchmarks/results/request_profile.{md,json}.

Feeds BENCHMARKS.md, section "Where a request's time goes".
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from server.http.live import (
    ServerProcess,
    build_demo_store,
    free_port,
    group_members,
    hey,
    hey_for,
    request_forms,
    terminate_as_interrupt,
)

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"

#: work stages: a sample with ANY frame matching goes to the first such stage (this order): preprocessing inside
#: the engine's module is preprocessing, the engine's torch calls are inference
WORK_STAGES: list[tuple[str, tuple[str, ...]]] = [
    ("decode (PIL)", ("model_store/data/decode", "PIL/")),
    ("preprocessing", ("model_store/data/preprocessing", "torchvision/", "prepare (", "preprocess (")),
    ("inference (engine)", ("predict (", "server/runtime/", "timm/")),
    ("encode response", ("encode_prediction", "encode_response", "build_outputs", "serialize_response")),
    ("batcher / queueing", ("server/http/batcher", "server/http/state")),
]
#: the rest by the INNERMOST frame that matches one of these (first match in this order for that frame): h11
#: writing a response from inside the app is HTTP, not the app
LEAF_STAGES: list[tuple[str, tuple[str, ...]]] = [
    ("multipart / JSON / base64", ("multipart", "json/", "base64", "server/http/codec", "server/http/oip/wire")),
    ("pydantic validation", ("pydantic",)),
    ("HTTP parsing + uvicorn", ("h11", "httptools", "uvicorn/")),
    ("middleware + metrics", ("server/http/middleware", "prometheus_client", "starlette/middleware")),
    ("FastAPI / Starlette + handler", ("fastapi/", "starlette/", "server/http/")),
    ("asyncio event loop", ("asyncio/", "uvloop", "selectors")),
    ("threads / process IPC", ("concurrent/futures", "threading", "multiprocessing/", "queue")),
]
STAGES = WORK_STAGES + LEAF_STAGES
OTHER = "other"


def stage_of(stack: str) -> str:
    """The stage of one collapsed ``py-spy`` stack (frames ``;``-separated, outermost first)."""
    for stage, patterns in WORK_STAGES:
        if any(p in stack for p in patterns):
            return stage
    for frame in reversed(stack.split(";")):
        for stage, patterns in LEAF_STAGES:
            if any(p in frame for p in patterns):
                return stage
    return OTHER


def read_samples(raw: Path) -> Counter[str]:
    """py-spy's raw (collapsed) output -> samples per stage."""
    counts: Counter[str] = Counter()
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if stack and n.isdigit():
            counts[stage_of(stack)] += int(n)
    return counts


def pyspy() -> Path | None:
    """``py-spy`` beside this Python (a virtualenv's bin) or on ``PATH``."""
    here = Path(sys.executable).parent / "py-spy"
    found = shutil.which("py-spy")
    return here if here.exists() else (Path(found) if found else None)


def group_cpu_seconds(pgid: int) -> float:
    """User + system CPU seconds of the live processes in group ``pgid`` (their threads included)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in group_members(pgid):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
    return total / tick


def profile(server: ServerProcess, form: tuple[str, Path, str, list[str]], c: int, seconds: float, tmp: Path) -> dict:
    """One profiled load run: req/s, CPU ms per request and its split by stage."""
    path, body, media, headers = form
    url = server.url + path
    hey(url, body, 300, c, media, headers)  # warm-up
    raw = tmp / f"pyspy-{form[0].strip('/').replace('/', '_').split('?')[0]}-{body.name}-c{c}.txt"
    spy = subprocess.Popen(
        [str(pyspy()), "record", "--pid", str(server.proc.pid), "--subprocesses", "--format", "raw", "--rate", "250"]
        + ["--nonblocking", "--duration", str(int(seconds) + 2), "--output", str(raw)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(1.0)  # py-spy attached
    cpu0 = group_cpu_seconds(server.pgid)
    load = hey_for(url, body, seconds, c, media, headers)
    cpu1 = group_cpu_seconds(server.pgid)
    spy.wait(60)
    samples = read_samples(raw)
    total = sum(samples.values()) or 1
    cpu_ms = 1000 * (cpu1 - cpu0) / max(load["requests"], 1)
    stages = {s: {"share": n / total, "cpu_ms": cpu_ms * n / total} for s, n in samples.most_common()}
    return {**load, "cpu_ms_per_request": cpu_ms, "samples": total, "stages": stages}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--store", default=None, help="a store with a CURRENT routed bundle (default: tiny + emr_routed)")
    ap.add_argument("--seconds", type=float, default=15.0)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--forms", default="raw,json,v2bin", help="raw (v1 PNG body), json (v1 base64), v2bin")
    ap.add_argument("--modes", default="given,routed")
    ap.add_argument("--server-args", default="", help="extra `vitmerge serve` flags, e.g. '--worker process'")
    ap.add_argument("--out", default="request_profile", help="results file stem")
    ap.add_argument("--keep-stacks", default=None, help="a folder to keep py-spy's collapsed stacks in")
    ap.add_argument("--tree", default=None, help="serve another checkout's code (e.g. a baseline commit's)")
    args = ap.parse_args()
    if shutil.which("hey") is None or pyspy() is None:
        raise SystemExit("needs hey (apt-get install hey) and py-spy (pip install py-spy)")
    names = {"raw": "v1 raw PNG", "json": "v1 base64 JSON", "v2bin": "v2 binary tensors"}
    rows = []
    with terminate_as_interrupt(), tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        store = Path(args.store) if args.store else tmp / "store"
        if not args.store:
            build_demo_store(store)
        from PIL import Image

        from model_store.data.builtin import load_split

        png = tmp / "digit.png"
        Image.fromarray(load_split("digits", "test", limit=1).images[0]).save(png)
        port = free_port()
        cmd = [sys.executable, "-m", "server.cli", "serve", "--store", str(store), "--port", str(port)]
        cmd += ["--device", "cpu", "--watch-interval", "0", "--quiet", *shlex.split(args.server_args)]
        tree = Path(args.tree).resolve() if args.tree else REPO
        env = {**os.environ, "PYTHONPATH": str(tree)}
        with ServerProcess(cmd, tmp / "serve.log", cwd=tree, env=env, url=f"http://127.0.0.1:{port}") as server:
            for mode in args.modes.split(","):
                forms = request_forms(png.read_bytes(), "digits" if mode == "given" else None, tmp)
                for form in args.forms.split(","):
                    row = {"mode": mode, "form": names[form], "concurrency": args.concurrency}
                    stacks = Path(args.keep_stacks) if args.keep_stacks else tmp
                    stacks.mkdir(parents=True, exist_ok=True)
                    row.update(profile(server, forms[names[form]], args.concurrency, args.seconds, stacks))
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    res = {"command": " ".join(["python", *sys.argv]), "server_args": args.server_args, "rows": rows}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.out}.json").write_text(json.dumps(res, indent=1))
    md = render(res)
    (RESULTS / f"{args.out}.md").write_text(md)
    print(md)
    return 0


def render(res: dict) -> str:
    """Per row: req/s, CPU ms per request, and CPU ms per stage (a column per stage)."""
    stages = [s for s, _ in STAGES] + [OTHER]
    head = ["mode", "request", "c", "req/s", "p99 ms", "server CPU ms/req", *stages]
    lines = [f"Command: `{res['command']}`", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in res["rows"]:
        cells = [r["mode"], r["form"], str(r["concurrency"]), f"{r['rps']:.0f}", f"{r['p99_ms']:.1f}"]
        cells.append(f"{r['cpu_ms_per_request']:.2f}")
        cells += [f"{r['stages'].get(s, {}).get('cpu_ms', 0.0):.3f}" for s in stages]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
