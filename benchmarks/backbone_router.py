"""Routing accuracy of the backbone router (SPEC section 8) vs the CNN gate, on a zoo's full test split.

``theta_0`` (the zoo's base) runs ONCE over every task's calibration images (the first ``--images`` per
task, the base's preprocessing) and once over the test images, keeping ``z(x)`` after each block in
``--ks`` (:func:`model_store.backbone_router.pooled_features`); a head per ``(k, hidden)`` is trained on
the calibration features exactly as a merge trains it (:func:`merging.gating.backbone_router.train_head`,
the merge's defaults) and scored on every test image: the share routed to its own task. ``--gate-size``
also trains the merge's default CNN gate (EfficientNet-Lite0, ImageNet init) at that size on the same
calibration images, for a same-run comparison.

    .venv/bin/python benchmarks/backbone_router.py --zoo dinov2-s14 [--ks 1,2,3] [--hidden 0,256]
        [--images 1000] [--gate-size 96] [--store DIR] [--merge-f 0.045 --merge-k 3 --merge-hidden 256]

``--merge-f`` also merges ``tsv_routed`` (rank fraction f, patch conv compressed) with the backbone router at
``--merge-k`` / ``--merge-hidden`` in both variants (``rerun``, ``shared_prefix``) into a temporary store and
serves every test image through the Engine, task given and routed on shuffled mixed batches, normalised by
the individual models on the same images (what ``shared_prefix`` costs in accuracy).

Writes benchmarks/results/backbone_router-<zoo>[-served].{json,md} (``-served`` with ``--merge-f``).

Feeds BENCHMARKS.md, section "Backbone router (issue 36)".
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import cast

import torch
from timm.models.vision_transformer import VisionTransformer

from merging.gating.backbone_router import HeadConfig, base_features, train_head
from merging.gating.router import GATE_MEAN_STD, GateConfig, gate_probabilities, train_gate
from merging.pipeline import gate_init, merge_context
from model_store.backbone_router import pooled_features
from model_store.data.attach import require_test_set
from model_store.schema import Preprocessing
from model_store.settings import StoreLayout
from model_store.zoo import Zoo

RESULTS = Path(__file__).resolve().parent / "results"


def _shares(pred: list[torch.Tensor]) -> tuple[dict[int, float], float]:
    """Per task the share of its test images routed to it, and the share over all test images."""
    per = {i: float((p == i).float().mean()) for i, p in enumerate(pred)}
    total = sum(int((p == i).sum()) for i, p in enumerate(pred)) / sum(len(p) for p in pred)
    return per, total


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--zoo", default="dinov2-s14")
    ap.add_argument("--store", default="store", help="store root holding zoos/<zoo>")
    ap.add_argument("--ks", default="1,2,3")
    ap.add_argument("--hidden", default="0,256")
    ap.add_argument("--images", type=int, default=1000, help="calibration images per task (the merge default)")
    ap.add_argument("--gate-size", type=int, default=0, help="also train the CNN gate at this size (0: not)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--merge-f", type=float, default=0.0, help="also merge and serve tsv_routed at this f (0: not)")
    ap.add_argument("--merge-k", type=int, default=3)
    ap.add_argument("--merge-hidden", type=int, default=256)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    zoo = Zoo.load(StoreLayout(Path(args.store)).zoos / args.zoo)
    ks = [int(k) for k in args.ks.split(",")]
    hiddens = [int(h) for h in args.hidden.split(",")]
    ctx = merge_context(zoo, zoo.tasks)
    t0 = time.perf_counter()
    cal = base_features(ctx, ks, args.images)
    assert ctx.build_model is not None
    vit = cast(VisionTransformer, ctx.build_model(0, ctx.pretrained))
    prep = zoo.metas[zoo.base].preprocessing
    tests = [require_test_set(zoo, t, "routing accuracy") for t in zoo.tasks]
    test = [pooled_features(vit, s.tensors(prep), ks) for s in tests]
    feature_s = time.perf_counter() - t0
    rows = []
    for k in ks:
        for hidden in hiddens:
            t = time.perf_counter()
            trained = train_head([c[k] for c in cal], HeadConfig(hidden=hidden, seed=args.seed))
            pred = [trained.head(f[k]).argmax(1) for f in test]
            per, total = _shares(pred)
            rows.append(
                {
                    "router": f"backbone k={k}, {'linear' if hidden == 0 else f'hidden {hidden}'}",
                    "params": sum(p.numel() for p in trained.head.parameters()),
                    "holdout": trained.holdout_accuracy,
                    "epochs": trained.epochs_run,
                    "train_s": time.perf_counter() - t,
                    "per_task": {zoo.tasks[i]: v for i, v in per.items()},
                    "test": total,
                }
            )
            print(rows[-1], flush=True)
    if args.gate_size:
        t = time.perf_counter()
        gp = Preprocessing(size=args.gate_size, channels=3, mean=GATE_MEAN_STD, std=GATE_MEAN_STD)
        assert ctx.calibration is not None
        images = [ctx.calibration(i, gp, args.images) for i in range(len(zoo.tasks))]
        cfg = GateConfig(arch="efficientnet_lite0", epochs=10, lr=2e-3, seed=args.seed)  # the merge's defaults
        gate = train_gate(images, cfg, gate_init("efficientnet_lite0"), progress=False)
        pred = [gate_probabilities(gate.model, s.tensors(gp)).argmax(1) for s in tests]
        per, total = _shares(pred)
        rows.append(
            {
                "router": f"CNN gate efficientnet_lite0 {args.gate_size} px",
                "params": sum(p.numel() for p in gate.model.parameters()),
                "holdout": gate.holdout_accuracy,
                "epochs": gate.epochs_run,
                "train_s": time.perf_counter() - t,
                "per_task": {zoo.tasks[i]: v for i, v in per.items()},
                "test": total,
            }
        )
    served = served_accuracy(zoo, args) if args.merge_f else []
    res = {
        "served": served,
        "command": " ".join(["python", *sys.argv]),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "zoo": args.zoo,
        "tasks": zoo.tasks,
        "calibration_images": [len(c[ks[0]]) for c in cal],
        "test_images": [len(f[ks[0]]) for f in test],
        "feature_s": feature_s,
        "rows": rows,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = RESULTS / f"backbone_router-{args.zoo}{'-served' if args.merge_f else ''}"
    stem.with_suffix(".json").write_text(json.dumps(res, indent=1))
    md = render(res)
    stem.with_suffix(".md").write_text(md)
    print(md)
    return 0


def _normalised(acc: dict, ref: dict) -> float:
    """Mean over tasks of accuracy / the individual model's accuracy."""
    pairs = [t for t in ref if ref[t] and acc.get(t) is not None]
    return sum(acc[t] / ref[t] for t in pairs) / len(pairs)


