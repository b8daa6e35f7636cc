"""Grouping a mixed-task batch by task: the one place images are split per task."""

from __future__ import annotations

import torch


def task_groups(tasks: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
    """Task index per image ``(B,)`` -> ``[(task, image indices)]`` in task order (indices on ``tasks``' device)."""
    return [(int(t), (tasks == t).nonzero().flatten()) for t in tasks.unique().tolist()]
