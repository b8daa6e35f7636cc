"""Per-task test accuracy of a bundle with each task's own head (task given)."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from model_store.datasets import SplitSpec, load_split
from model_store.preprocessing import to_model_input
from model_store.training import accuracy
from server.bundle_models import BundleModels

if TYPE_CHECKING:
    from server.routed import RoutedModel


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


def evaluate_routed(routed: "RoutedModel", split: SplitSpec = SplitSpec(), limit: int | None = None, batch_size: int = 64, seed: int = 0) -> dict[str, dict[str, float]]:
    """Accuracy with the task NOT given, on MIXED-task batches of every task's test split.

    An image counts as correct only when the gate picks its task AND that task's
    head picks its class. Returns per task ``{"routed": acc, "gate": acc}``.
    """
    models = routed.models
    xs, gs, tasks, labels = [], [], [], []
    for i, task in enumerate(models.tasks):
        data = load_split(task, "test", split, limit=limit)
        assert data.labels is not None
        xs.append(to_model_input(data.images, models.preprocessing))
        gs.append(to_model_input(data.images, models.gate_preprocessing))
        tasks.append(torch.full((len(data.labels),), i))
        labels.append(torch.as_tensor(data.labels))
    x, g, t, y = torch.cat(xs), torch.cat(gs), torch.cat(tasks), torch.cat(labels)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    pred_task = torch.empty_like(t)
    pred_class = torch.empty_like(y)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        out = routed.classify(x[idx], g[idx])
        pred_task[idx] = out.tasks
        pred_class[idx] = torch.stack([lg.argmax() for lg in out.logits])
    result = {}
    for i, task in enumerate(models.tasks):
        sel = t == i
        gate_ok = pred_task[sel] == i
        result[task] = {"gate": float(gate_ok.float().mean()), "routed": float((gate_ok & (pred_class[sel] == y[sel])).float().mean())}
    return result
