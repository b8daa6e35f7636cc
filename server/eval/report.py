"""The accuracy benchmark's report: markdown tables, the papers' claims checked on our numbers, files on disk
and the ``<!-- bench accuracy: <zoo> -->`` section of BENCHMARKS.md (plots: :mod:`server.eval.plots`)."""

from __future__ import annotations

import itertools
import re
from pathlib import Path

from server.eval.plots import plot
from server.eval.records import BenchResult, BenchRow, average, normalised


def best_task_arithmetic(rows: list[BenchRow]) -> str:
    """Name of the TA row with the best average accuracy."""
    return max((r for r in rows if r.kind == "task_arithmetic"), key=lambda r: average(r.accuracy)).name


def mean_agreement(row: BenchRow) -> float | None:
    """Mean over tasks of the row's top-1 agreement with each task's own model, in % (None: not measured)."""
    have = [v for v in row.agreement.values() if v is not None]
    return 100 * sum(have) / len(have) if have else None


def claims(result: BenchResult) -> list[tuple[str, bool, str]]:
    """The papers' claims checked on our numbers: (claim, holds, evidence). Claims whose rows were not run are
    skipped."""
    avg = {r.name: average(r.accuracy) for r in result.rows}
    out: list[tuple[str, bool, str]] = []
    arch = result.config["gate_archs"][0]
    emr, reg, avgmean = avg.get("EMR (task given)"), avg.get("RegMean (α=0.9)"), avg.get("AvgMean")
    ta = avg[best_task_arithmetic(result.rows)] if any(r.kind == "task_arithmetic" for r in result.rows) else None
    if emr is not None and ta is not None and avgmean is not None:
        out.append(
            (
                "EMR ≫ Task Arithmetic ≥ AvgMean (EMR Table 1)",
                emr > ta >= avgmean,
                f"EMR {emr:.1f} vs best TA {ta:.1f} vs AvgMean {avgmean:.1f}",
            )
        )
    if reg is not None and ta is not None:
        out.append(
            (
                "RegMean > Task Arithmetic (Ye Tables 3-4, EMR Table 1)",
                reg > ta,
                f"RegMean {reg:.1f} vs best TA {ta:.1f}",
            )
        )
    for label, static in (("AvgMean", avgmean), ("RegMean", reg)):
        found = [avg.get(f"gating+{label} m={m} ({arch} gate)") for m in result.m_values]
        seq = [v for v in found if v is not None]
        if static is None or not seq or len(seq) != len(found):
            continue
        out.append(
            (
                f"gating improves {label} (Ye Tables 3-4)",
                seq[0] > static,
                f"gating+{label} m={result.m_values[0]} {seq[0]:.1f} vs {label} {static:.1f}",
            )
        )
        if len(seq) > 1:
            grows = all(b >= a - 0.05 for a, b in itertools.pairwise(seq)) and seq[-1] > seq[0]
            evidence = "m " + ", ".join(f"{m}: {v:.1f}" for m, v in zip(result.m_values, seq))
            out.append((f"gating+{label} grows with m (Ye Tables 3-4)", grows, evidence))
    inits = {g.init: (a, average(g.accuracy)) for a, g in result.gates.items()}
    if "scratch" in inits and len(inits) > 1:
        (pre_arch, pre), (scr_arch, scr) = next(v for k, v in inits.items() if k != "scratch"), inits["scratch"]
        out.append(
            (
                "pretrained gate init beats scratch (Ye Table 8)",
                pre > scr,
                f"{pre_arch} {pre:.2f}% vs {scr_arch} {scr:.2f}% task-id accuracy",
            )
        )
    routed = avg.get(f"routed EMR ({arch} gate)")
    if emr is not None and routed is not None:
        out.append(
            (
                "routed EMR within 1 point of EMR with the task given (our target)",
                emr - routed <= 1.0,
                f"{routed:.1f} vs {emr:.1f}",
            )
        )
    return out


def _intro(result: BenchResult, command: str, ta: str | None) -> str:
    imgs = ", ".join(f"{t} {k}" for t, k in result.test_images.items())
    return (
        f"Command: `{command}` (seed {result.config['seed']}, CPU, {result.seconds / 60:.1f} min). "
        f"Test images per task (never seen by training or merging): {imgs}. "
        "Every row's merge runs through the merge pipeline into a bundle, evaluated through the serving Engine: "
        "task given (the pass `vitmerge eval` makes) or routed by the bundle's gate on mixed-task batches of "
        f"{result.config['batch_size']} (`vitmerge eval --routed`). ViT forward {result.vit_gflops:.3f} "
        f"GFLOPs/img, backbone {result.backbone_M:.2f} M parameters. Agreement: top-1 agreement with each task's "
        "own model in the row's pass, averaged over tasks. Stored parameters are the bundle's tensors plus the "
        "gate's parameters on routed rows (EMR: 1/32 parameter per mask bit); GFLOPs: one image through "
        "`Engine.predict` (gated rows: exact per-image weight mixing; routed rows: the gate too). "
        + ("**Bold**: best Task Arithmetic λ (chosen on the test split, as the papers do)." if ta else "")
    )


