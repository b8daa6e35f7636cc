"""Per-task and joint accuracy of one backbone with several task heads (FS-Merge Tables 3-4).

* per-task: an image of task t is classified by task t's own head (task given);
* joint: every head's logits are concatenated and the arg-max must be task t's
  head at the right class (the task is NOT given; no gate).

The output ensemble (evaluation-only reference) runs every original model with its
own head and takes the same arg-max over all of them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F

from model_store.architecture import build_model, pre_logits
from model_store.data.attach import require_test_set
from model_store.schema import Architecture, Preprocessing
from model_store.zoo import Zoo

TestSet = Mapping[str, tuple[torch.Tensor, torch.Tensor]]


def load_test_sets(
    zoo: Zoo, tasks: Sequence[str], prep: Preprocessing, limit: int | None = None
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Every task's TEST images (from the zoo's test sources, preprocessed) and labels."""
    out = {}
    for t in tasks:
        images = require_test_set(zoo, t, "joint accuracy")
        out[t] = (images.tensors(prep, limit), images.label_tensor(limit))
    return out


def _score(logits: Mapping[str, Mapping[str, torch.Tensor]], data: TestSet) -> dict[str, dict[str, float]]:
    """``logits[image_task][head_task]`` -> per-task and joint accuracy per task."""
    tasks = list(data)
    out: dict[str, dict[str, float]] = {}
    for t in tasks:
        y = data[t][1]
        own = logits[t][t].argmax(-1)
        cat = torch.cat([logits[t][h] for h in tasks], 1)
        offset = sum(logits[t][h].shape[1] for h in tasks[: tasks.index(t)])
        out[t] = {
            "per_task": float((own == y).float().mean()),
            "joint": float((cat.argmax(-1) == y + offset).float().mean()),
        }
    return out


def evaluate_merged(
    backbone: Mapping[str, torch.Tensor],
    heads: Mapping[str, Mapping[str, torch.Tensor]],
    arch: Architecture,
    data: TestSet,
) -> dict[str, dict[str, float]]:
    """Per-task and joint accuracy of one merged backbone with every task's (adapted) head."""
    model = build_model(arch, 0)
    model.load_state_dict(dict(backbone), strict=True)
    logits = {}
    for t, (x, _) in data.items():
        f = pre_logits(model, x)
        logits[t] = {
            h: F.linear(f, head["head.weight"].float(), head["head.bias"].float()) for h, head in heads.items()
        }
    return _score(logits, data)


def evaluate_ensemble(zoo: Zoo, tasks: Sequence[str], data: TestSet) -> dict[str, dict[str, float]]:
    """The output ensemble: every original model with its own head, arg-max over all of them."""
    models = {t: zoo.build_model(t) for t in tasks}
    logits = {}
    with torch.inference_mode():
        for t, (x, _) in data.items():
            logits[t] = {h: torch.cat([m(x[i : i + 512]) for i in range(0, len(x), 512)]) for h, m in models.items()}
    return _score(logits, data)


def summary(scores: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """Mean per-task and joint accuracy over tasks."""
    n = len(scores)
    return {
        "per_task": sum(s["per_task"] for s in scores.values()) / n,
        "joint": sum(s["joint"] for s in scores.values()) / n,
    }
