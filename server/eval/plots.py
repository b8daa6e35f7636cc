"""The accuracy benchmark's plots (PNG, matplotlib's Agg backend): normalised accuracy per method, accuracy vs
m, stored parameters vs accuracy, TSV over its rank fraction, accuracy vs the number of tasks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from server.eval.records import BenchResult, average, normalised

#: marker colour per row kind (static merges: blue)
KIND_COLORS = {
    "individual": "black",
    "emr": "green",
    "emr_routed": "limegreen",
    "gating_avg": "tab:orange",
    "gating_regmean": "tab:red",
}


def _save(fig: Any, ax: Any, path: Path, legend: bool = True) -> Path:
    """Grid, legend, tight layout, PNG at 110 dpi; closes the figure."""
    import matplotlib.pyplot as plt

    if legend:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _normalised_bars(result: BenchResult, ind: dict[str, float], path: Path) -> Path:
    import matplotlib.pyplot as plt

    rows = result.rows
    fig, ax = plt.subplots(figsize=(8, 0.28 * len(rows) + 1.2))
    ax.barh([r.name for r in rows][::-1], [100 * normalised(r.accuracy, ind) for r in rows][::-1], color="tab:blue")
    ax.axvline(100, color="black", lw=1)
    ax.set(xlabel="normalised accuracy (%)", title=f"{result.zoo}: normalised accuracy per method")
    ax.tick_params(axis="y", labelsize=7)
    return _save(fig, ax, path, legend=False)


def _vs_m(result: BenchResult, ind: dict[str, float], path: Path) -> Path:
    """Average accuracy of the gated rows vs m (task given and per gate), individual and routed EMR as lines."""
    import matplotlib.pyplot as plt

    archs = result.config["gate_archs"]
    kinds = {r.kind for r in result.rows}
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for base, label, style in (("avg", "AvgMean", "-"), ("regmean", "RegMean", "--")):
        if f"gating_{base}" not in kinds:
            continue
        for gate, marker in [*zip(archs, "ox"), ("task given", "s")]:
            suffix = "(task given)" if gate == "task given" else f"({gate} gate)"
            ys = [average(result.row(f"gating+{label} m={m} {suffix}").accuracy) for m in result.m_values]
            ax.plot(result.m_values, ys, style, marker=marker, label=f"gating+{label}, {gate}")
    ax.axhline(average(ind), color="black", lw=1, label="individual")
    routed_emr = result.find(f"routed EMR ({archs[0]} gate)")
    if routed_emr is not None:
        ax.axhline(average(routed_emr.accuracy), color="green", ls=":", label="routed EMR")
    ax.set(xlabel="m (gated attention + MLP blocks)", ylabel="avg accuracy (%)", title=f"{result.zoo}: accuracy vs m")
    return _save(fig, ax, path)


def _params(result: BenchResult, ind: dict[str, float], path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for r in result.rows:
        ax.scatter(r.stored_M, 100 * normalised(r.accuracy, ind), color=KIND_COLORS.get(r.kind, "tab:blue"), s=18)
    for kind, c in [("static merges", "tab:blue"), *KIND_COLORS.items()]:
        ax.scatter([], [], color=c, label=kind)
    ax.set(
        xlabel="parameters stored (M)",
        ylabel="normalised accuracy (%)",
        title=f"{result.zoo}: stored parameters vs accuracy",
    )
    return _save(fig, ax, path)


def _tsv(result: BenchResult, ind: dict[str, float], path: Path) -> Path:
    """TSV-C / TSV routed over the rank fraction f, against EMR, gated RegMean and one or 1.5 models' storage."""
    import matplotlib.pyplot as plt

    arch = result.config["gate_archs"][0]
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for kind, label, marker in (("tsv_c", "TSV-C, task given", "o"), ("tsv_routed", f"TSV routed ({arch} gate)", "x")):
        pts = sorted((r.stored_M, 100 * normalised(r.accuracy, ind), r.f or 0.0) for r in result.rows if r.kind == kind)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, label=label)
        for x, y, f in pts:
            ax.annotate(f"f={f:.2g}", (x, y), fontsize=6, xytext=(3, -8), textcoords="offset points")
    for name, c in (("EMR (task given)", "green"), (f"routed EMR ({arch} gate)", "limegreen")):
        row = result.find(name)
        if row is not None:
            ax.scatter([row.stored_M], [100 * normalised(row.accuracy, ind)], color=c, marker="s", label=name)
    for r in result.rows:
        if r.kind == "gating_regmean" and r.gate == arch:
            ax.scatter([r.stored_M], [100 * normalised(r.accuracy, ind)], color="tab:red", marker="^", s=14)
    ax.scatter([], [], color="tab:red", marker="^", label=f"gating+RegMean (m values, {arch} gate)")
    one = result.row("Individual").stored_M / max(1, len(result.tasks))
    ax.axvline(one, color="black", lw=0.8, ls=":", label="one model")
    ax.axvline(1.5 * one, color="gray", lw=0.8, ls="--", label="1.5 x one model")
    low, high = ax.get_ylim()
    ax.set_ylim(low - 0.6 * (high - low), high)  # room for the legend below the curves
    ax.set(
        xlabel="parameters stored (M)",
        ylabel="normalised accuracy (%)",
        title=f"{result.zoo}: accuracy vs storage (TSV over f)",
    )
    return _save(fig, ax, path)


def _vs_n(result: BenchResult, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    ns = [sc.n for sc in result.scaling]
    for k in result.scaling[0].normalised:
        ax.plot(ns, [100 * sc.normalised[k] for sc in result.scaling], marker="o", label=k)
    ax.set(
        xlabel="number of tasks N", ylabel="normalised accuracy (%)", title=f"{result.zoo}: scaling with N", xticks=ns
    )
    return _save(fig, ax, path)


def plot(result: BenchResult, out_dir: Path, stem: str) -> list[Path]:
    """PNG plots: normalised accuracy per method, accuracy vs m, stored params vs accuracy, TSV, accuracy vs N."""
    import matplotlib

    matplotlib.use("Agg")
    ind = result.row("Individual").accuracy
    paths = [
        _normalised_bars(result, ind, out_dir / f"{stem}-normalised.png"),
        _vs_m(result, ind, out_dir / f"{stem}-vs-m.png"),
        _params(result, ind, out_dir / f"{stem}-params.png"),
    ]
    if any(r.kind in ("tsv_c", "tsv_routed") for r in result.rows):
        paths.append(_tsv(result, ind, out_dir / f"{stem}-tsv.png"))
    if result.scaling:
        paths.append(_vs_n(result, out_dir / f"{stem}-vs-n.png"))
    return paths