def render_markdown(result: BenchResult, command: str) -> str:
    """Markdown tables of one run (the section ``vitmerge bench accuracy`` writes)."""
    tasks, rows = result.tasks, result.rows
    ind = result.row("Individual").accuracy
    ta = best_task_arithmetic(rows) if any(r.kind == "task_arithmetic" for r in rows) else None
    lines = [
        _intro(result, command, ta),
        "",
        "| method | " + " | ".join(tasks) + " | avg | norm. avg | agreement | stored params (M) | GFLOPs/img |",
        "|---" * (len(tasks) + 6) + "|",
    ]
    for r in rows:
        name = f"**{r.name}**" if r.name == ta else r.name
        agree = mean_agreement(r)
        lines.append(
            f"| {name} | "
            + " | ".join(f"{100 * r.accuracy[t]:.1f}" for t in tasks)
            + f" | {average(r.accuracy):.1f} | {100 * normalised(r.accuracy, ind):.1f} | "
            + ("n/a" if agree is None else f"{agree:.1f}")
            + f" | {r.stored_M:.2f} | {r.gflops:.3f} |"
        )
    lines += [
        "",
        "Gates (share of each task's test images routed to that task):",
        "",
        "| gate | init | params (M) | GFLOPs/img | train (s) | " + " | ".join(tasks) + " | avg |",
        "|---" * (len(tasks) + 6) + "|",
    ]
    for arch, g in result.gates.items():
        lines.append(
            f"| {arch} | {g.init} | {g.params / 1e6:.2f} | {g.flops / 1e9:.3f} | {g.train_s:.0f} | "
            + " | ".join(f"{100 * g.accuracy[t]:.1f}" for t in tasks)
            + f" | {average(g.accuracy):.2f} |"
        )
    if result.scaling:
        methods = list(result.scaling[0].normalised)
        lines += [
            "",
            "Normalised accuracy (%) vs number of tasks N (the first N tasks; routed rows use a gate trained on "
            "those N):",
            "",
            "| N | tasks | " + " | ".join(methods) + " |",
            "|---" * (len(methods) + 2) + "|",
        ]
        for sc in result.scaling:
            cells = " | ".join(f"{100 * sc.normalised[k]:.1f}" for k in methods)
            lines.append(f"| {sc.n} | {', '.join(sc.tasks)} | {cells} |")
    lines += [
        "",
        "Claims of the papers, checked on these numbers:",
        "",
        "| claim | holds here | evidence |",
        "|---|---|---|",
    ]
    for claim, ok, evidence in claims(result):
        lines.append(f"| {claim} | {'yes' if ok else '**no**'} | {evidence} |")
    return "\n".join(lines) + "\n"


def update_section(path: Path, key: str, body: str) -> None:
    """Replace (or append) the block between ``<!-- bench accuracy: key -->`` markers in ``path``."""
    start, end = f"<!-- bench accuracy: {key} -->", f"<!-- /bench accuracy: {key} -->"
    block = f"{start}\n{body.rstrip()}\n{end}"
    text = path.read_text() if path.exists() else ""
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.DOTALL)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)


def write_report(result: BenchResult, out_dir: Path, command: str, benchmarks_md: Path | None) -> list[Path]:
    """JSON + markdown + PNGs into ``out_dir``; the markdown also into ``benchmarks_md``'s section."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"accuracy-{result.zoo}"
    (out_dir / f"{stem}.json").write_text(result.model_dump_json(indent=1))
    md = render_markdown(result, command)
    pngs = plot(result, out_dir, stem)
    rel = [
        p.relative_to(benchmarks_md.parent) if benchmarks_md and p.is_relative_to(benchmarks_md.parent) else p
        for p in pngs
    ]
    md_full = md + "\n" + "\n".join(f"![{p.stem}]({p})" for p in rel) + "\n"
    (out_dir / f"{stem}.md").write_text(md_full)
    if benchmarks_md is not None:
        update_section(benchmarks_md, result.zoo, md_full)
    return [out_dir / f"{stem}.json", out_dir / f"{stem}.md", *pngs]
