"""Quantized low-rank bundles and settings chosen without labels, measured on a real zoo (issue 36, SPEC section 9).

Runs ``--target-agreement`` selection (:func:`server.runtime.selection.select_and_publish`) over a grid of
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
earlier accuracy benchmarks given with ``--reference`` (their ``accuracy-*.json``).
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from model_store.bundle import Bundle, BundleStore
from model_store.data.sources import Holdout
from model_store.settings import StoreLayout
from model_store.zoo import Zoo
from server.cli.merge import _parse_param, parse_grid
from server.eval.accuracy import evaluate_bundle, evaluate_individual, evaluate_routed
from server.eval.bench import flops
from server.runtime.engine import Engine
from server.runtime.selection import CandidateRecord, SelectionError, format_selection, select_and_publish


def candidate_name(params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in params.items())


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
        "gflops_given": flops(engine.predict, x, list(range(n))) / n / 1e9,
        "resident_bytes": sum(engine.resident_bytes().values()),
    }
    if engine.gate_preprocessing is not None:
        gp = engine.gate_preprocessing
        g = torch.randn(n, gp.channels, gp.size, gp.size)
        row["gflops_routed"] = flops(engine.predict, x, [None] * n, g) / n / 1e9
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
    path.write_text("\n".join(lines) + "\n")


def plot(result: dict[str, Any], refs: list[dict[str, Any]], path: Path) -> None:
    """Normalised routed test accuracy vs stored bytes (x one fp32 model): the grid by bits, references."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    markers = {32: "o", 8: "s", 4: "^"}
    for bits, marker in markers.items():
        rows = sorted(
            (r for r in result["candidates"] if r["params"].get("bits") == bits), key=lambda r: r["x_one_model"]
        )
        if rows:
            ax.plot(
                [r["x_one_model"] for r in rows],
                [r["normalised_routed"] for r in rows],
                marker=marker,
                label=f"tsv_routed {bits}-bit factors (full test split)",
            )
            for r in rows:
                ax.annotate(f"f={r['params'].get('f')}", (r["x_one_model"], r["normalised_routed"]), fontsize=7)
    chosen = [r for r in result["candidates"] if r["params"] == result.get("chosen")]
    if chosen:
        c, label = chosen[0], f"chosen on held-out calibration images (target {result['target']})"
        ax.scatter(
            [c["x_one_model"]], [c["normalised_routed"]], s=220, facecolors="none", edgecolors="red", label=label
        )
    for label in dict.fromkeys(r["label"] for r in refs):
        pts = sorted((r["x_one_model"], r["normalised"]) for r in refs if r["label"] == label)
        ax.plot(*zip(*pts), linestyle="--", marker="x", label=f"{label} (1000 test images per task)")
    ax.axhline(99.5, color="grey", linewidth=0.8)
    ax.axvline(1.2, color="grey", linewidth=0.8)
    ax.set_xlabel("stored bytes (x one fp32 model)")
    ax.set_ylabel("normalised accuracy, task NOT given (%)")
    ax.set_title(f"{result['zoo']}: accuracy vs bytes (goal: >= 99.5% at <= 1.2x)")
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


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
    args = ap.parse_args()
    t_start = time.perf_counter()
    zoo = Zoo.load(args.zoo)
    params = dict(_parse_param(p) for p in args.param)
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
                zoo, store, args.method, params, args.target, grid, None, holdout, True, on_candidate=on_candidate
            )
            result["chosen"] = selection.chosen
            result["selection_table"] = format_selection(selection)
            manifest = store.load(outcome.version).manifest
            result["gate_test_accuracy"] = manifest.extra.get("gate_test_accuracy")
            result["data"] = manifest.extra["data"]
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