def served_accuracy(zoo: Zoo, args: argparse.Namespace) -> list[dict]:
    """``tsv_routed`` with the backbone router, both variants, served on every test image (task given and
    routed), normalised by the individual models."""
    import tempfile

    from merging.pipeline import merge_and_publish
    from model_store.bundle import BundleStore
    from server.eval.taskpool import TaskPool
    from server.runtime.engine import Engine

    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        store = BundleStore(StoreLayout(Path(tmp)), keep=4)
        ref: dict | None = None
        for variant in ("rerun", "shared_prefix"):
            params = {
                "f": args.merge_f,
                "conv": True,
                "router": "backbone",
                "router_k": args.merge_k,
                "router_hidden": args.merge_hidden,
                "router_variant": variant,
                "gate_max_images": args.images,
                "gate_test_images": 0,
                "gate_seed": args.seed,
            }
            outcome = merge_and_publish(zoo, store, "tsv_routed", params, progress=False)
            engine = Engine(store.load(outcome.version), "cpu")
            pool = TaskPool.of_bundle(engine.models)
            if ref is None:
                ref = pool.reference_accuracy(pool.reference(zoo))
            given = pool.given_accuracy(pool.given(engine))
            routed = pool.routed_accuracy(pool.routed(engine, 64, args.seed))
            rows.append(
                {
                    "bundle": f"tsv_routed f={args.merge_f:g} conv, backbone k={args.merge_k} "
                    f"hidden {args.merge_hidden} {variant}",
                    "given": _normalised(given, ref),
                    "routed": _normalised({t: r["routed"] for t, r in routed.items() if r is not None}, ref),
                    "routing": {t: r["gate"] for t, r in routed.items() if r is not None},
                    "merge_s": outcome.merge_seconds,
                }
            )
            print(rows[-1], flush=True)
    return rows


def render(res: dict) -> str:
    tasks = res["tasks"]
    lines = [
        f"Command: `{res['command']}`; {res['machine']}; zoo {res['zoo']}; calibration images per task "
        f"{res['calibration_images']}, test images {res['test_images']} (all); theta_0 features of all "
        f"images in {res['feature_s']:.0f} s.",
        "",
        "| router | head params | held-out (calibration) | epochs | train s | "
        + " | ".join(tasks)
        + " | test routing accuracy |",
        "|---" * (6 + len(tasks)) + "|",
    ]
    for r in res["rows"]:
        cells = " | ".join(f"{100 * r['per_task'][t]:.2f}" for t in tasks)
        lines.append(
            f"| {r['router']} | {r['params']:,} | {100 * r['holdout']:.2f} | {r['epochs']} | {r['train_s']:.1f} | "
            f"{cells} | **{100 * r['test']:.2f}** |"
        )
    if res.get("served"):
        lines += [
            "",
            "Served through the Engine on every test image (normalised accuracy: mean over tasks of accuracy / the "
            "individual model's on the same images; routed on shuffled mixed batches of 64):",
            "",
            "| bundle | task given (norm.) | routed (norm.) | routing accuracy (mean over tasks) | merge s |",
            "|---|---|---|---|---|",
        ]
        for r in res["served"]:
            routing = sum(r["routing"].values()) / len(r["routing"])
            lines.append(
                f"| {r['bundle']} | {100 * r['given']:.2f} | **{100 * r['routed']:.2f}** | {100 * routing:.2f} "
                f"| {r['merge_s']:.0f} |"
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
