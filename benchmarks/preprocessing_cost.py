"""What the library-exact preprocessing costs per request (issue 33): this tree vs a baseline commit.

Two ``vitmerge serve`` processes on ONE store (a routed-EMR bundle of the demo zoo, merged by the
baseline so both can read it): the baseline commit's code (a ``git worktree`` of it) and this tree's.
``hey`` sends single-image raw-PNG ``POST /v1/classify`` requests at one concurrency, task given and
routed; the two servers alternate per round. Then the per-image decode + preprocessing time of each
tree, in-process, on a demo-zoo request image (28 px gray PNG) and a 512 x 384 photo (JPEG).

    .venv/bin/python benchmarks/preprocessing_cost.py [--baseline 458d993] [--requests 2000]
        [--concurrency 16] [--rounds 3] [--store DIR]

Writes benchmarks/results/preprocessing_cost.{md,json}. Every server it starts is stopped (its whole
process group) on success, failure and Ctrl-C.

Feeds BENCHMARKS.md, section "What it costs per request".
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from server.http.live import ServerProcess, free_port, terminate_as_interrupt

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"

#: decode + preprocess one image, ``n`` times; prints the median milliseconds (run in each tree)
MICRO = r"""
import io, statistics, sys, time
from pathlib import Path
from model_store.bundle import BundleStore
from model_store.settings import StoreLayout
from server.http.codec import decode_image
from server.runtime.engine import EngineFrontend
engine = EngineFrontend(BundleStore(StoreLayout(Path(sys.argv[1]))).load(), "cpu")
blob = open(sys.argv[2], "rb").read()
task = engine.tasks.index(sys.argv[3])
import inspect
if "need_gate" in inspect.signature(engine.preprocess).parameters:  # the baseline's preprocess(image, need_gate)
    routed = lambda: engine.preprocess(decode_image(blob, 1 << 26), True)
    given = lambda: engine.preprocess(decode_image(blob, 1 << 26), False)
else:
    routed = lambda: engine.preprocess(decode_image(blob, 1 << 26), None)
    given = lambda: engine.preprocess(decode_image(blob, 1 << 26), task)
for name, fn in (("given", given), ("routed", routed)):
    times = []
    for _ in range(int(sys.argv[4])):
        t = time.perf_counter(); fn(); times.append(time.perf_counter() - t)
    print(name, 1000 * statistics.median(times))
"""


def worktree(commit: str) -> Path:
    """A detached worktree of ``commit`` (created once, reused)."""
    path = Path(tempfile.gettempdir()) / f"vitmerge-baseline-{commit}"
    if not (path / "server").exists():
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(path), commit], check=True)
    return path


def env_for(tree: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}


@contextmanager
def serving(tree: Path, store: Path, port: int) -> Iterator[str]:
    """``vitmerge serve`` of ``tree``'s code in its own process group; the group is stopped on exit."""
    cmd = [sys.executable, "-m", "server.cli", "serve", "--store", str(store), "--port", str(port)]
    cmd += ["--device", "cpu", "--watch-interval", "0", "--quiet"]
    url = f"http://127.0.0.1:{port}"
    with ServerProcess(cmd, store / f"serve-{port}.log", cwd=tree, env=env_for(tree), url=url, timeout_s=180):
        yield url


