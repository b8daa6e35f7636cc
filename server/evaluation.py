"""Per-task test accuracy of a bundle with each task's own head (task given)."""
from __future__ import annotations

import torch
from tqdm.auto import tqdm

from model_store.datasets import SplitSpec, load_split
from model_store.preprocessing import to_model_input
from model_store.training import accuracy
from server.bundle_models import BundleModels


def evaluate_bundle(models: BundleModels, split: SplitSpec = SplitSpec(), limit: int | None = None, progress: bool = False) -> dict[str, float]:
    """Accuracy on every task's TEST split (never seen by training or merging)."""
    out: dict[str, float] = {}
    for task in tqdm(models.tasks, desc=f"eval {models.bundle.version}", disable=not progress):
        data = load_split(task, "test", split, limit=limit)
        assert data.labels is not None
        x = to_model_input(data.images, models.preprocessing)
        out[task] = accuracy(models.build(task), x, torch.as_tensor(data.labels))
    return out


def format_table(rows: dict[str, dict[str, float]], tasks: list[str], reference: dict[str, float] | None = None) -> str:
    """Markdown table: one row per method, per-task accuracy, average and normalised average."""
    head = "| method | " + " | ".join(tasks) + " | avg |" + (" norm. avg |" if reference else "")
    sep = "|---" * (len(tasks) + 2 + (1 if reference else 0)) + "|"
    lines = [head, sep]
    for name, accs in rows.items():
        avg = sum(accs[t] for t in tasks) / len(tasks)
        cells = " | ".join(f"{100 * accs[t]:.1f}" for t in tasks)
        line = f"| {name} | {cells} | {100 * avg:.1f} |"
        if reference:
            norm = sum(accs[t] / reference[t] for t in tasks) / len(tasks)
            line += f" {100 * norm:.1f} |"
        lines.append(line)
    return "\n".join(lines)
