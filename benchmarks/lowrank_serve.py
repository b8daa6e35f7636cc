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
``rerun`` and ``shared`` (the backbone router at block ``--router-k``, SPEC section 8: blocks 1..k run again per
task group, or the bundle drops the deltas of the embeddings and blocks 1..k and the prefix is shared). The
synthetic backbone router's head is fitted (least squares) to route each benchmark image to its task, as the
synthetic gate is centred to; every routed row is checked to run the task-given rows' task mix. ``--no-emr``
leaves out the EMR rows.

    .venv/bin/python benchmarks/lowrank_serve.py [--arch vit_s14|vit_b16] [--tasks 5] [--batch 32]
        [--fractions 0.05,0.1,0.2] [--conv] [--gate-size 64] [--routers gate,rerun,shared] [--router-k 1]
        [--router-hidden 0] [--no-emr] [--passes 1] [--rounds 10] [--batches 2] [--device cpu]
        [--malloc glibc|tuned]

``--malloc glibc`` (the default, as ``vitmerge serve`` runs by default) keeps glibc's defaults;
``tuned`` applies ``VITMERGE_MALLOC_REUSE``'s tuning (``server.runtime.host_memory.reuse_freed_memory``)
to every configuration of the run alike -- this run's EMR cache churn then grew the heap past 24 GB
(killed) at ViT-B/16, so expect it to fit only small runs.

Writes benchmarks/results/lowrank_serve-<arch>[-conv][-<routers>].{md,json,png} (the routers in the name when
they are not just ``gate``).
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

from merging.gating.backbone_router import shared_prefix_deltas
from merging.methods.emr import emr_merge
from merging.methods.tsv import LowRankDeltas, tsv_compress
from merging.pipeline import write_lowrank
from model_store.architecture import build_gate, build_model, gate_state
from model_store.backbone_router import RouterHead, ViTPrefix, pool_tokens, prefix_keys
from model_store.bundle import BundleStore
from model_store.schema import Architecture, BundleGateSpec, BundleRouterSpec, BundleSpec, BundleTask, EMRSpec
from model_store.settings import StoreLayout
from server.runtime.engine import Engine
from server.runtime.host_memory import reuse_freed_memory

RESULTS = Path(__file__).resolve().parent / "results"
ARCHS = {
    # the dinov2-s14 zoo's backbone at its 56 px input (BENCHMARKS.md): 21.5 M parameters, 17 tokens
    "vit_s14": ({"timm_name": "vit_small_patch14_dinov2", "kwargs": {"img_size": 56}}, 56),
    # ViT-B/16 at 224 px: 86 M parameters, 197 tokens
    "vit_b16": ({"timm_name": "vit_base_patch16_224", "kwargs": {}}, 224),
}
#: the server's default weight-cache budget (``VITMERGE_CACHE_BYTES``)
DEFAULT_CACHE_BYTES = 512 * 2**20


def synthetic_zoo(arch: dict, n: int, seed: int) -> tuple[dict, list[dict], list[dict]]:
    """theta_0, N task backbones (theta_0 + 1e-2 Gaussian deltas) and N 10-class heads."""
    from model_store.schema import Architecture

    torch.manual_seed(seed)
    model = build_model(Architecture.model_validate(arch), 0)
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    tuned = [{k: v + 1e-2 * torch.randn_like(v) for k, v in base.items()} for _ in range(n)]
    dim = model.num_features
    heads = [{"head.weight": 0.02 * torch.randn(10, dim), "head.bias": torch.zeros(10)} for _ in range(n)]
    return base, tuned, heads