def hey(url: str, png: Path, requests: int, concurrency: int) -> dict[str, float]:
    """One ``hey`` run: requests/s, p50, p99 (ms)."""
    out = subprocess.run(
        ["hey", "-n", str(requests), "-c", str(concurrency), "-m", "POST", "-T", "image/png", "-D", str(png), url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    pct = {m.group(1): 1000 * float(m.group(2)) for m in re.finditer(r"(\d+)%+ in ([\d.]+) secs", out)}
    codes = re.findall(r"\[(\d+)\]\s+(\d+) responses", out)
    if any(c != "200" for c, _ in codes):
        raise RuntimeError(f"non-200 answers: {codes}")
    return {"rps": rps, "p50": pct.get("50", float("nan")), "p99": pct.get("99", float("nan"))}


def mnist_png(folder: Path) -> Path:
    """A demo-zoo request: one held-out MNIST test image as a 28 px gray PNG."""
    from PIL import Image

    from model_store.data.builtin import load_split

    Image.fromarray(load_split("mnist", "test", limit=1).images[0]).save(folder / "mnist.png")
    return folder / "mnist.png"


def photo(folder: Path) -> Path:
    """A 512 x 384 JPEG photo (foolbox's ImageNet sample cut to 4:3)."""
    import glob
    import importlib.util

    from PIL import Image

    root = Path(importlib.util.find_spec("foolbox").origin).parent / "data"  # type: ignore[arg-type,union-attr]
    src = sorted(glob.glob(str(root / "imagenet_*.jpg")))[0]
    buf = io.BytesIO()
    Image.open(src).convert("RGB").crop((0, 64, 512, 448)).save(buf, format="JPEG", quality=90)
    (folder / "photo.jpg").write_bytes(buf.getvalue())
    return folder / "photo.jpg"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline", default="458d993", help="commit before the preprocessing change")
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--store", default=None, help="a store with a routed bundle both trees read (default: merge one)")
    args = ap.parse_args()
    base = worktree(args.baseline)
    store = Path(args.store) if args.store else Path(tempfile.mkdtemp(prefix="prep-cost-")) / "store"
    if not (store / "CURRENT").exists():  # the baseline merges (format-1 bundles read everywhere)
        build = [sys.executable, "-m", "server.cli", "zoo", "build", "--preset", "tiny", "--store", str(store)]
        subprocess.run([*build, "--quiet"], cwd=base, env=env_for(base), check=True)  # the shipped demo zoo
        cmd = [sys.executable, "-m", "server.cli", "merge", "--zoo", "tiny", "--store", str(store)]
        subprocess.run(
            [*cmd, "--method", "emr_routed", "--param", "gate_epochs=3", "--quiet"],
            cwd=base,
            env=env_for(base),
            check=True,
        )
    png = mnist_png(store.parent)
    trees = {"baseline " + args.baseline: base, "this tree": REPO}
    rows = []
    for mode, query in (("task given", "?task=mnist"), ("routed", "")):
        runs: dict[str, list[dict[str, float]]] = {name: [] for name in trees}
        for _ in range(args.rounds):
            for name, tree in trees.items():
                with serving(tree, store, free_port()) as url:
                    hey(url + "/v1/classify" + query, png, max(200, args.requests // 10), args.concurrency)  # warm-up
                    runs[name].append(hey(url + "/v1/classify" + query, png, args.requests, args.concurrency))
        for name, rs in runs.items():
            rows.append(
                {
                    "mode": mode,
                    "server": name,
                    "rps": statistics.median(r["rps"] for r in rs),
                    "p50": statistics.median(r["p50"] for r in rs),
                    "p99": statistics.median(r["p99"] for r in rs),
                    "runs": rs,
                }
            )
    report(rows, {}, args)  # the HTTP table is kept even if the in-process timing fails
    micro = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, image in (("28 px gray PNG", png), ("512 x 384 JPEG", photo(Path(tmp)))):
            for name, tree in trees.items():
                out = subprocess.run(
                    [sys.executable, "-c", MICRO, str(store), str(image), "mnist", "300"],
                    cwd=tree,
                    env=env_for(tree),
                    capture_output=True,
                    text=True,
                    check=True,
                ).stdout
                micro[f"{label} | {name}"] = {k: float(v) for k, v in (line.split() for line in out.splitlines())}
    report(rows, micro, args)


def report(rows: list[dict], micro: dict[str, dict[str, float]], args: argparse.Namespace) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    lines = [
        f"`.venv/bin/python benchmarks/preprocessing_cost.py --baseline {args.baseline} --requests {args.requests} "
        f"--concurrency {args.concurrency} --rounds {args.rounds}`",
        "",
        "| mode | server | req/s (median of rounds) | p50 ms | p99 ms |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {r['mode']} | {r['server']} | {r['rps']:.0f} | {r['p50']:.1f} | {r['p99']:.1f} |" for r in rows]
    lines += ["", "| image | tree | decode + preprocess, task given (ms) | routed (ms) |", "|---|---|---|---|"]
    for key, v in micro.items():
        image, tree = key.split(" | ")
        lines.append(f"| {image} | {tree} | {v['given']:.3f} | {v['routed']:.3f} |")
    text = "\n".join(lines) + "\n"
    (RESULTS / "preprocessing_cost.md").write_text(text)
    (RESULTS / "preprocessing_cost.json").write_text(json.dumps({"rows": rows, "micro": micro}, indent=2) + "\n")
    print(text)


if __name__ == "__main__":
    with terminate_as_interrupt():  # SIGTERM, too, stops the servers started
        main()
