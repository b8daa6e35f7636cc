"""Routing accuracy of the backbone router (SPEC section 8) vs the CNN gate, on a zoo's full test split.

``theta_0`` (the zoo's base) runs ONCE over every task's calibration images (the first ``--images`` per
task, the base's preprocessing) and once over the test images, keeping ``z(x)`` after each block in
``--ks`` (:func:`model_store.backbone_router.pooled_features`); a head per ``(k, hidden)`` is trained on
the calibration features exactly as a merge trains it (:func:`merging.gating.backbone_router.train_head`,
the merge's defaults) and scored on every test image: the share routed to its own task. ``--gate-size``
also trains the merge's default CNN gate (EfficientNet-Lite0, ImageNet init) at that size on the same
calibration images, for a same-run comparison.

    .venv/bin/python benchmarks/backbone_router.py --zoo dinov2-s14 [--ks 1,2,3] [--hidden 0,256]
        [--images 1000] [--gate-size 96] [--store DIR]

Writes benchmarks/results/backbone_router-<zoo>.{json,md}.
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
    res = {
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
    stem = RESULTS / f"backbone_router-{args.zoo}"
    stem.with_suffix(".json").write_text(json.dumps(res, indent=1))
    md = render(res)
    stem.with_suffix(".md").write_text(md)
    print(md)
    return 0


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
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
