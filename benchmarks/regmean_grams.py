"""RegMean with per-task mean Grams (``X^T X / rows``) vs the sums it used before, on the tiny zoo.

Both merges use the same collected Grams (the sums are the means times their row
counts, rows = tokens x images), so the only difference is the weighting of the tasks.

    .venv/bin/python benchmarks/regmean_grams.py
"""

from __future__ import annotations

from pathlib import Path

from merging.methods.regmean import collect_grams, regmean
from merging.pipeline import merge_context
from model_store.architecture import load_into
from model_store.data.attach import test_set
from model_store.zoo_build.presets import build_zoo
from model_store.zoo_build.training import accuracy

REPO = Path(__file__).resolve().parent.parent


def main() -> None:
    zoo = build_zoo("tiny", REPO / "store" / "zoos" / "tiny").zoo
    tasks = zoo.tasks
    ctx = merge_context(zoo, tasks)
    assert ctx.calibration is not None and ctx.build_model is not None
    finetuned = [zoo.backbone(t) for t in tasks]
    grams, rows = [], []
    for i in range(len(tasks)):
        x = ctx.calibration(i, None, 256)
        model = ctx.build_model(i, finetuned[i])
        tokens = model.patch_embed.num_patches + model.num_prefix_tokens
        grams.append(collect_grams(model, x))
        rows.append(len(x) * tokens)
    sums = [{k: g * rows[i] for k, g in grams[i].items()} for i in range(len(tasks))]
    print("| RegMean Grams | " + " | ".join(tasks) + " | avg |\n|---" * 1 + "|---" * (len(tasks) + 1) + "|")
    for name, gs in (("sums (before)", sums), ("per-task means (now)", grams)):
        merged = regmean(zoo.backbone(zoo.base), finetuned, gs, 0.9)
        accs = []
        for t in tasks:
            images = test_set(zoo, t)
            assert images is not None
            model = load_into(zoo.build_model(t), merged, zoo.head(t)).eval()
            accs.append(accuracy(model, images.tensors(zoo.metas[t].preprocessing), images.label_tensor()))
        print(f"| {name} | " + " | ".join(f"{100 * a:.1f}" for a in accs) + f" | {100 * sum(accs) / len(accs):.1f} |")
    print("calibration images:", {t: r // tokens for t, r in zip(tasks, rows)})


if __name__ == "__main__":
    main()
