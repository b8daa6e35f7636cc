"""Serving throughput of gated bundles on mixed-task batches: plain ViT vs routed EMR vs gated exact / sparse.

    .venv/bin/python benchmarks/gating.py [--zoo tiny] [--batch 32] [--rounds 7] [--gate-epochs 10]
    .venv/bin/python benchmarks/gating.py --zoo dinov2-s14 --one-hot      # the real-size check

Feeds BENCHMARKS.md, section "Gated merging and routed EMR on the tiny zoo": the throughput table and the
sparse threshold sweep (``--zoo tiny``), and its real-size check (``--zoo dinov2-s14 --one-hot``). Accuracy vs m
of the gated merges (every m, both gates, task given and routed) is a row group of `vitmerge bench accuracy`.

Every model is a bundle the merge pipeline makes (``gating_regmean`` at m = depth / 2 with the default gate,
``emr_routed`` with the same gate, ``avg`` as the plain single-ViT reference), in a temporary store, timed
through ``Engine.features`` (the engine's per-kind strategy) on the same batches, interleaved rounds.
``p`` is the gated bundle's gate on each image (``--one-hot``: the true task, no gate trained -- what sparse
mixing runs when every image keeps one expert). One variant is not an engine option: the gated layers'
"experts" linear mode (every expert, then mix outputs), timed on ``GatedViT.from_bundle``. The sparse sweep
also reports each threshold's routed accuracy (``TaskPool.routed`` through the Engine).

Writes benchmarks/results/gating.{md,json} (tiny) or gating-throughput-<zoo>.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm.auto import tqdm

from merging.pipeline import MergeCache, merge_and_publish
from model_store.bundle import BundleStore
from model_store.memory import limit_heap_fragmentation
from model_store.settings import StoreLayout
from model_store.zoo import Zoo
from model_store.zoo_build.presets import build_zoo
from server.eval.taskpool import TaskPool
from server.runtime.bundle_reader import BundleReader
from server.runtime.engine import Engine, EngineOptions
from server.runtime.gated_vit import GatedViT

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parent.parent
THRESHOLDS = (0.01, 0.05, 0.1, 0.2)
Batch = tuple[torch.Tensor, torch.Tensor]


def throughput(fns: dict[str, Callable[[torch.Tensor, torch.Tensor], object]], batches: list[Batch], rounds: int):
    """Images per second of every ``fns[name]`` over ``batches``, interleaved.

    Each round times one pass of every function back to back, so a slow phase of this shared machine hits all
    of them alike; ratios to the first function are taken per round. Returns per name: best img/s, and the
    median / min / max per-round ratio.
    """
    images = sum(len(b[0]) for b in batches)
    for fn in fns.values():
        fn(*batches[0])
    rates: dict[str, list[float]] = {name: [] for name in fns}
    for _ in tqdm(range(rounds), desc="throughput rounds"):
        for name, fn in fns.items():
            t = time.perf_counter()
            for b in batches:
                fn(*b)
            rates[name].append(images / (time.perf_counter() - t))
    ref = rates[next(iter(fns))]
    out = {}
    for name, r in rates.items():
        ratios = sorted(a / b for a, b in zip(r, ref))
        out[name] = {
            "img_s": max(r),
            "ratio": statistics.median(ratios),
            "ratio_min": ratios[0],
            "ratio_max": ratios[-1],
        }
    return out


def mixed_batches(engine: Engine, pool: TaskPool, batch: int, n_batches: int, one_hot: bool) -> list[Batch]:
    """``n_batches`` shuffled mixed-task batches of model input and ``p`` (the gate's, or the one-hot true task)."""
    xs, gs, tid = [], [], []
    for i, t in enumerate(pool.tasks):
        images = pool.sets[t]
        assert images is not None
        for chunk in images.chunks(pool.limit):
            x, g = engine.prepare(chunk, None if engine.has_gate and not one_hot else i)
            xs.append(x)
            gs.append(g)
            tid.append(torch.full((len(x),), i))
    x, task = torch.cat(xs), torch.cat(tid)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[: batch * n_batches]
    if one_hot or not engine.has_gate:
        p = torch.nn.functional.one_hot(task[order], len(pool.tasks)).float()
    else:
        g = torch.cat(gs)[order]
        p = torch.cat([engine.route([None] * len(g[i : i + 256]), g[i : i + 256])[0] for i in range(0, len(g), 256)])
    x = x[order]
    return [(x[i : i + batch], p[i : i + batch]) for i in range(0, len(x), batch)]


def run(zoo: Zoo, store: BundleStore, args: argparse.Namespace) -> dict:
    """Merge the three bundles, time every variant, sweep the sparse threshold."""
    cache = MergeCache()
    depth = len(zoo.build_model(zoo.tasks[0]).blocks)  # type: ignore[arg-type]
    m = depth // 2 if args.m is None else args.m
    gate = {"gate_epochs": args.gate_epochs, "gate_test_images": 0}

    def publish(method: str, params: dict) -> Engine:
        outcome = merge_and_publish(zoo, store, method, params, progress=False, cache=cache)
        return Engine(store.load(outcome.version), EngineOptions(mixing="exact"))

    methods = {"plain": ("avg", {}), "gated": ("gating_regmean", {"m": m, **gate})}
    if not args.one_hot:
        methods["emr"] = ("emr_routed", gate)
    engines = {k: publish(method, params) for k, (method, params) in methods.items()}
    gated = engines["gated"]
    pool = TaskPool.of_zoo(zoo, zoo.tasks, args.images, "the gating benchmark")
    batches = mixed_batches(gated, pool, args.batch, args.batches, args.one_hot)
    experts = GatedViT.from_bundle(BundleReader(gated.bundle), "experts")
    sparse = {t: Engine(gated.bundle, EngineOptions(mixing="sparse", threshold=t)) for t in THRESHOLDS}
    fns = {"plain ViT": engines["plain"].features}
    if "emr" in engines:
        fns["routed EMR (group by task)"] = engines["emr"].features
    fns["gated exact, per-image mixed weights + bmm"] = gated.features
    fns["gated exact, all experts then mix outputs"] = lambda x, p: experts.features(x, p, "exact")
    fns.update({f"gated sparse, threshold {t}": e.features for t, e in sparse.items()})
    speed = throughput(fns, batches, args.rounds)
    p_all = torch.cat([p for _, p in batches])
    sweep = []
    if not args.one_hot:
        exact = pool.routed_accuracy(pool.routed(gated, args.batch))
        sweep.append({"threshold": "exact", "routed": {t: r["routed"] for t, r in exact.items() if r}})
        for t, e in sparse.items():
            acc = pool.routed_accuracy(pool.routed(e, args.batch))
            one = float(((p_all >= t).sum(1) <= 1).float().mean())
            sweep.append({"threshold": t, "one_expert": one, "routed": {k: r["routed"] for k, r in acc.items() if r}})
    params_m = sum(v.numel() for v in zoo.backbone(zoo.base).values()) / 1e6
    return {
        **vars(args),
        "zoo": zoo.name,
        "params_M": params_m,
        "depth": depth,
        "m": m,
        "tasks": zoo.tasks,
        "speed": speed,
        "sweep": sweep,
    }


def render(r: dict) -> str:
    """Markdown: the throughput table and (with a gate) the sparse threshold sweep."""
    p = "p = one-hot true task" if r["one_hot"] else "p from the bundle's EfficientNet-Lite0 gate"
    lines = [
        f"Command: `.venv/bin/python benchmarks/gating.py --zoo {r['zoo']}{' --one-hot' if r['one_hot'] else ''}`: "
        f"{r['zoo']} zoo ({r['params_M']:.1f} M params, depth {r['depth']}), gating+RegMean m = {r['m']}, "
        f"{len(r['tasks'])} tasks, mixed-task batches of {r['batch']} ({r['batches']} per round), {r['rounds']} "
        f"interleaved rounds, {p}; gate excluded. img/s = best round, ratio = median of the per-round ratios "
        "(min–max).",
        "",
        "| strategy | img/s | vs plain ViT |",
        "|---|---|---|",
    ]
    for name, v in r["speed"].items():
        lines.append(f"| {name} | {v['img_s']:.1f} | {v['ratio']:.2f}x ({v['ratio_min']:.2f}–{v['ratio_max']:.2f}) |")
    if r["sweep"]:
        lines += ["", "| mixing | images keeping one expert (%) | routed acc (%) |", "|---|---|---|"]
        for s in r["sweep"]:
            one = f"{100 * s['one_expert']:.1f}" if "one_expert" in s else "–"
            acc = 100 * sum(s["routed"].values()) / len(s["routed"])
            lines.append(f"| {s['threshold']} | {one} | {acc:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--zoo", default="tiny", help="preset (built or copied into ./store if missing)")
    parser.add_argument("--gate-epochs", type=int, default=10)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--batches", type=int, default=40, help="batches per round")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved throughput rounds (median ratio reported)")
    parser.add_argument("--m", type=int, default=None, help="gated blocks (default depth / 2)")
    parser.add_argument("--images", type=int, default=None, help="test images per task (default all)")
    parser.add_argument("--one-hot", action="store_true", help="p = the true task (no gate, no routed EMR)")
    args = parser.parse_args()
    limit_heap_fragmentation()
    torch.manual_seed(0)
    zoo = build_zoo(args.zoo, REPO / "store" / "zoos" / args.zoo).zoo
    root = Path(tempfile.mkdtemp(prefix="vitmerge-gating-"))
    try:
        result = run(zoo, BundleStore(StoreLayout(root), keep=100), args)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    stem = "gating" if args.zoo == "tiny" else f"gating-throughput-{args.zoo}"
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps(result, indent=2))
    (RESULTS / f"{stem}.md").write_text(render(result))
    print(render(result))


if __name__ == "__main__":
    main()
