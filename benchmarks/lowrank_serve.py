"""One-pass low-rank serving (TSV-C bundles) vs a plain single ViT and routed EMR, on shuffled mixed batches.

A synthetic zoo at real size (random theta_0, N task models = theta_0 + random deltas; speed and memory
only, not accuracy) is merged with TSV-C at several rank fractions and with EMR; every configuration
runs the SAME shuffled mixed-task batches through the serving ``Engine``, in interleaved rounds (each
round times every configuration once, starting with a different one each round; best round kept), so
the ratios come from one run on one machine.

    .venv/bin/python benchmarks/lowrank_serve.py [--arch vit_s14|vit_b16] [--tasks 5] [--batch 32]
        [--fractions 0.05,0.1,0.2] [--rounds 3] [--batches 4] [--device cpu]

Writes benchmarks/results/lowrank_serve-<arch>.{md,json,png}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from merging.methods.emr import emr_merge
from merging.methods.tsv import tsv_compress
from merging.pipeline import write_lowrank
from model_store.architecture import build_gate, build_model, gate_state
from model_store.bundle import BundleStore
from model_store.schema import BundleSpec, BundleTask, EMRSpec, GateSpec
from model_store.settings import StoreLayout
from server.runtime.engine import Engine

RESULTS = Path(__file__).resolve().parent / "results"
ARCHS = {
    # the dinov2-s14 zoo's backbone at its 56 px input (BENCHMARKS.md): 21.5 M parameters, 17 tokens
    "vit_s14": ({"timm_name": "vit_small_patch14_dinov2", "kwargs": {"img_size": 56}}, 56),
    # ViT-B/16 at 224 px: 86 M parameters, 197 tokens
    "vit_b16": ({"timm_name": "vit_base_patch16_224", "kwargs": {}}, 224),
}
GATE_SIZE = 64


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


def _spec(kind: str, arch: dict, size: int, tasks: list[str], **fields) -> dict:
    rgb = {"size": size, "channels": 3, "mean": [0.5] * 3, "std": [0.5] * 3}
    gate = GateSpec(arch="efficientnet_lite0", preprocessing={**rgb, "size": GATE_SIZE})  # type: ignore[arg-type]
    return BundleSpec.model_validate(
        {
            "kind": kind,
            "architecture": arch,
            "preprocessing": rgb,
            "tasks": [BundleTask(name=t, class_names=[str(c) for c in range(10)]) for t in tasks],
            "gate": gate,
            **fields,
        }
    ).model_dump(mode="json")


def publish(store: BundleStore, kind: str, arch: dict, size: int, base, tuned, heads, f: float | None) -> str:
    """A lowrank (TSV-C at ``f``) or EMR bundle with a gate, published into ``store``."""
    tasks = [f"task{i}" for i in range(len(tuned))]
    draft = store.draft()
    draft.add_tensors("heads", {f"{t}/{k}": v for t, h in zip(tasks, heads) for k, v in h.items()})
    draft.add_tensors("gate", gate_state(build_gate("efficientnet_lite0", len(tasks))))
    if kind == "lowrank":
        assert f is not None
        deltas = tsv_compress(base, tuned, f)
        spec = _spec("lowrank", arch, size, tasks, lowrank=write_lowrank(draft, deltas))
    else:
        merged = emr_merge(base, tuned)
        draft.add_tensors("base", base)
        draft.add_tensors("tau_unified", merged.tau_unified)
        masks = {f"{t}/{k}": v for t, packed in zip(tasks, merged.packed_masks) for k, v in packed.items()}
        draft.add_tensors("masks", masks)
        spec = _spec("emr", arch, size, tasks, emr=EMRSpec(rescalers=dict(zip(tasks, merged.rescalers))))
    draft.add_json("model", spec)
    return store.publish(draft, f"synthetic-{kind}", tasks=tasks, extra={"synthetic": True, "f": f})


def mixed_batches(n_tasks: int, size: int, batch: int, count: int, seed: int) -> list[dict]:
    """Shuffled mixed-task batches: images, their gate input and each image's task."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        out.append(
            {
                "x": torch.randn(batch, 3, size, size, generator=g),
                "g": torch.randn(batch, 3, GATE_SIZE, GATE_SIZE, generator=g),
                "t": torch.randint(0, n_tasks, (batch,), generator=g).tolist(),
            }
        )
    return out


