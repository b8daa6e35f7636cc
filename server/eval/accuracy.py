"""Per-task test accuracy of a bundle THROUGH the serving :class:`~server.runtime.engine.Engine`:
task given, or routed by its gate, on the test sources the bundle's manifest records.

The test images of each task come from the data source the bundle's manifest records
(``extra.data[task].test``; bundles made before data sources: the task's built-in
split). A task without test images is reported as such (``None``), never as 0.
Every number here is read from a :class:`~server.eval.taskpool.TaskPool` pass, the same
passes the accuracy benchmark makes.
"""

from __future__ import annotations

from model_store.zoo import Zoo
from server.eval.taskpool import Accuracies, TaskPool, bundle_test_sets, source_zoo
from server.runtime.bundle_reader import BundleReader
from server.runtime.engine import Engine

__all__ = [
    "Accuracies",
    "bundle_test_sets",
    "evaluate_bundle",
    "evaluate_individual",
    "evaluate_routed",
    "format_table",
    "source_zoo",
]


def evaluate_bundle(engine: Engine, limit: int | None = None, progress: bool = False) -> Accuracies:
    """Accuracy with the task given on every task's TEST images (first ``limit`` of each); None without test data."""
    pool = TaskPool.of_bundle(engine.models, limit)
    return pool.given_accuracy(pool.given(engine, progress))


def evaluate_individual(models: BundleReader, zoo: Zoo, limit: int | None = None, progress: bool = False) -> Accuracies:
    """The zoo's individual fine-tuned models on exactly the images :func:`evaluate_bundle` uses."""
    pool = TaskPool.of_bundle(models, limit)
    return pool.reference_accuracy(pool.reference(zoo, progress))


def evaluate_routed(
    engine: Engine, limit: int | None = None, batch_size: int = 64, seed: int = 0
) -> dict[str, dict[str, float] | None]:
    """Accuracy with the task NOT given, on MIXED-task batches of every task's test images.

    An image counts as correct only when the gate picks its task AND that task's
    head picks its class. Returns per task ``{"routed": acc, "gate": acc}`` (None:
    the task has no test images; the gate still may route other tasks' images to it).
    """
    pool = TaskPool.of_bundle(engine.models, limit)
    return pool.routed_accuracy(pool.routed(engine, batch_size, seed))


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
