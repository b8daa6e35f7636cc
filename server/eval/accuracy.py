"""Per-task test accuracy of a bundle THROUGH the serving :class:`~server.runtime.engine.Engine`:
task given, or routed by its gate, on the zoo's test sources.

The test images of each task come from the data source the bundle's manifest records
(``extra.data[task].test``; bundles made before data sources: the task's built-in
split). A task without test images is reported as such (``None``), never as 0.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm.auto import tqdm

from model_store.data.builtin import TASKS
from model_store.data.sources import ImageSet, open_source
from model_store.errors import ZooFormatError
from model_store.schema import DataSource
from model_store.zoo import Zoo
from model_store.zoo_build.training import accuracy
from server.runtime.bundle_reader import BundleReader
from server.runtime.engine import Engine

Accuracies = dict[str, float | None]


def bundle_test_sets(models: BundleReader) -> dict[str, ImageSet | None]:
    """Each task's labeled test images, from the sources the bundle was made with."""
    records = models.bundle.manifest.extra.get("data")
    out: dict[str, ImageSet | None] = {}
    for task in models.tasks:
        if records is None:  # bundles made before data sources: the built-in split
            source = DataSource(kind="builtin", location=task) if task in TASKS else None
        else:
            rec = (records.get(task) or {}).get("test")
            source = DataSource.model_validate(rec["source"]) if rec else None
        out[task] = None if source is None else open_source(source, "test", models.class_names[task])
    return out


def source_zoo(models: BundleReader) -> Zoo | None:
    """The zoo a bundle was merged from, when it is still where the manifest says."""
    path = models.bundle.manifest.zoo.get("path")
    if not path or not (Path(path) / "zoo.json").exists():
        return None
    try:
        return Zoo.load(path, require_base=False)
    except ZooFormatError:
        return None


def predict_classes(
    engine: Engine, x: torch.Tensor, given: list[int | None], x_gate: torch.Tensor | None = None, batch_size: int = 256
) -> tuple[torch.Tensor, torch.Tensor]:
    """(task, class) per image, through ``engine.predict`` in batches; ``given[i]`` None: the gate routes."""
    tasks, classes = [], []
    for start in range(0, len(x), batch_size):
        sl = slice(start, start + batch_size)
        routed = [i for i, g in enumerate(given[sl]) if g is None]
        g = x_gate[sl][routed] if x_gate is not None and routed else None
        outs = engine.predict(x[sl], given[sl], g)
        tasks += [o.task for o in outs]
        classes += [int(o.probabilities.argmax()) for o in outs]
    return torch.tensor(tasks, dtype=torch.long), torch.tensor(classes, dtype=torch.long)


def evaluate_bundle(engine: Engine, limit: int | None = None, progress: bool = False) -> Accuracies:
    """Accuracy with the task given on every task's TEST images (first ``limit`` of each); None without test data."""
    sets = bundle_test_sets(engine.models)
    out: Accuracies = {}
    for i, task in enumerate(tqdm(engine.tasks, desc=f"eval {engine.version}", disable=not progress)):
        images = sets[task]
        if images is None:
            out[task] = None
            continue
        preds = []
        for chunk in images.chunks(limit):
            x, _ = engine.prepare(chunk, i)
            preds.append(predict_classes(engine, x, [i] * len(x))[1])
        out[task] = float((torch.cat(preds) == images.label_tensor(limit)).float().mean())
    return out


def evaluate_individual(models: BundleReader, zoo: Zoo, limit: int | None = None, progress: bool = False) -> Accuracies:
    """The zoo's individual fine-tuned models on exactly the images :func:`evaluate_bundle` uses."""
    sets = bundle_test_sets(models)
    out: Accuracies = {}
    for task in tqdm(models.tasks, desc="eval individual", disable=not progress):
        images = sets[task]
        if images is None or task not in zoo.tasks:
            out[task] = None
            continue
        prep = zoo.metas[task].preprocessing
        out[task] = accuracy(zoo.build_model(task), images.tensors(prep, limit), images.label_tensor(limit))
    return out


def format_table(rows: dict[str, Accuracies], tasks: list[str], reference: Accuracies | None = None) -> str:
    """Markdown table: one row per method, per-task accuracy, average and normalised average.

    Averages run over the tasks that have a number in the row (and in ``reference``); a
    task without test data shows ``n/a``.
    """
    head = "| method | " + " | ".join(tasks) + " | avg |" + (" norm. avg |" if reference else "")
    sep = "|---" * (len(tasks) + 2 + (1 if reference else 0)) + "|"
    lines = [head, sep]
    for name, accs in rows.items():
        have = [t for t in tasks if accs.get(t) is not None]
        cells = " | ".join(f"{100 * accs[t]:.1f}" if accs.get(t) is not None else "n/a" for t in tasks)  # type: ignore[operator]
        avg = f"{100 * sum(accs[t] for t in have) / len(have):.1f}" if have else "n/a"  # type: ignore[misc]
        line = f"| {name} | {cells} | {avg} |"
        if reference:
            pairs = [t for t in have if reference.get(t)]
            norm = sum(accs[t] / reference[t] for t in pairs) / len(pairs) if pairs else None  # type: ignore[operator,misc]
            line += f" {100 * norm:.1f} |" if norm is not None else " n/a |"
        lines.append(line)
    return "\n".join(lines)


def evaluate_routed(
    engine: Engine, limit: int | None = None, batch_size: int = 64, seed: int = 0
) -> dict[str, dict[str, float] | None]:
    """Accuracy with the task NOT given, on MIXED-task batches of every task's test images.

    An image counts as correct only when the gate picks its task AND that task's
    head picks its class. Returns per task ``{"routed": acc, "gate": acc}`` (None:
    the task has no test images; the gate still may route other tasks' images to it).
    """
    if not engine.has_router:
        raise ValueError(
            f"bundle {engine.version} has no gate; merge with emr_routed or gating_* for routed evaluation"
        )
    sets = bundle_test_sets(engine.models)
    xs, gs, tasks, labels = [], [], [], []
    for i, task in enumerate(engine.tasks):
        images = sets[task]
        if images is None:
            continue
        for chunk in images.chunks(limit):
            x_chunk, g_chunk = engine.prepare(chunk, None)  # g_chunk: None with a backbone router
            xs.append(x_chunk)
            if g_chunk is not None:
                gs.append(g_chunk)
        tasks.append(torch.full((images.count(limit),), i))
        labels.append(images.label_tensor(limit))
    if not xs:
        return dict.fromkeys(engine.tasks)
    x, t, y = torch.cat(xs), torch.cat(tasks), torch.cat(labels)
    g = torch.cat(gs) if gs else None
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    g = g[order] if g is not None else None
    pred_task, pred_class = predict_classes(engine, x[order], [None] * len(order), g, batch_size)
    t, y = t[order], y[order]
    result: dict[str, dict[str, float] | None] = {}
    for i, task in enumerate(engine.tasks):
        sel = t == i
        if not bool(sel.any()):
            result[task] = None
            continue
        gate_ok = pred_task[sel] == i
        result[task] = {
            "gate": float(gate_ok.float().mean()),
            "routed": float((gate_ok & (pred_class[sel] == y[sel])).float().mean()),
        }
    return result
