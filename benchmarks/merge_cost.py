"""Merge time and peak memory of the data-free methods on a ViT-B/16-size zoo.

A synthetic zoo (random ViT-B/16 backbone as theta_0, plus N task models that add
small random deltas) is written as safetensors; each (method, N) then runs in its own
process over lazy safetensors mappings (the streaming path `vitmerge merge` uses),
and the child's peak RSS (``VmHWM`` of its own image) is compared with the size
of one model and with an import-only baseline process.

    .venv/bin/python benchmarks/merge_cost.py [--ns 2,4,8] [--methods avg,task_arithmetic,ties,emr,tsv_c,tsv_m]

Writes a Markdown table (stdout and benchmarks/results/merge_cost.md) and a plot
(benchmarks/results/merge_cost.png).

Feeds BENCHMARKS.md, section "Merge cost on a ViT-B/16-size zoo".
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"

CHILD = r"""
import json, sys, time
from pathlib import Path
import torch
torch.set_num_threads(2)
from merging import task_arithmetic, ties_merge, weight_average, emr_merge
from model_store.lazy_tensors import LazySafetensors
from model_store.memory import limit_heap_fragmentation
limit_heap_fragmentation()  # what `vitmerge merge` and the server do
root, method, n = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
def hwm():
    # peak RSS of THIS process image (VmHWM resets at exec, unlike ru_maxrss)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
if method == "baseline":
    print(json.dumps({"seconds": 0.0, "hwm": hwm()})); sys.exit(0)
pre = LazySafetensors(root / "base.safetensors")
ft = [LazySafetensors(root / f"task{i}.safetensors") for i in range(n)]
t = time.perf_counter()
if method == "avg":
    out = weight_average(ft)
elif method == "task_arithmetic":
    out = task_arithmetic(pre, ft, 0.3)
elif method == "ties":
    out = ties_merge(pre, ft, 0.2, 1.0)
elif method == "emr":
    out = emr_merge(pre, ft)
elif method == "tsv_c":
    from merging.methods.tsv import tsv_compress
    out = tsv_compress(pre, ft, 1.0 / n)
elif method == "tsv_m":
    from merging.methods.tsv import tsv_merge
    out = tsv_merge(pre, ft)
else:
    raise SystemExit(f"unknown method {method}")
print(json.dumps({"seconds": time.perf_counter() - t, "hwm": hwm()}))
"""


def make_zoo(root: Path, n: int, seed: int = 0) -> int:
    """Write base + n task backbones of ViT-B/16 size; returns one model's bytes."""
    import timm

    torch.manual_seed(seed)
    model = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0)
    base = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(base, root / "base.safetensors")
    for i in tqdm(range(n), desc="synthetic zoo", unit="model"):
        g = torch.Generator().manual_seed(seed + 1 + i)
        save_file(
            {k: (v + 1e-3 * torch.randn(v.shape, generator=g)).contiguous() for k, v in base.items()},
            root / f"task{i}.safetensors",
        )
    return sum(v.numel() * v.element_size() for v in base.values())


def run_child(root: Path, method: str, n: int) -> tuple[float, int]:
    """(merge seconds, peak RSS bytes) of one merge in a fresh process."""
    env = {**os.environ, "PYTHONPATH": str(HERE.parent)}
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(root), method, str(n)], capture_output=True, env=env, text=True
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{method} N={n} failed with {proc.returncode}: {proc.stderr[-2000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return result["seconds"], result["hwm"]


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for method in sorted({r["method"] for r in rows}):
        rs = [r for r in rows if r["method"] == method]
        axes[0].plot([r["n"] for r in rs], [r["seconds"] for r in rs], marker="o", label=method)
        axes[1].plot([r["n"] for r in rs], [r["rss_over_model"] for r in rs], marker="o", label=method)
    axes[0].set(xlabel="N task models", ylabel="merge time (s)", title="Merge time, ViT-B/16 size")
    axes[1].axhline(3.0, color="gray", ls="--", lw=1, label="target 3x")
    axes[1].set(
        xlabel="N task models", ylabel="(peak RSS - baseline) / one model", title="Peak memory above the interpreter"
    )
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ns", default="2,4,8")
    parser.add_argument("--methods", default="avg,task_arithmetic,ties,emr,tsv_c,tsv_m")
    args = parser.parse_args()
    ns = [int(x) for x in args.ns.split(",")]
    methods = args.methods.split(",")
    RESULTS.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="merge_cost_") as tmp:
        root = Path(tmp)
        model_bytes = make_zoo(root, max(ns))
        _, baseline = run_child(root, "baseline", 1)
        rows = []
        for n in tqdm(ns, desc="N"):
            for method in tqdm(methods, desc=f"N={n}", leave=False):
                seconds, rss = run_child(root, method, n)
                rows.append(
                    {
                        "method": method,
                        "n": n,
                        "seconds": seconds,
                        "peak_rss": rss,
                        "rss_over_model": (rss - baseline) / model_bytes,
                    }
                )
    lines = [
        f"One model (ViT-B/16 backbone, fp32): {model_bytes / 2**20:.0f} MiB; import-only baseline process peak RSS: "
        f"{baseline / 2**20:.0f} MiB.",
        "",
        "| method | N | merge time (s) | peak RSS (MiB) | (peak RSS - baseline) / one model |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['n']} | {r['seconds']:.1f} | {r['peak_rss'] / 2**20:.0f} | "
            f"{r['rss_over_model']:.2f} |"
        )
    table = "\n".join(lines)
    print(table)
    (RESULTS / "merge_cost.md").write_text(table + "\n")
    (RESULTS / "merge_cost.json").write_text(
        json.dumps({"model_bytes": model_bytes, "baseline_rss": baseline, "rows": rows}, indent=2)
    )
    plot(rows, RESULTS / "merge_cost.png")


if __name__ == "__main__":
    start = time.perf_counter()
    main()
    print(f"total {time.perf_counter() - start:.0f} s", file=sys.stderr)