def _spec(
    kind: str, arch: dict, size: int, gate_size: int, tasks: list[str], router: BundleRouterSpec | None = None, **fields
) -> dict:
    rgb = {"size": size, "channels": 3, "mean": [0.5] * 3, "std": [0.5] * 3}
    gate = BundleGateSpec(arch="efficientnet_lite0", preprocessing={**rgb, "size": gate_size})  # type: ignore[arg-type]
    return BundleSpec.model_validate(
        {
            "kind": kind,
            "architecture": arch,
            "preprocessing": rgb,
            "tasks": [BundleTask(name=t, class_names=[str(c) for c in range(10)]) for t in tasks],
            "gate": gate if router is None else None,
            "router": router,
            **fields,
        }
    ).model_dump(mode="json")


@torch.inference_mode()
def synthetic_router(arch: dict, base: dict, k: int, hidden: int, batches: list[dict], n_tasks: int, seed: int) -> dict:
    """A backbone router head (``head/<name>``) on ``theta_0``'s tokens after block ``k`` that routes every image
    of ``batches`` to its task: the last layer fitted by least squares to one-hot targets (a random first layer
    with ``hidden``)."""
    prefix = ViTPrefix(Architecture.model_validate(arch), k, base)
    z = torch.cat([pool_tokens(prefix(b["x"])) for b in batches])
    target = torch.nn.functional.one_hot(torch.tensor([t for b in batches for t in b["t"]]), n_tasks).float()
    torch.manual_seed(seed)
    head = RouterHead(z.shape[1], n_tasks, hidden)
    last = head.net if hidden == 0 else head.net[2]  # type: ignore[index]
    feats = z if hidden == 0 else head.net[1](head.net[0](z))  # type: ignore[index]
    ones = torch.ones(len(feats), 1)
    sol = torch.linalg.lstsq(torch.cat([feats, ones], 1), 10 * (target - 0.5)).solution
    last.weight.copy_(sol[:-1].T)
    last.bias.copy_(sol[-1])
    return {f"head/{n}": t.detach().clone() for n, t in head.state_dict().items()}


def publish(
    store: BundleStore,
    kind: str,
    arch: dict,
    size: int,
    base,
    tuned,
    heads,
    f: float | None,
    gate: dict,
    conv: bool = False,
    gate_size: int = 64,
    router: BundleRouterSpec | None = None,
    router_head: dict | None = None,
    deltas: LowRankDeltas | None = None,
) -> str:
    """A lowrank (TSV-C at ``f``, the patch conv compressed too with ``conv``; ``deltas``: those, already made) or
    EMR bundle with a gate, or (lowrank) with the backbone ``router`` whose head is ``router_head``."""
    tasks = [f"task{i}" for i in range(len(tuned))]
    draft = store.draft()
    draft.add_tensors("heads", {f"{t}/{k}": v for t, h in zip(tasks, heads) for k, v in h.items()})
    if router is None:
        draft.add_tensors("gate", gate)
    if kind == "lowrank":
        assert f is not None
        deltas = deltas if deltas is not None else tsv_compress(base, tuned, f, conv=conv)
        if router is not None:
            assert router_head is not None
            if router.variant == "shared_prefix":
                deltas = shared_prefix_deltas(deltas, router.k)
            held = set(deltas.ranks) | set(deltas.shared)  # theta_0 in backbone.safetensors
            own = {f"theta0/{k}": base[k] for k in prefix_keys(list(base), router.k) if k not in held}
            draft.add_tensors("router", {**router_head, **own})
        spec = _spec("lowrank", arch, size, gate_size, tasks, router, lowrank=write_lowrank(draft, deltas))
    else:
        merged = emr_merge(base, tuned)
        draft.add_tensors("base", base)
        draft.add_tensors("tau_unified", merged.tau_unified)
        masks = {f"{t}/{k}": v for t, packed in zip(tasks, merged.packed_masks) for k, v in packed.items()}
        draft.add_tensors("masks", masks)
        spec = _spec("emr", arch, size, gate_size, tasks, emr=EMRSpec(rescalers=dict(zip(tasks, merged.rescalers))))
    draft.add_json("model", spec)
    return store.publish(draft, f"synthetic-{kind}", tasks=tasks, extra={"synthetic": True, "f": f, "conv": conv})


