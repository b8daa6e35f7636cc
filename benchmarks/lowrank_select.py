"""Quantized low-rank bundles and settings chosen without labels, measured on a real zoo (issue 36, SPEC section 9).

Runs ``--target-agreement`` selection (:func:`merging.pipeline.select_and_publish`) over a grid of
``f`` x ``bits`` for a routed low-rank method, exactly as ``vitmerge merge --target-agreement`` does: one merge
context, the gate trained once on the FIT part of each task's calibration images, every candidate measured on
the HELD-OUT part (agreement with the task's own model, no labels). Only after a candidate's record is made
does this script measure it further on the TEST split (never used to choose): per-task accuracy with the task
given and routed (mixed-task batches, an image counts only when routed to its task and classified right),
FLOPs per image through the Engine, resident bytes of the engine (factors dequantized at load).

    .venv/bin/python benchmarks/lowrank_select.py --zoo /work/bench/store/zoos/dinov2-s14 --method tsv_routed \\
        --param conv=true --param gate_size=96 --grid f=0.03,0.045,0.06,0.1,0.15 --grid bits=32,8,4 \\
        --target 0.995 --out benchmarks/results/dinov2-select

Writes ``<out>/lowrank_select.{json,md,png}``; the plot puts the grid (routed, normalised) against the rows of
earlier accuracy benchmarks given with ``--reference`` (their ``accuracy-*.json``) and other parts of the grid
given with ``--also`` (``--replot`` only redraws it).
Feeds BENCHMARKS.md, section "Quantized low-rank factors and settings chosen without labels (issue 36)".
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from merging.pipeline import select_and_publish
from merging.selection import CandidateRecord, SelectionError, choose, format_selection
from model_store.bundle import Bundle, BundleStore
from model_store.data.sources import Holdout
from model_store.settings import StoreLayout
from model_store.zoo import Zoo
from server.cli.merge import parse_grid, parse_param
from server.eval.accuracy import evaluate_bundle, evaluate_individual, evaluate_routed
from server.runtime.engine import Engine
from server.runtime.selection import HeldOutAgreement


def candidate_name(params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in params.items())


def _inplace_addmm_flops(self, a, b, *args, out_val=None, **kwargs) -> int:
    """``out.addmm_(a, b)``: 2 m k n (torch's counter has no entry for the in-place op the engine's shared GEMM is)."""
    return 2 * a.shape[0] * a.shape[1] * b.shape[1]


_inplace_addmm_flops._get_raw = True  # type: ignore[attr-defined]


def engine_flops(fn, *args) -> float:
    """FLOPs of one call through the Engine (torch's counter, 2 per multiply-add, in-place ``addmm_`` included)."""
    mapping = {torch.ops.aten.addmm_: _inplace_addmm_flops}
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter, torch.inference_mode():
        fn(*args)
    return float(counter.get_total_flops())


def measure_on_test(bundle: Bundle, zoo: Zoo, limit: int | None, batch: int, individual: dict) -> dict[str, Any]:
    """A candidate's test accuracy (task given and routed), FLOPs per image and resident bytes (``individual``:
    the zoo's own models on the same images, filled on the first call)."""
    engine = Engine(bundle, "cpu")
    if not individual:
        individual.update(evaluate_individual(engine.models, zoo, limit))
    t0 = time.perf_counter()
    given = evaluate_bundle(engine, limit)
    routed = evaluate_routed(engine, limit, batch) if engine.has_gate else None
    n = len(engine.tasks)
    prep = engine.preprocessing
    x = torch.randn(n, prep.channels, prep.size, prep.size)
    row: dict[str, Any] = {
        "test_given": given,
        "test_routed": {t: v["routed"] for t, v in routed.items() if v} if routed else None,
        "gate_routing": {t: v["gate"] for t, v in routed.items() if v} if routed else None,
        "gflops_given": engine_flops(engine.predict, x, list(range(n))) / n / 1e9,
        "resident_bytes": sum(engine.resident_bytes().values()),
    }
    if engine.gate_preprocessing is not None:
        gp = engine.gate_preprocessing
        g = torch.randn(n, gp.channels, gp.size, gp.size)
        row["gflops_routed"] = engine_flops(engine.predict, x, [None] * n, g) / n / 1e9
    row["eval_s"] = round(time.perf_counter() - t0, 1)
    return row


def normalised(accs: dict[str, float | None], individual: dict[str, float | None]) -> float:
    """Mean over tasks of accuracy / the individual model's."""
    pairs = [(accs[t], individual[t]) for t in accs if accs[t] is not None and individual.get(t)]
    return sum(a / b for a, b in pairs) / len(pairs)  # type: ignore[operator]


def reference_rows(paths: list[Path]) -> list[dict[str, Any]]:
    """Routed EMR, gating+RegMean m=5 and TSV routed rows (EfficientNet-Lite0 gate) of earlier accuracy runs:
    x one model (stored parameters / the backbone's; all float32 there) and normalised accuracy (%)."""
    out = []
    for path in paths:
        data = json.loads(path.read_text())
        ind = next(r for r in data["rows"] if r["kind"] == "individual")["accuracy"]
        for r in data["rows"]:
            if r.get("gate") != "efficientnet_lite0":
                continue
            if r["kind"] == "emr_routed":
                label = "routed EMR"
            elif r["kind"] == "gating_regmean" and r.get("m") == 5:
                label = "gating+RegMean m=5, routed"
            elif r["kind"] == "tsv_routed":
                label = f"tsv_routed fp32 before ({path.parent.name})"
            else:
                continue
            norm = sum(r["accuracy"][t] / ind[t] for t in ind) / len(ind)
            x = r["stored_M"] / data["backbone_M"]
            out.append({"label": label, "x_one_model": x, "normalised": 100 * norm, "name": r["name"]})
    return out


def write_markdown(result: dict[str, Any], path: Path) -> None:
    """The grid as a table: stored bytes, held-out agreement, test accuracy, FLOPs, resident memory."""
    lines = [
        "| candidate | stored MB | × one model | held-out agreement routed, min (task) | test normalised given "
        "| test normalised routed | GFLOPs/img given / routed | resident MB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in sorted(result["candidates"], key=lambda r: r["stored_bytes"]):
        chosen = " **chosen**" if row["params"] == result.get("chosen") else ""
        lines.append(
            f"| {candidate_name(row['params'])}{chosen} | {row['stored_bytes'] / 1e6:.2f} | {row['x_one_model']:.3f} "
            f"| {100 * row['min_agreement']:.2f}% ({row['worst_task']}) | {row['normalised_given']:.2f} "
            f"| {row.get('normalised_routed', float('nan')):.2f} "
            f"| {row['gflops_given']:.3f} / {row.get('gflops_routed', float('nan')):.3f} "
            f"| {row['resident_bytes'] / 2**20:.1f} |"
        )
    lines += ["", "What other targets would choose from the same held-out records (the same rule):", ""]
    lines += ["| target | chosen | × one model | test normalised routed |", "|---|---|---|---|"]
    for target in (result["target"], 0.99, 0.985, 0.98, 0.97, 0.95):
        records = [
            CandidateRecord.model_validate(
                {k: r[k] for k in CandidateRecord.model_fields} | {"meets_target": r["min_agreement"] >= target}
            )
            for r in result["candidates"]
        ]
        try:
            pick = choose(records, target)
        except SelectionError:
            lines.append(f"| {target} | refused (best held-out agreement below it) | | |")
            continue
        row = next(r for r in result["candidates"] if r["params"] == pick.params)
        lines.append(
            f"| {target} | {candidate_name(pick.params)} | {pick.x_one_model:.3f} "
            f"| {row.get('normalised_routed', float('nan')):.2f} |"
        )
    path.write_text("\n".join(lines) + "\n")


def plot(result: dict[str, Any], refs: list[dict[str, Any]], path: Path, also: Sequence[dict[str, Any]] = ()) -> None:
    """Normalised routed test accuracy vs stored bytes (x one fp32 model): the grid by bits (with the candidates of
    the runs in ``also``: a grid measured in parts), each run's choice, and the reference rows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [result, *also]
    candidates = [r for run in runs for r in run["candidates"]]
    fig, ax = plt.subplots(figsize=(8, 7))
    markers = {32: "o", 8: "s", 4: "^"}
    for bits, marker in markers.items():
        rows = sorted((r for r in candidates if r["params"].get("bits") == bits), key=lambda r: r["x_one_model"])
        if rows:
            ax.plot(
                [r["x_one_model"] for r in rows],
                [r["normalised_routed"] for r in rows],
                marker=marker,
                label=f"tsv_routed {bits}-bit factors (full test split)",
            )
            for r in rows:
                ax.annotate(f"f={r['params'].get('f')}", (r["x_one_model"], r["normalised_routed"]), fontsize=7)
    for run in runs:
        chosen = [r for r in run["candidates"] if r["params"] == run.get("chosen")]
        if chosen:
            c, label = chosen[0], f"chosen on held-out calibration images (target {run['target']})"
            ax.scatter(
                [c["x_one_model"]], [c["normalised_routed"]], s=220, facecolors="none", edgecolors="red", label=label
            )
    ys = [r["normalised_routed"] for r in candidates]
    for label in dict.fromkeys(r["label"] for r in refs):
        pts = sorted((r["x_one_model"], r["normalised"]) for r in refs if r["label"] == label)
        ys += [y for _, y in pts]
        ax.plot(*zip(*pts), linestyle="--", marker="x", label=f"{label} (1000 test images per task)")
    ax.axhline(99.5, color="grey", linewidth=0.8)
    ax.axvline(1.2, color="grey", linewidth=0.8)
    ax.set_ylim(min(ys) - 0.2, 100.0)
    ax.set_xlabel("stored bytes (x one fp32 model)")
    ax.set_ylabel("normalised accuracy, task NOT given (%)")
    ax.set_title(f"{result['zoo']}: accuracy vs bytes (goal: >= 99.5% at <= 1.2x)")
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=2)  # below: no point hidden
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def recount_flops(zoo: Zoo, params: dict[str, Any], out: Path, references: list[Path]) -> None:
    """FLOPs per image of every ``f`` of a finished run through the Engine: ``tsv_c`` bundles (the same pass as
    the routed ones with the task given) and, routed, plus the gate network at its input size."""
    from merging.pipeline import build_candidate, plan_merge
    from model_store.architecture import build_gate

    path = out / "lowrank_select.json"
    result = json.loads(path.read_text())
    fs = sorted({r["params"]["f"] for r in result["candidates"]}, reverse=True)
    n = len(zoo.tasks)
    gate = build_gate(params.get("gate_arch", "efficientnet_lite0"), n).eval()
    size = int(params.get("gate_size", 64))
    gate_gflops = engine_flops(gate, torch.randn(1, 3, size, size)) / 1e9
    counted: dict[float, float] = {}
    with tempfile.TemporaryDirectory(prefix="lowrank-flops-") as tmp:
        store = BundleStore(StoreLayout(Path(tmp)), keep=100)
        plan = plan_merge(zoo, "tsv_c", {"conv": params.get("conv", False)})
        for f in fs:
            candidate = build_candidate(plan, store, {"f": f})
            engine = Engine(candidate.preview(plan), "cpu")
            prep = engine.preprocessing
            x = torch.randn(n, prep.channels, prep.size, prep.size)
            counted[f] = engine_flops(engine.predict, x, list(range(n))) / n / 1e9
            candidate.draft.discard()
    for row in result["candidates"]:
        row["gflops_given"] = counted[row["params"]["f"]]
        row["gflops_routed"] = counted[row["params"]["f"]] + gate_gflops
    result["gate_gflops"] = gate_gflops
    path.write_text(json.dumps(result, indent=2) + "\n")
    write_markdown(result, out / "lowrank_select.md")
    plot(result, reference_rows(references), out / "lowrank_select.png")
    print((out / "lowrank_select.md").read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--zoo", required=True, help="zoo directory")
    ap.add_argument("--method", default="tsv_routed")
    ap.add_argument("--param", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2")
    ap.add_argument("--target", type=float, default=0.995)
    ap.add_argument("--holdout-fraction", type=float, default=0.2)
    ap.add_argument("--holdout-seed", type=int, default=0)
    ap.add_argument("--limit", type=int, default=None, help="test images per task (default: the full test split)")
    ap.add_argument("--batch", type=int, default=64, help="mixed-task batch size of the routed evaluation")
    ap.add_argument("--reference", action="append", default=[], type=Path, help="accuracy-*.json of earlier runs")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument(
        "--flops-only",
        action="store_true",
        help="re-count FLOPs per image of an existing <out>/lowrank_select.json (one bundle per f, factors as stored "
        "do not change the pass: they are dequantized at load)",
    )
    ap.add_argument(
        "--also", action="append", default=[], type=Path, help="lowrank_select.json of other parts of the grid (plot)"
    )
    ap.add_argument("--replot", action="store_true", help="only redraw <out>/lowrank_select.png (with --also)")
    args = ap.parse_args()
    also = [json.loads(p.read_text()) for p in args.also]
    if args.replot:
        result = json.loads((args.out / "lowrank_select.json").read_text())
        plot(result, reference_rows(args.reference), args.out / "lowrank_select.png", also)
        return
    t_start = time.perf_counter()
    zoo = Zoo.load(args.zoo)
    if args.flops_only:
        recount_flops(zoo, dict(parse_param(p) for p in args.param), args.out, args.reference)
        return
    params = dict(parse_param(p) for p in args.param)
    individual: dict[str, float | None] = {}
    rows: list[dict[str, Any]] = []

    def on_candidate(over: dict[str, Any], bundle: Bundle, record: CandidateRecord) -> None:
        row = {**record.model_dump(mode="json"), **measure_on_test(bundle, zoo, args.limit, args.batch, individual)}
        row["normalised_given"] = 100 * normalised(row["test_given"], individual)
        if row["test_routed"]:
            row["normalised_routed"] = 100 * normalised(row["test_routed"], individual)
        rows.append(row)
        routed = row.get("normalised_routed", float("nan"))
        held = f"held-out min {record.min_agreement:.4f} ({record.worst_task})"
        print(f"{candidate_name(over)}: {row['x_one_model']:.3f}x, {held}, test routed {routed:.2f}%", flush=True)

    with tempfile.TemporaryDirectory(prefix="lowrank-select-") as tmp:
        store = BundleStore(StoreLayout(Path(tmp)), keep=100)
        result: dict[str, Any] = {"zoo": zoo.name, "method": args.method, "params": params, "target": args.target}
        try:
            holdout = Holdout(args.holdout_fraction, args.holdout_seed)
            grid = parse_grid(args.grid)
            outcome, selection = select_and_publish(
                zoo,
                store,
                args.method,
                params,
                args.target,
                HeldOutAgreement(zoo, holdout),
                grid,
                None,
                holdout,
                True,
                on_candidate=on_candidate,
            )
            result["chosen"] = selection.chosen
            result["selection_table"] = format_selection(selection)
            manifest = store.load(outcome.version).manifest
            result["gate_test_accuracy"] = manifest.extra.gate_test_accuracy
            data = manifest.extra.data or {}
            result["data"] = {t: record.model_dump(mode="json") for t, record in data.items()}
        except SelectionError as e:
            result["chosen"] = None
            result["refused"] = str(e)
    result |= {
        "individual": individual,
        "candidates": rows,
        "seconds": round(time.perf_counter() - t_start, 1),
        "machine": f"{platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads",
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "lowrank_select.json").write_text(json.dumps(result, indent=2) + "\n")
    write_markdown(result, args.out / "lowrank_select.md")
    plot(result, reference_rows(args.reference), args.out / "lowrank_select.png")
    print((args.out / "lowrank_select.md").read_text())
    print(result.get("refused") or f"chosen: {result['chosen']}", f"({result['seconds']} s)")


if __name__ == "__main__":
    main()
