"""Merging differently-initialised tiny ViTs (issue 8), like FS-Merge Tables 3-4.

The `tiny-diffinit` zoo: four tiny ViTs, each pretrained on fashion from its own
seed (init + data order), then fine-tuned on mnist / animals / solar / digits.
For pairs and for the group of four: per-task accuracy (task given, own head) and
joint accuracy (arg-max over all heads' concatenated logits; mean over tasks) on
the full TEST splits, parameters optimised and merge time, for

* Original models and the output ensemble (references, not merges);
* AvgMean, RegMean (no shared base needed, expected ~ chance);
* MuDSC Align / Zip (training-free; 64 calibration images per task);
* Distillation and FS-Merge (FS-Merge seq. for the group of four): the SAME few
  unlabeled calibration images per task + augmentations, same epochs and batch.

No gate is trained here (joint accuracy is the routing-free measure).

    .venv/bin/python benchmarks/diffinit.py [--images 16 --augment 25 --epochs 10 --seed 0]

Writes benchmarks/results/diffinit.{md,json,png}.

Feeds BENCHMARKS.md, section "Differently-initialised models (issue 8)".
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import torch
from tqdm.auto import tqdm

from merging.pipeline import merge_and_publish
from model_store.bundle import BundleStore
from model_store.memory import limit_heap_fragmentation
from model_store.settings import StoreLayout
from model_store.zoo import Zoo
from model_store.zoo_build.presets import build_zoo
from server.eval.joint import evaluate_ensemble, evaluate_joint, summary
from server.eval.taskpool import TaskPool
from server.runtime.engine import Engine

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parent.parent
PAIRS = [("mnist", "animals"), ("animals", "solar"), ("solar", "digits")]
FOUR = ("mnist", "animals", "solar", "digits")
ORDER = ["original", "ensemble", "avg", "regmean", "mudsc_align", "mudsc_zip", "distill", "fs_merge", "fs_merge_seq"]


def methods(group: tuple[str, ...], args: argparse.Namespace) -> dict[str, tuple[str, dict]]:
    """Method label -> (registry name, params) for a group."""
    trained = {"gate": False, "images": args.images, "augment": args.augment, "epochs": args.epochs, "seed": args.seed}
    rank = args.rank if len(group) == 2 else 2 * args.rank
    out = {
        "avg": ("avg", {}),
        "regmean": ("regmean", {"max_images": 256}),
        "mudsc_align": ("mudsc_align", {"gate": False, "max_images": 64, "seed": args.seed}),
        "mudsc_zip": ("mudsc_zip", {"gate": False, "max_images": 64, "seed": args.seed}),
        "distill": ("distill", {**trained, "lr": args.distill_lr}),
        "fs_merge": ("fs_merge", {**trained, "rank": rank, "lr": args.fs_lr}),
    }
    if len(group) > 2:
        out["fs_merge_seq"] = ("fs_merge_seq", {**trained, "rank": args.rank, "lr": args.fs_lr})
    return out


def run_group(zoo: Zoo, group: tuple[str, ...], args: argparse.Namespace, pool: TaskPool, store: BundleStore) -> dict:
    """Every method on one group, each merge published as a bundle and scored through the Engine: scores per
    task, means, parameters, seconds."""
    sub = pool.subset(group)
    rows: dict[str, dict] = {}
    rows["original"] = {"per_task": {t: zoo.metas[t].provenance.test_accuracy for t in group}}
    rows["original"]["mean"] = {"per_task": sum(rows["original"]["per_task"].values()) / len(group)}
    ens = evaluate_ensemble(zoo, sub)
    rows["ensemble"] = {"scores": ens, "mean": summary(ens), "optimised_parameters": 0, "seconds": 0.0}
    for label, (name, params) in tqdm(methods(group, args).items(), desc="+".join(group), leave=False):
        torch.manual_seed(args.seed)
        outcome = merge_and_publish(zoo, store, name, params, list(group), progress=False)
        seconds = outcome.merge_seconds
        scores = evaluate_joint(Engine(store.load(outcome.version), "cpu"), sub)
        info = outcome.result.info.model_dump(exclude_none=True)
        rows[label] = {
            "scores": scores,
            "mean": summary(scores),
            "optimised_parameters": info.get("optimised_parameters", 0),
            "seconds": round(seconds, 2),
            "params": params,
            "info": info,
        }
        tqdm.write(
            f"{'+'.join(group)} {label}: per-task {100 * rows[label]['mean']['per_task']:.1f} joint "
            f"{100 * rows[label]['mean']['joint']:.1f} ({seconds:.0f} s)"
        )
    return rows


def fmt_params(n: int) -> str:
    return "0" if not n else (f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.0f}K")


def render(result: dict) -> str:
    """Markdown tables in FS-Merge Table 3/4 style."""
    a = result["args"]
    intro = (
        f"Seed {a['seed']}; {a['images']} original + {a['images'] * a['augment']} augmented images per task; "
        f"{a['epochs']} epochs for distillation and FS-Merge. Accuracy in %, test splits."
    )
    lines = [intro, ""]
    for title, groups in (
        ("Pairs", [g for g in result["groups"] if len(g["tasks"]) == 2]),
        ("Group of four", [g for g in result["groups"] if len(g["tasks"]) == 4]),
    ):
        if not groups:
            continue
        lines.append(f"### {title}")
        lines.append("")
        head = (
            "| method | "
            + " | ".join(f"{'+'.join(g['tasks'])} per-task | joint" for g in groups)
            + " | #params optimised | merge time |"
        )
        lines += [head, "|---" * (2 * len(groups) + 3) + "|"]
        for label in ORDER:
            if label not in groups[0]["rows"]:
                continue
            cells = []
            for g in groups:
                row = g["rows"][label]
                joint = row["mean"].get("joint")
                cells.append(
                    f"{100 * row['mean']['per_task']:.1f} | " + ("-" if joint is None else f"{100 * joint:.1f}")
                )
            rows = [g["rows"][label] for g in groups]
            n_params = max(r.get("optimised_parameters", 0) or 0 for r in rows)
            secs = sum(r.get("seconds", 0.0) for r in rows) / len(rows)
            extra = "- | -" if label in ("original", "ensemble") else f"{fmt_params(n_params)} | {secs:.1f} s"
            lines.append(f"| {label} | " + " | ".join(cells) + f" | {extra} |")
        lines.append("")
        lines.append("Per task (per-task accuracy):")
        lines.append("")
        for g in groups:
            tasks = g["tasks"]
            lines.append("| method | " + " | ".join(tasks) + " |")
            lines.append("|---" * (len(tasks) + 1) + "|")
            for label in ORDER:
                if label in g["rows"]:
                    row = g["rows"][label]
                    vals = row["per_task"] if label == "original" else {t: row["scores"][t]["per_task"] for t in tasks}
                    lines.append(f"| {label} | " + " | ".join(f"{100 * vals[t]:.1f}" for t in tasks) + " |")
            lines.append("")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [m for m in ORDER if m != "original"]
    sizes = sorted({len(g["tasks"]) for g in result["groups"]})
    fig, axes = plt.subplots(1, len(sizes), figsize=(5.5 * len(sizes), 4), sharey=True, squeeze=False)
    for ax, size in zip(axes[0], sizes):
        groups = [g for g in result["groups"] if len(g["tasks"]) == size]
        title = f"pairs (mean of {len(groups)})" if size == 2 else f"groups of {size} (mean of {len(groups)})"
        present = [m for m in labels if m in groups[0]["rows"]]
        per = [100 * sum(g["rows"][m]["mean"]["per_task"] for g in groups) / len(groups) for m in present]
        joint = [100 * sum(g["rows"][m]["mean"]["joint"] for g in groups) / len(groups) for m in present]
        orig = 100 * sum(g["rows"]["original"]["mean"]["per_task"] for g in groups) / len(groups)
        x = range(len(present))
        ax.bar([i - 0.2 for i in x], per, 0.4, label="per-task")
        ax.bar([i + 0.2 for i in x], joint, 0.4, label="joint")
        ax.axhline(orig, color="k", ls="--", lw=1, label="original models")
        ax.set_xticks(list(x), present, rotation=35, ha="right")
        ax.set_title(title)
        ax.set_ylabel("test accuracy (%)")
    axes[0][0].legend()
    fig.suptitle("Merging differently-initialised tiny ViTs (tiny-diffinit)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--images", type=int, default=16, help="original calibration images per task (FS-Merge / distillation)"
    )
    parser.add_argument("--augment", type=int, default=25, help="augmented copies per original image")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument(
        "--rank", type=int, default=8, help="FS-Merge low rank for pairs and seq. (x2 for fs_merge on four)"
    )
    parser.add_argument("--fs-lr", type=float, default=1e-3)
    parser.add_argument("--distill-lr", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--groups",
        default=",".join("+".join(g) for g in [*PAIRS, FOUR]),
        help="comma-separated task groups, tasks joined by +",
    )
    parser.add_argument(
        "--zoo", default=None, help="zoo directory (default: build/reuse the tiny-diffinit preset in ./store)"
    )
    parser.add_argument(
        "--render-only", action="store_true", help="re-render results/diffinit.md from results/diffinit.json"
    )
    args = parser.parse_args()
    RESULTS.mkdir(exist_ok=True)
    if args.render_only:
        result = json.loads((RESULTS / "diffinit.json").read_text())
        (RESULTS / "diffinit.md").write_text(render(result))
        plot(result, RESULTS / "diffinit.png")
        return
    limit_heap_fragmentation()
    zoo = Zoo.load(args.zoo) if args.zoo else build_zoo("tiny-diffinit", REPO / "store" / "zoos" / "tiny-diffinit").zoo
    groups = [tuple(g.split("+")) for g in args.groups.split(",")]
    pool = TaskPool.of_zoo(zoo, sorted({t for g in groups for t in g}), purpose="the diffinit benchmark")
    root = Path(tempfile.mkdtemp(prefix="vitmerge-diffinit-"))  # the merges' bundles, deleted at the end
    store = BundleStore(StoreLayout(root), keep=1_000)
    result: dict = {
        "args": vars(args),
        "zoo_config_hash": zoo.manifest.config_hash,
        "init_seeds": {t: zoo.metas[t].provenance.init_seed for t in zoo.tasks},
        "torch_threads": torch.get_num_threads(),
        "groups": [],
    }
    try:
        for group in groups:
            result["groups"].append({"tasks": list(group), "rows": run_group(zoo, group, args, pool, store)})
            (RESULTS / "diffinit.json").write_text(json.dumps(result, indent=2))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    (RESULTS / "diffinit.md").write_text(render(result))
    plot(result, RESULTS / "diffinit.png")
    print(render(result))


if __name__ == "__main__":
    main()