@torch.inference_mode()
def synthetic_gate(n_tasks: int, gate_size: int, seed: int, pool: int = 512) -> tuple[dict, list[torch.Tensor]]:
    """A random EfficientNet-Lite0 gate whose classifier bias is centred on a pool of random images,
    and those images sorted by the task the gate routes them to.

    A random gate sends nearly every random image to ONE task (measured: 400 of 400), so a "routed"
    batch would be a one-task batch -- far cheaper than the shuffled mix the task-given rows run.
    Centring the logits spreads the routing; the batches then take, for each image's task, a gate
    image routed to that task, so routed and task-given rows run the same task mix.
    """
    torch.manual_seed(seed)
    gate = build_gate("efficientnet_lite0", n_tasks).eval()
    images = torch.randn(pool, 3, gate_size, gate_size)
    head = gate.get_classifier()
    assert isinstance(head, torch.nn.Linear)
    head.bias -= gate(images.contiguous(memory_format=torch.channels_last)).mean(0)
    routed = gate(images.contiguous(memory_format=torch.channels_last)).argmax(1)
    by_task = [images[routed == t] for t in range(n_tasks)]
    empty = [t for t, imgs in enumerate(by_task) if len(imgs) == 0]
    if empty:
        raise RuntimeError(f"the synthetic gate routes none of {pool} images to tasks {empty}: raise the pool")
    return gate_state(gate), by_task


def mixed_batches(
    n_tasks: int, size: int, gate_pool: list[torch.Tensor], batch: int, count: int, seed: int
) -> list[dict]:
    """Shuffled mixed-task batches: images, each image's task and a gate input the gate routes to it."""
    g = torch.Generator().manual_seed(seed)
    out, used = [], [0] * n_tasks
    for _ in range(count):
        tasks = torch.randint(0, n_tasks, (batch,), generator=g).tolist()
        gate_images = []
        for t in tasks:
            gate_images.append(gate_pool[t][used[t] % len(gate_pool[t])])
            used[t] += 1
        out.append({"x": torch.randn(batch, 3, size, size, generator=g), "g": torch.stack(gate_images), "t": tasks})
    return out


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
    ap.add_argument("--router-k", type=int, default=1, help="the backbone router's block")
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
    base, tuned, heads = synthetic_zoo(arch, args.tasks, args.seed)
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
        head = synthetic_router(arch, base, args.router_k, args.router_hidden, batches, args.tasks, args.seed)
        for f in tqdm(fractions, desc="merge TSV-C bundles", unit="bundle"):
            deltas = tsv_compress(base, tuned, f, conv=args.conv)  # one SVD pass per f, every router's bundle
            for r in routers:
                spec = None
                if r != "gate":
                    variant = "rerun" if r == "rerun" else "shared_prefix"
                    spec = BundleRouterSpec(
                        k=args.router_k, variant=variant, hidden=args.router_hidden, theta0_file="backbone"
                    )
                version = publish(
                    store,
                    "lowrank",
                    arch,
                    size,
                    base,
                    tuned,
                    heads,
                    f,
                    gate,
                    args.conv,
                    args.gate_size,
                    spec,
                    head,
                    deltas,
                )
                label = "" if r == "gate" else f" + backbone router k={args.router_k} {spec.variant}"  # type: ignore[union-attr]
                engines[f"TSV-C f={f:g}{conv}{label}"] = Engine(store.load(version), device)
        if not args.no_emr:
            emr = store.load(
                publish(store, "emr", arch, size, base, tuned, heads, None, gate, gate_size=args.gate_size)
            )
            engines["EMR (every task cached)"] = Engine(emr, device, cache_bytes=(args.tasks + 1) * one_model)
            engines["EMR (default 512 MiB cache)"] = Engine(emr, device, cache_bytes=DEFAULT_CACHE_BYTES)
        del tuned
        plain = build_model(Architecture.model_validate(arch), 10).to(device).eval()
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
