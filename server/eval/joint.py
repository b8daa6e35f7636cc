"""Per-task and joint accuracy of a bundle with several task heads (FS-Merge Tables 3-4), through the Engine.

* per-task: task t's images with task t named, classified by its own head;
* joint: every head's logits on the same features concatenated; the arg-max must be task t's head at the
  right class (the task is NOT given; no gate).

The output ensemble (evaluation-only reference) runs every task's own model from the zoo with its own head
(:meth:`~server.eval.taskpool.TaskPool.reference`) and takes the same arg-max over all of them.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from model_store.data.preprocessing import to_model_input
from model_store.zoo import Zoo
from server.eval.taskpool import TaskPool
from server.runtime.engine import Engine

#: per task: ``{"per_task": acc, "joint": acc}``
Scores = dict[str, dict[str, float]]


def _score(pool: TaskPool, logits: Mapping[str, list[torch.Tensor]]) -> Scores:
    """``logits[task]``: every head's logits on task's images, in task order -> per-task and joint accuracy."""
    out: Scores = {}
    for i, t in enumerate(pool.tasks):
        y = pool.labels(t)
        heads = logits[t]
        offset = sum(h.shape[1] for h in heads[:i])
        out[t] = {
            "per_task": float((heads[i].argmax(-1) == y).float().mean()),
            "joint": float((torch.cat(heads, 1).argmax(-1) == y + offset).float().mean()),
        }
    return out


@torch.inference_mode()
def evaluate_joint(engine: Engine, pool: TaskPool) -> Scores:
    """Per-task and joint accuracy of ``engine``'s bundle (one backbone, every task's head) on ``pool``."""
    logits: dict[str, list[torch.Tensor]] = {}
    for t in pool.tasks:
        images, i = pool.sets[t], engine.task_index(t)
        assert images is not None, f"task '{t}' has no test images"
        parts = [engine.all_head_logits(engine.prepare(chunk, i)[0], i) for chunk in images.chunks(pool.limit)]
        logits[t] = [torch.cat([p[h] for p in parts]) for h in range(len(engine.tasks))]
    return _score(pool, logits)


@torch.inference_mode()
def evaluate_ensemble(zoo: Zoo, pool: TaskPool) -> Scores:
    """The output ensemble: every task's own model (its own preprocessing) with its own head, arg-max over all."""
    models = {t: zoo.build_model(t).eval() for t in pool.tasks}
    logits: dict[str, list[torch.Tensor]] = {}
    for t in pool.tasks:
        images = pool.sets[t]
        assert images is not None, f"task '{t}' has no test images"
        chunks = list(images.chunks(pool.limit))
        logits[t] = [
            torch.cat([m(to_model_input(c, zoo.metas[h].preprocessing)) for c in chunks]) for h, m in models.items()
        ]
    return _score(pool, logits)


def summary(scores: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """Mean per-task and joint accuracy over tasks."""
    n = len(scores)
    return {
        "per_task": sum(s["per_task"] for s in scores.values()) / n,
        "joint": sum(s["joint"] for s in scores.values()) / n,
    }
