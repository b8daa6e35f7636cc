"""One-pass low-rank serving (TSV-C bundles) vs a plain single ViT and routed EMR, on shuffled mixed batches.

A synthetic zoo at real size (random theta_0, N task models = theta_0 + random deltas; speed and memory
only, not accuracy) is merged with TSV-C at several rank fractions and with EMR; every configuration
runs the SAME shuffled mixed-task batches through the serving ``Engine``. Timing is interleaved per
batch: each round runs every configuration on each batch in turn, starting with a different
configuration each round, so a slow stretch of a shared machine hits every configuration alike; the
table gives the median batch time (and the best) per configuration, and the ratios come from one run
on one machine. EMR runs twice: with a weight cache holding every task's materialised model (its
fastest setting, N + 1 models of memory) and with the server's default cache (512 MiB).

``--routers`` picks how the TSV-C bundles route (each its own bundle and rows): ``gate`` (the CNN gate),
``rerun`` and ``shared`` (the backbone router at each block of ``--router-k``, SPEC section 8: blocks 1..k run again per
task group, or the bundle drops the deltas of the embeddings and blocks 1..k and the prefix is shared). The
synthetic backbone router's head is fitted (least squares) to route each benchmark image to its task, as the
synthetic gate is centred to; every routed row is checked to run the task-given rows' task mix. ``--no-emr``
leaves out the EMR rows.

    .venv/bin/python benchmarks/lowrank_serve.py [--arch vit_s14|vit_b16] [--tasks 5] [--batch 32]
        [--fractions 0.05,0.1,0.2] [--conv] [--gate-size 64] [--routers gate,rerun,shared] [--router-k 1,3]
        [--router-hidden 0] [--no-emr] [--passes 1] [--rounds 10] [--batches 2] [--device cpu] [--malloc glibc|tuned]

``--malloc glibc`` (the default, as ``vitmerge serve`` runs by default) keeps glibc's defaults;
``tuned`` applies ``VITMERGE_MALLOC_REUSE``'s tuning (``model_store.memory.reuse_freed_memory``)
to every configuration of the run alike -- this run's EMR cache churn then grew the heap past 24 GB
(killed) at ViT-B/16, so expect it to fit only small runs.

Writes benchmarks/results/lowrank_serve-<arch>[-conv][-<routers>].{md,json,png} (the routers in the name when
they are not just ``gate``).

Feeds BENCHMARKS.md, section
"Low-rank task deltas: TSV-C, TSV-M, TSV routed, one-pass serving (issue 21)" (throughput and memory); the
``--routers`` rows also feed the section "Backbone router (issue 36)".
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from merging.methods.tsv import tsv_compress
from merging.synthetic import ARCHS, mixed_batches, publish_synthetic, synthetic_gate, synthetic_router, synthetic_zoo
from model_store.architecture import build_model
from model_store.bundle import BundleStore
from model_store.memory import reuse_freed_memory
from model_store.schema import BundleRouterSpec
from model_store.settings import StoreLayout
from server.runtime.engine import DEFAULT_CACHE_BYTES, Engine, EngineOptions

RESULTS = Path(__file__).resolve().parent / "results"


def interleaved(configs: dict, batches: list[dict], rounds: int, desc: str) -> dict[str, list[float]]:
    """Seconds per batch of every configuration, interleaved per batch (a different one first each round)."""
    names = list(configs)
    times: dict[str, list[float]] = {n: [] for n in names}
    for i in tqdm(range(rounds), desc=desc, unit="round"):
        for b in batches:
            for name in names[i % len(names) :] + names[: i % len(names)]:
                t = time.perf_counter()
                configs[name](b)
                times[name].append(time.perf_counter() - t)
    return times


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", choices=sorted(ARCHS), default="vit_s14")
    ap.add_argument("--tasks", type=int, default=5)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--fractions", default="0.05,0.1,0.2")
    ap.add_argument("--conv", action="store_true", help="TSV-C compresses the patch-embedding conv too")
    ap.add_argument("--gate-size", type=int, default=64, help="the gate's input size (px)")
    ap.add_argument("--routers", default="gate", help="TSV-C bundles' routers: gate, rerun, shared (comma list)")
    ap.add_argument("--router-k", default="1", help="the backbone router's block (comma list: a bundle each)")
    ap.add_argument("--router-hidden", type=int, default=0, help="the backbone router head's hidden width")
    ap.add_argument("--no-emr", action="store_true", help="leave out the EMR rows")
    ap.add_argument("--passes", type=int, default=1, help="also time the plain ViT split into this many passes")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--batches", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--malloc", choices=["glibc", "tuned"], default="glibc", help="allocator tuning (see above)")
    args = ap.parse_args()
    malloc = "glibc defaults"
    if args.malloc == "tuned":
        malloc = "tuned (VITMERGE_MALLOC_REUSE)" if reuse_freed_memory() else "glibc defaults (tuning unavailable)"
    arch, size = ARCHS[args.arch]
    fractions = [float(f) for f in args.fractions.split(",") if f]
    device = torch.device(args.device)
    zoo = synthetic_zoo(arch, args.tasks, args.seed)
    base, heads = zoo[0], zoo[2]
    one_model = sum(v.numel() * 4 for v in base.values()) + heads[0]["head.weight"].numel() * 4
    routers = [r for r in args.routers.split(",") if r]
    unknown = set(routers) - {"gate", "rerun", "shared"}
    if unknown:
        ap.error(f"unknown routers {sorted(unknown)}: use gate, rerun, shared")
    with tempfile.TemporaryDirectory() as tmp:
        store = BundleStore(StoreLayout(Path(tmp)), keep=20)
        engines: dict[str, Engine] = {}
        conv = " conv" if args.conv else ""
        gate, gate_pool = synthetic_gate(args.tasks, args.gate_size, args.seed)
        batches = mixed_batches(args.tasks, size, gate_pool, args.batch, args.batches, args.seed)
        ks = [int(k) for k in args.router_k.split(",") if k]
        images, owners = torch.cat([b["x"] for b in batches]), [t for b in batches for t in b["t"]]
        heads_k = {k: synthetic_router(arch, base, k, args.router_hidden, images, owners, args.seed) for k in ks}
        for f in tqdm(fractions, desc="merge TSV-C bundles", unit="bundle"):
            deltas = tsv_compress(base, zoo[1], f, conv=args.conv)  # one SVD pass per f, every router's bundle
            for r, k in [("gate", 0)] * ("gate" in routers) + [(r, k) for r in routers if r != "gate" for k in ks]:
                spec, label = None, ""
                if r != "gate":
                    variant = "rerun" if r == "rerun" else "shared_prefix"
                    spec = BundleRouterSpec(k=k, variant=variant, hidden=args.router_hidden, theta0_file="backbone")
                    label = f" + backbone router k={k} {variant}"
                version = publish_synthetic(
                    store,
                    "synthetic-tsv_c",
                    arch,
                    size,
                    zoo,
                    gate,
                    f,
                    args.conv,
                    args.gate_size,
                    spec,
                    heads_k.get(k),
                    deltas,
                )
                engines[f"TSV-C f={f:g}{conv}{label}"] = Engine(store.load(version), device)
        if not args.no_emr:
            emr = store.load(publish_synthetic(store, "synthetic-emr", arch, size, zoo, gate, gate_size=args.gate_size))
            engines["EMR (every task cached)"] = Engine(
                emr, EngineOptions(str(device), cache_bytes=(args.tasks + 1) * one_model)
            )
            engines["EMR (default 512 MiB cache)"] = Engine(
                emr, EngineOptions(str(device), cache_bytes=DEFAULT_CACHE_BYTES)
            )
        del zoo
        plain = build_model(arch, 10).to(device).eval()
        configs = {"plain ViT (one model, no routing)": lambda b: plain(b["x"].to(device))}
        if args.passes > 1:  # the reference split into smaller passes (cache locality on a CPU)
            configs[f"plain ViT in {args.passes} passes"] = lambda b: torch.cat(
                [plain(xs) for xs in b["x"].to(device).tensor_split(args.passes)]
            )
        for name, e in engines.items():
            configs[f"{name}, task given"] = lambda b, e=e: e.predict(b["x"], b["t"])
            by = "the gate" if e.has_gate else "the backbone router"
            gate_in = (lambda b: b["g"]) if e.has_gate else (lambda b: None)
            configs[f"{name}, routed by {by}"] = lambda b, e=e, g=gate_in: e.predict(b["x"], [None] * len(b["t"]), g(b))
        with torch.inference_mode():
            for fn in configs.values():  # warm-up: caches filled, graphs captured
                fn(batches[0])
            for e in engines.values():  # routed rows run the task-given rows' task mix
                for b in batches:
                    routed = [o.task for o in e.predict(b["x"], [None] * len(b["t"]), b["g"] if e.has_gate else None)]
                    assert routed == b["t"], "the router does not route the batch's tasks"
            times = interleaved(configs, batches, args.rounds, f"interleaved rounds ({args.arch})")
        plain_median = statistics.median(times["plain ViT (one model, no routing)"])
        plain_best = min(times["plain ViT (one model, no routing)"])
        rows = []
        for name, secs in times.items():
            key = name.rsplit(",", 1)[0]
            resident = sum(engines[key].resident_bytes().values()) if key in engines else one_model
            median = statistics.median(secs)
            rows.append(
                {
                    "config": name,
                    "img_s": args.batch / median,
                    "vs_plain": plain_median / median,
                    "vs_plain_best": plain_best / min(secs),
                    "resident_MB": resident / 2**20,
                }
            )
    res = {
        "command": " ".join(["python", *sys.argv]),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs"
        + (f", {torch.cuda.get_device_name()}" if device.type == "cuda" else ""),
        "device": str(device),
        "malloc": malloc,
        "arch": args.arch,
        "tasks": args.tasks,
        "batch": args.batch,
        "timed_batches": args.rounds * args.batches,
        "one_model_MB": one_model / 2**20,
        "n_models_MB": args.tasks * one_model / 2**20,
        "rows": rows,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    tag = "" if routers == ["gate"] else "-" + "-".join(routers)
    stem = RESULTS / f"lowrank_serve-{args.arch}{'-conv' if args.conv else ''}{tag}"
    stem.with_suffix(".json").write_text(json.dumps(res, indent=1))
    md = render(res)
    stem.with_suffix(".md").write_text(md)
    plot(res, stem.with_suffix(".png"))
    print(md)
    return 0


def render(res: dict) -> str:
    lines = [
        f"Command: `{res['command']}`; {res['machine']}; device {res['device']}; malloc {res.get('malloc', '?')}; "
        f"{res['arch']}, N = {res['tasks']} "
        f"tasks, shuffled mixed batches of {res['batch']}, {res['timed_batches']} timed batches per configuration "
        f"(interleaved per batch). One model {res['one_model_MB']:.1f} MB, N separate models "
        f"{res['n_models_MB']:.1f} MB. img/s and 'vs plain' from median batch times; 'best' from the fastest batch.",
        "",
        "| configuration | img/s | vs plain ViT | vs plain (best) | resident MB |",
        "|---|---|---|---|---|",
    ]
    for r in res["rows"]:
        lines.append(
            f"| {r['config']} | {r['img_s']:.1f} | {r['vs_plain']:.2f}× | {r['vs_plain_best']:.2f}× "
            f"| {r['resident_MB']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = res["rows"]
    fig, ax = plt.subplots(figsize=(7.5, 0.35 * len(rows) + 1.2))
    names = [r["config"] for r in rows][::-1]
    ax.barh(names, [r["vs_plain"] for r in rows][::-1], color="tab:blue")
    ax.axvline(1.0, color="black", lw=1)
    ax.axvline(0.9, color="grey", lw=1, ls=":")
    ax.set(
        xlabel="throughput vs plain ViT (×)", title=f"{res['arch']}: mixed batches of {res['batch']}, {res['device']}"
    )
    ax.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
