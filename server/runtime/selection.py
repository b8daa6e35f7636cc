"""Settings chosen without labels (SPEC section 9): the measurement of a candidate bundle through the Engine.

``vitmerge merge ... --target-agreement 0.995`` and the admin merge API's ``target_agreement`` run
:func:`merging.pipeline.select_and_publish` with :class:`HeldOutAgreement` as its ``measure``. Every task's
calibration images are split, seeded, into a part the merge fits on (gates, routers, Grams and Fisher read only
that) and a held-out part (20% by default); each candidate of the grid (``f``, ``bits``, ``router_k``) is
loaded into the serving :class:`~server.runtime.engine.Engine` and measured on the held-out part: its top-1
agreement with each task's own model -- routed (the bundle's router picks the task) when the bundle has a
router, else with the task given. No label and no test image is read. Each task's own model runs once on its
held-out images, whatever the size of the grid.
"""

from __future__ import annotations

import torch

from model_store.bundle import Bundle
from model_store.data.attach import held_out_set
from model_store.data.sources import Holdout, ImageSet
from model_store.schema import TaskAgreement
from model_store.zoo import Zoo
from server.runtime.agreement import reference_log_probs, task_agreement
from server.runtime.engine import Engine


class HeldOutAgreement:
    """A selection ``measure``: a bundle's agreement with each of its tasks' own models on that task's held-out
    calibration images (the split of ``holdout``); the images and the own models' outputs are made once."""

    def __init__(self, zoo: Zoo, holdout: Holdout | None = None, device: str = "cpu"):
        self.zoo, self.holdout, self.device = zoo, holdout or Holdout(), device
        self._held: dict[str, tuple[ImageSet, torch.Tensor]] = {}

    def images(self, task: str) -> tuple[ImageSet, torch.Tensor]:
        """The task's held-out calibration images and its own model's log-probabilities on them."""
        if task not in self._held:
            images = held_out_set(self.zoo, task, self.holdout)
            self._held[task] = images, reference_log_probs(self.zoo, task, images, None)
        return self._held[task]

    def __call__(self, bundle: Bundle) -> list[TaskAgreement]:
        engine = Engine(bundle, self.device)
        rows = []
        for task in engine.tasks:
            images, reference = self.images(task)
            rows.append(
                task_agreement(
                    engine, self.zoo, task, None, images=(images, "calibration_holdout"), reference=reference
                )
            )
        return rows