def timed(fn, batches: list[dict]) -> float:
    t = time.perf_counter()
    for b in batches:
        fn(b)
    return time.perf_counter() - t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", choices=sorted(ARCHS), default="vit_s14")
    ap.add_argument("--tasks", type=int, default=5)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--fractions", default="0.05,0.1,0.2")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    arch, size = ARCHS[args.arch]
    fractions = [float(f) for f in args.fractions.split(",") if f]
    device = torch.device(args.device)
    base, tuned, heads = synthetic_zoo(arch, args.tasks, args.seed)
    one_model = sum(v.numel() * 4 for v in base.values()) + heads[0]["head.weight"].numel() * 4
    with tempfile.TemporaryDirectory() as tmp:
        store = BundleStore(StoreLayout(Path(tmp)), keep=20)
        engines: dict[str, Engine] = {}
        for f in tqdm(fractions, desc="merge TSV-C bundles", unit="bundle"):
            engines[f"TSV-C f={f:g}"] = Engine(
                store.load(publish(store, "lowrank", arch, size, base, tuned, heads, f)), device
            )
        emr_version = publish(store, "emr", arch, size, base, tuned, heads, None)
        engines["EMR"] = Engine(store.load(emr_version), device, cache_bytes=(args.tasks + 1) * one_model)
        del tuned
        plain = build_model(engines["EMR"].models.architecture, 10).to(device).eval()
        batches = mixed_batches(args.tasks, size, args.batch, args.batches, args.seed)
        configs = {"plain ViT (one model, no routing)": lambda b: plain(b["x"].to(device))}
        for name, e in engines.items():
            configs[f"{name}, task given"] = lambda b, e=e: e.predict(b["x"], b["t"])
            configs[f"{name}, routed by the gate"] = lambda b, e=e: e.predict(b["x"], [None] * len(b["t"]), b["g"])
        best = dict.fromkeys(configs, float("inf"))
        with torch.inference_mode():
            for fn in configs.values():  # warm-up: caches filled, graphs captured
                fn(batches[0])
            names = list(configs)
            for i in tqdm(range(args.rounds), desc=f"interleaved rounds ({args.arch})", unit="round"):
                for name in names[i % len(names) :] + names[: i % len(names)]:  # a different one first each round
                    best[name] = min(best[name], timed(configs[name], batches))
        images = args.batch * len(batches)
        plain_rate = images / best["plain ViT (one model, no routing)"]
        rows = []
        for name, secs in best.items():
            key = name.split(",")[0]
            resident = sum(engines[key].resident_bytes().values()) if key in engines else one_model
            rows.append(
                {
                    "config": name,
                    "img_s": images / secs,
                    "vs_plain": images / secs / plain_rate,
                    "resident_MB": resident / 2**20,
                }
            )
    res = {
        "command": " ".join(["python", *sys.argv]),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs"
        + (f", {torch.cuda.get_device_name()}" if device.type == "cuda" else ""),
        "device": str(device),
        "arch": args.arch,
        "tasks": args.tasks,
        "batch": args.batch,
        "one_model_MB": one_model / 2**20,
        "n_models_MB": args.tasks * one_model / 2**20,
        "rows": rows,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = RESULTS / f"lowrank_serve-{args.arch}"
    stem.with_suffix(".json").write_text(json.dumps(res, indent=1))
    md = render(res)
    stem.with_suffix(".md").write_text(md)
    plot(res, stem.with_suffix(".png"))
    print(md)
    return 0


def render(res: dict) -> str:
    lines = [
        f"Command: `{res['command']}`; {res['machine']}; device {res['device']}; {res['arch']}, N = {res['tasks']} "
        f"tasks, shuffled mixed batches of {res['batch']}. One model {res['one_model_MB']:.1f} MB, "
        f"N separate models {res['n_models_MB']:.1f} MB.",
        "",
        "| configuration | img/s | vs plain ViT | resident MB |",
        "|---|---|---|---|",
    ]
    for r in res["rows"]:
        lines.append(f"| {r['config']} | {r['img_s']:.0f} | {r['vs_plain']:.2f}× | {r['resident_MB']:.1f} |")
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
