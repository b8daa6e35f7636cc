"""Gated whole-ViT merging on the tiny zoo: accuracy vs m, gates, strategies, cost.

For base in {avg, regmean} x m in {0..depth} x gate in {efficientnet_lite0
(ImageNet init), mobilenetv2_100 (scratch)}: routed accuracy (task NOT given; mixed-
task test batches; exact per-image routing) and task-given accuracy (one-hot p).
Also: routed EMR, stored parameters and FLOPs per image (Ye et al. Table 3 style,
gate included), and throughput of exact (mix / experts) and sparse routing vs a
plain single ViT on the same mixed-task batches of 32 (ratios from one run).

    .venv/bin/python benchmarks/gating.py [--gate-epochs 10]

Writes benchmarks/results/gating.{md,json} and gating_vs_m.png.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode
from tqdm.auto import tqdm

from merging import collect_grams, emr_merge, regmean, weight_average
from merging.gating.plan import expert_stacks, gating_plan
from merging.gating.router import GateParams, gate_probabilities, train_gate_for
from merging.pipeline import merge_context
from model_store.architecture import build_gate
from model_store.data.builtin import load_split
from model_store.data.preprocessing import to_model_input
from model_store.memory import limit_heap_fragmentation
from model_store.zoo_build.presets import build_zoo
from server.runtime.gated_vit import GatedViT

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parent.parent


def flops(fn, *args) -> float:
    """FLOPs of one call (torch's counter: 2 per multiply-add)."""
    with FlopCounterMode(display=False) as counter:
        fn(*args)
    return float(counter.get_total_flops())


def plain_features(model):
    """``fn(x, p)`` -> pre-logit features of a plain timm ViT (``p`` ignored), the throughput reference."""

    @torch.inference_mode()
    def run(xb: torch.Tensor, _pb: torch.Tensor) -> torch.Tensor:
        return model.forward_head(model.forward_features(xb), pre_logits=True)

    return run


def throughput(fns: dict, batches: list, rounds: int = 7) -> dict[str, dict[str, float]]:
    """Images per second of every ``fns[name]`` over ``batches``, interleaved.

    Each round times one pass of every function back to back, so a slow phase of this
    shared machine hits all of them alike; ratios to the first function are taken per
    round. Returns per name: best img/s, and the median / min / max per-round ratio.
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


def rerender() -> None:
    """Re-write gating.md from gating.json (no recomputation)."""
    result = json.loads((RESULTS / "gating.json").read_text())
    (RESULTS / "gating.md").write_text(render(result))
    print(render(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gate-epochs", type=int, default=10)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=7, help="interleaved throughput rounds (median ratio reported)")
    parser.add_argument(
        "--render-only", action="store_true", help="re-render results/gating.md from results/gating.json"
    )
    parser.add_argument(
        "--throughput-zoo",
        metavar="PRESET",
        help="only time plain vs exact vs sparse on this (built) zoo, e.g. dinov2-s14",
    )
    args = parser.parse_args()
    if args.render_only:
        rerender()
        return
    if args.throughput_zoo:
        real_size_throughput(args.throughput_zoo, args.batch, args.rounds)
        return
    limit_heap_fragmentation()
    torch.manual_seed(0)
    RESULTS.mkdir(exist_ok=True)
    zoo = build_zoo("tiny", REPO / "store" / "zoos" / "tiny").zoo
    tasks = zoo.tasks
    n = len(tasks)
    arch = zoo.metas[zoo.base].architecture
    prep = zoo.metas[zoo.base].preprocessing
    depth = arch.kwargs["depth"]
    base = zoo.backbone(zoo.base)
    finetuned = [zoo.backbone(t) for t in tasks]
    heads = [zoo.head(t) for t in tasks]
    ctx = merge_context(zoo, tasks)

    # test pool: all tasks, shuffled into mixed batches
    xs, raw, tids, ys = [], [], [], []
    for i, t in enumerate(tasks):
        d = load_split(t, "test")
        xs.append(to_model_input(d.images, prep))
        raw.append(d.images)
        tids.append(torch.full((len(d.labels),), i))
        ys.append(torch.as_tensor(d.labels))
    order = torch.randperm(sum(len(x) for x in xs), generator=torch.Generator().manual_seed(0))
    x, tid, y = torch.cat(xs)[order], torch.cat(tids)[order], torch.cat(ys)[order]

    # gates
    gates, probs, gate_rows = {}, {}, []
    for gate_arch in ("efficientnet_lite0", "mobilenetv2_100"):
        t0 = time.perf_counter()
        art = train_gate_for(ctx, GateParams(gate_arch=gate_arch, gate_epochs=args.gate_epochs))
        secs = time.perf_counter() - t0
        model = build_gate(gate_arch, n)
        model.load_state_dict(art.state)
        g = torch.cat([to_model_input(r, art.preprocessing) for r in raw])[order]
        p = gate_probabilities(model, g)
        gates[gate_arch], probs[gate_arch] = (model, g), p
        per_task = {t: float((p[tid == i].argmax(1) == i).float().mean()) for i, t in enumerate(tasks)}
        gate_rows.append(
            {
                "arch": gate_arch,
                "init": "ImageNet" if gate_arch == "efficientnet_lite0" else "scratch",
                "train_s": secs,
                "params_M": sum(v.numel() for v in model.parameters()) / 1e6,
                "gflops": flops(model, g[:1]) / 1e9,
                "test_accuracy": per_task,
            }
        )

    def routed_acc(features_fn, p: torch.Tensor) -> dict[str, float]:
        chosen = p.argmax(1)
        correct = torch.zeros(len(x), dtype=torch.bool)
        for s in range(0, len(x), 256):
            sl = slice(s, s + 256)
            feats = features_fn(x[sl], p[sl])
            for t in chosen[sl].unique().tolist():
                idx = (chosen[sl] == t).nonzero().flatten()
                pred = torch.nn.functional.linear(feats[idx], heads[t]["head.weight"], heads[t]["head.bias"]).argmax(1)
                correct[s + idx] = (chosen[s + idx] == tid[s + idx]) & (pred == y[s + idx])
        return {t: float(correct[tid == i].float().mean()) for i, t in enumerate(tasks)}

    one_hot = torch.nn.functional.one_hot(tid, n).float()
    grams = [collect_grams(ctx.build_model(i, finetuned[i]), ctx.calibration(i, None, 256)) for i in range(n)]
    statics = {"avg": weight_average(finetuned), "regmean": regmean(base, finetuned, grams, 0.9)}
    head_params = sum(v.numel() for h in heads for v in h.values())
    backbone_params = sum(v.numel() for v in base.values())
    plain = zoo.build_model(tasks[0])
    vit_gflops = flops(plain, x[:1]) / 1e9

    rows = []
    configs = [(b, m) for b in statics for m in range(depth + 1)]
    for b, m in tqdm(configs, desc="gating configs"):
        plan = gating_plan(finetuned, m)
        experts = expert_stacks(finetuned, plan.gated_keys)
        static = {k: v for k, v in statics[b].items() if k not in experts}
        gated = GatedViT(arch, static, experts, heads)
        gated_params = sum(v[0].numel() for v in experts.values())
        row = {
            "base": b,
            "m": m,
            "given": routed_acc(gated.features, one_hot),
            "stored_M": (backbone_params - gated_params + n * gated_params + head_params) / 1e6,
            "mix_gflops": 2 * n * gated_params / 1e9,
        }
        for gate_arch, p in probs.items():
            row[f"routed_{gate_arch}"] = routed_acc(gated.features, p)
        rows.append(row)

    # routed EMR
    emr = emr_merge(base, finetuned)
    emr_models = []
    for i, t in enumerate(tasks):
        mdl = zoo.build_model(t)
        mdl.load_state_dict({**emr.task_state(i), **heads[i]})
        emr_models.append(mdl)

    @torch.inference_mode()
    def emr_features(xb: torch.Tensor, pb: torch.Tensor) -> torch.Tensor:
        out = torch.empty(len(xb), plain.num_features)
        ch = pb.argmax(1)
        for t in ch.unique().tolist():
            idx = (ch == t).nonzero().flatten()
            out[idx] = emr_models[t].forward_head(emr_models[t].forward_features(xb[idx]), pre_logits=True)
        return out

    mask_params = n * backbone_params / 32
    emr_row = {
        "given": routed_acc(emr_features, one_hot),
        **{f"routed_{a}": routed_acc(emr_features, p) for a, p in probs.items()},
        "stored_M": (2 * backbone_params + mask_params + head_params) / 1e6,
    }
    individual = {t: zoo.metas[t].provenance.test_accuracy for t in tasks}

    # throughput on mixed batches (m = depth / 2, regmean base), p from the default gate
    m_half = depth // 2
    plan = gating_plan(finetuned, m_half)
    experts = expert_stacks(finetuned, plan.gated_keys)
    static = {k: v for k, v in statics["regmean"].items() if k not in experts}
    g_mix, g_exp = GatedViT(arch, static, experts, heads, "mix"), GatedViT(arch, static, experts, heads, "experts")
    p = probs["efficientnet_lite0"]
    nb = 40
    batches = [(x[i : i + args.batch], p[i : i + args.batch]) for i in range(0, nb * args.batch, args.batch)]

    plain_fn = plain_features(plain)

    thresholds = (0.01, 0.05, 0.1, 0.2)

    def sparse_fn(thr: float):
        return lambda xb, pb: g_mix.features(xb, pb, "sparse", thr)

    speed = throughput(
        {
            "plain ViT": plain_fn,
            "routed EMR": torch.inference_mode()(emr_features),
            "exact (mix)": lambda xb, pb: g_mix.features(xb, pb, "exact"),
            "exact (experts)": lambda xb, pb: g_exp.features(xb, pb, "exact"),
            **{f"sparse (t={thr})": sparse_fn(thr) for thr in thresholds},
        },
        batches,
        args.rounds,
    )
    sparse_rows = [
        {
            "threshold": thr,
            **speed[f"sparse (t={thr})"],
            "routed": routed_acc(sparse_fn(thr), p),
            "one_expert": float(((p >= thr).sum(1) <= 1).float().mean()),
        }
        for thr in thresholds
    ]
    exact_acc = routed_acc(lambda xb, pb: g_mix.features(xb, pb, "exact"), p)

    result = {
        "tasks": tasks,
        "individual": individual,
        "gates": gate_rows,
        "rows": rows,
        "emr": emr_row,
        "speed": speed,
        "sparse": sparse_rows,
        "exact_acc_m_half": exact_acc,
        "m_half": m_half,
        "vit_gflops": vit_gflops,
        "backbone_M": backbone_params / 1e6,
        "batch": args.batch,
        "rounds": args.rounds,
    }
    (RESULTS / "gating.json").write_text(json.dumps(result, indent=2))
    md = render(result)
    (RESULTS / "gating.md").write_text(md)
    print(md)
    plot(result, RESULTS / "gating_vs_m.png")


def real_size_throughput(preset: str, batch: int, rounds: int, n_batches: int = 8) -> None:
    """Plain ViT vs gated exact / sparse on a real-size zoo (m = depth / 2, AvgMean base).

    Timing does not depend on the merged values, so no gate is trained: ``p`` is the
    one-hot true task -- what sparse routing runs when every image keeps one expert
    (nearly all images with the tiny zoo's trained gate, see its sweep table).
    """
    limit_heap_fragmentation()
    zoo = build_zoo(preset, REPO / "store" / "zoos" / preset).zoo
    tasks, arch = zoo.tasks, zoo.metas[zoo.base].architecture
    prep = zoo.metas[zoo.base].preprocessing
    finetuned = [zoo.backbone(t) for t in tasks]
    plain = zoo.build_model(tasks[0]).eval()
    depth = len(plain.blocks)
    plan = gating_plan(finetuned, depth // 2)
    experts = expert_stacks(finetuned, plan.gated_keys)
    static = {k: v for k, v in weight_average(finetuned).items() if k not in experts}
    gated = GatedViT(arch, static, experts, [zoo.head(t) for t in tasks])
    per_task = -(-batch * n_batches // len(tasks))
    xs = [to_model_input(load_split(t, "test", limit=per_task).images, prep) for t in tasks]
    tid = torch.cat([torch.full((len(x),), i) for i, x in enumerate(xs)])
    order = torch.randperm(len(tid), generator=torch.Generator().manual_seed(0))
    x, p = torch.cat(xs)[order], torch.nn.functional.one_hot(tid[order], len(tasks)).float()
    batches = [(x[i : i + batch], p[i : i + batch]) for i in range(0, n_batches * batch, batch)]

    plain_fn = plain_features(plain)

    speed = throughput(
        {
            "plain ViT": plain_fn,
            "exact (mix)": lambda xb, pb: gated.features(xb, pb, "exact"),
            "sparse (t=0.1)": lambda xb, pb: gated.features(xb, pb, "sparse", 0.1),
        },
        batches,
        rounds,
    )
    params = sum(v.numel() for v in zoo.backbone(zoo.base).values()) / 1e6
    lines = [
        f"### Throughput at real size: {preset} zoo ({params:.1f} M params, depth {depth}, m = {depth // 2}, "
        f"{len(tasks)} tasks)",
        "",
        f"Command: `.venv/bin/python benchmarks/gating.py --throughput-zoo {preset}`; "
        f"mixed-task batches of {batch} ({n_batches} per round), "
        f"{rounds} interleaved rounds, p = one-hot true task.",
        "",
        "| strategy | img/s | vs plain ViT |",
        "|---|---|---|",
    ]
    for name, v in speed.items():
        lines.append(f"| {name} | {v['img_s']:.1f} | {v['ratio']:.2f}x ({v['ratio_min']:.2f}–{v['ratio_max']:.2f}) |")
    md = "\n".join(lines) + "\n"
    (RESULTS / f"gating-throughput-{preset}.md").write_text(md)
    (RESULTS / f"gating-throughput-{preset}.json").write_text(
        json.dumps({"preset": preset, "batch": batch, "rounds": rounds, "speed": speed}, indent=2)
    )
    print(md)


def _avg(d: dict[str, float]) -> float:
    return 100 * sum(d.values()) / len(d)


def render(r: dict) -> str:
    tasks, ind = r["tasks"], r["individual"]
    lines = [
        "### Gates (task-id accuracy on every task's test split)",
        "",
        "| gate | init | params (M) | GFLOPs/img | train (s) | " + " | ".join(tasks) + " | avg |",
        "|---" * (6 + len(tasks)) + "|",
    ]
    for g in r["gates"]:
        acc = g["test_accuracy"]
        lines.append(
            f"| {g['arch']} | {g['init']} | {g['params_M']:.2f} | {g['gflops']:.3f} | {g['train_s']:.0f} | "
            + " | ".join(f"{100 * acc[t]:.1f}" for t in tasks)
            + f" | {_avg(acc):.1f} |"
        )
    lines += [
        "",
        "### Accuracy vs m (avg over tasks, %; routed = task not given, mixed-task batches, exact routing)",
        "",
        f"Individual fine-tuned models: {_avg(ind):.1f}. ViT forward: {r['vit_gflops']:.4f} GFLOPs/img; backbone "
        f"{r['backbone_M']:.2f} M params.",
        "",
        "Stored parameters and FLOPs include the default EfficientNet-Lite0 gate; "
        "FLOPs of gated rows are for exact routing",
        "(ViT forward + gate + per-image weight mixing); EMR counts masks at 1/32 parameter per bit.",
        "",
        "| base | m | task given | routed (EfficientNet-Lite0 gate) | routed (MobileNetV2 gate) | stored params (M) | "
        "GFLOPs/img |",
        "|---|---|---|---|---|---|---|",
    ]
    gate = next(g for g in r["gates"] if g["arch"] == "efficientnet_lite0")
    for row in r["rows"]:
        lines.append(
            f"| {row['base']} | {row['m']} | {_avg(row['given']):.1f} | {_avg(row['routed_efficientnet_lite0']):.1f} | "
            f"{_avg(row['routed_mobilenetv2_100']):.1f} | "
            f"{row['stored_M'] + gate['params_M']:.2f} | {r['vit_gflops'] + gate['gflops'] + row['mix_gflops']:.4f} |"
        )
    e = r["emr"]
    lines.append(
        f"| EMR (routed) | – | {_avg(e['given']):.1f} | {_avg(e['routed_efficientnet_lite0']):.1f} | "
        f"{_avg(e['routed_mobilenetv2_100']):.1f} | "
        f"{e['stored_M'] + gate['params_M']:.2f} | {r['vit_gflops'] + gate['gflops']:.4f} |"
    )
    lines.append(
        f"| individual models (N separate ViTs, task given) | – | {_avg(ind):.1f} | – | – | "
        f"{len(tasks) * r['backbone_M']:.2f} + heads | {r['vit_gflops']:.4f} |"
    )
    lines += [
        "",
        f"### Throughput on mixed-task batches of {r['batch']} (gated: RegMean base, m = {r['m_half']}; gate excluded)",
        "",
        f"{r.get('rounds', 1)} interleaved rounds over the same batches; "
        "img/s = best round, ratio = median of the per-round",
        "ratios to the plain ViT (min–max in brackets). "
        "Process allocator as `vitmerge serve` sets it (1 MiB mmap threshold).",
        "",
        "| strategy | img/s | vs plain ViT |",
        "|---|---|---|",
    ]
    for name, v in r["speed"].items():
        lines.append(f"| {name} | {v['img_s']:.0f} | {v['ratio']:.2f}x ({v['ratio_min']:.2f}–{v['ratio_max']:.2f}) |")
    lines += [
        "",
        "Sparse threshold sweep (same batches): routed accuracy vs exact " + f"{_avg(r['exact_acc_m_half']):.2f}%",
        "",
        "| threshold | images keeping one expert (%) | img/s | vs plain | routed acc (%) |",
        "|---|---|---|---|---|",
    ]
    for s in r["sparse"]:
        one = f"{100 * s['one_expert']:.1f}" if "one_expert" in s else "–"
        lines.append(f"| {s['threshold']} | {one} | {s['img_s']:.0f} | {s['ratio']:.2f}x | {_avg(s['routed']):.2f} |")
    return "\n".join(lines) + "\n"


def plot(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for base, style in (("avg", "-"), ("regmean", "--")):
        rows = [row for row in r["rows"] if row["base"] == base]
        ms = [row["m"] for row in rows]
        ax.plot(
            ms,
            [_avg(row["routed_efficientnet_lite0"]) for row in rows],
            style,
            marker="o",
            label=f"gating+{base}, EffNet-Lite0 gate",
        )
        ax.plot(
            ms,
            [_avg(row["routed_mobilenetv2_100"]) for row in rows],
            style,
            marker="x",
            label=f"gating+{base}, MobileNetV2 gate",
        )
    ax.axhline(_avg(r["individual"]), color="black", lw=1, label="individual models")
    ax.axhline(_avg(r["emr"]["routed_efficientnet_lite0"]), color="green", lw=1, ls=":", label="routed EMR")
    ax.set(
        xlabel="m (gated attention + MLP blocks)",
        ylabel="routed accuracy (%)",
        title="Tiny zoo: accuracy vs m (task not given)",
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
