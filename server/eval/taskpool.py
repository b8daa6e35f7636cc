"""The task pool of an evaluation (FusionBench's ``taskpool``, on our abstractions): every task's labeled
TEST images, and the passes that run them through the serving :class:`~server.runtime.engine.Engine`.

* :meth:`TaskPool.given` -- each task's images in chunks, that task named (``vitmerge eval``);
* :meth:`TaskPool.routed` -- every task's images shuffled (seeded) into mixed batches, no task named: the
  bundle's gate routes each image (``vitmerge eval --routed``);
* :meth:`TaskPool.reference` -- each task's own model from the zoo on the same images, with its own
  preprocessing (the "individual" rows, and agreement's reference).

A pass returns, per task, one :class:`~server.runtime.protocol.ImageOutput` per image in the task's own
image order (None: the task has no test images). Accuracy and agreement are read from those outputs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from model_store.data.attach import require_test_set
from model_store.data.builtin import TASKS
from model_store.data.preprocessing import to_model_input
from model_store.data.sources import ImageSet, open_source
from model_store.errors import ZooFormatError
from model_store.schema import DataSource
from model_store.zoo import Zoo
from server.runtime.bundle_reader import BundleReader
from server.runtime.engine import Engine
from server.runtime.protocol import ImageOutput

#: per task: one output per image (None: the task has no test images)
Outputs = dict[str, list[ImageOutput] | None]
Accuracies = dict[str, float | None]


def bundle_test_sets(models: BundleReader) -> dict[str, ImageSet | None]:
    """Each task's labeled test images, from the sources the bundle was made with."""
    records = models.bundle.manifest.extra.data
    out: dict[str, ImageSet | None] = {}
    for task in models.tasks:
        if records is None:  # bundles made before data sources: the built-in split
            source = DataSource(kind="builtin", location=task) if task in TASKS else None
        else:
            rec = records.get(task)
            source = rec.test.source if rec is not None and rec.test is not None else None
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


@dataclass
class TaskPool:
    """Every task's labeled test images (the first ``limit`` of each)."""

    tasks: list[str]
    sets: dict[str, ImageSet | None]
    limit: int | None = None

    @classmethod
    def of_bundle(cls, models: BundleReader, limit: int | None = None) -> TaskPool:
        """The test images the bundle's manifest records (what ``vitmerge eval`` reads)."""
        return cls(list(models.tasks), bundle_test_sets(models), limit)

    @classmethod
    def of_zoo(cls, zoo: Zoo, tasks: Sequence[str], limit: int | None = None, purpose: str = "this") -> TaskPool:
        """The zoo's test sources; refuses a task without test images (naming ``purpose`` and the fix)."""
        return cls(list(tasks), {t: require_test_set(zoo, t, purpose) for t in tasks}, limit)

    def subset(self, tasks: Sequence[str]) -> TaskPool:
        """The same images of ``tasks`` only."""
        return TaskPool(list(tasks), {t: self.sets[t] for t in tasks}, self.limit)

    def labels(self, task: str) -> torch.Tensor:
        images = self.sets[task]
        assert images is not None, f"task '{task}' has no test images"
        return images.label_tensor(self.limit)

    def count(self, task: str) -> int:
        images = self.sets[task]
        return 0 if images is None else images.count(self.limit)

    @torch.inference_mode()
    def given(self, engine: Engine, progress: bool = False) -> Outputs:
        """Each task's images through ``engine`` with that task named, a chunk (256 images) per batch."""
        out: Outputs = {}
        for task in tqdm(self.tasks, desc=f"eval {engine.version}", disable=not progress):
            images, i = self.sets[task], engine.task_index(task)
            if images is None:
                out[task] = None
                continue
            outs: list[ImageOutput] = []
            for chunk in images.chunks(self.limit):
                x, _ = engine.prepare(chunk, i)
                outs += engine.predict(x, [i] * len(x))
            out[task] = outs
        return out

    @torch.inference_mode()
    def routed(self, engine: Engine, batch_size: int = 64, seed: int = 0) -> Outputs:
        """Every task's images shuffled (``seed``) into mixed batches of ``batch_size``, routed by the gate."""
        if engine.gate_preprocessing is None:
            raise ValueError(
                f"bundle {engine.version} has no gate; merge with emr_routed or gating_* for routed evaluation"
            )
        xs, gs, owner = [], [], []
        for task in self.tasks:
            images = self.sets[task]
            if images is None:
                continue
            for chunk in images.chunks(self.limit):
                x, g = engine.prepare(chunk, None)
                assert g is not None
                xs.append(x)
                gs.append(g)
            owner += [task] * images.count(self.limit)
        out: Outputs = {t: None if self.sets[t] is None else [] for t in self.tasks}
        if not xs:
            return out
        x, g = torch.cat(xs), torch.cat(gs)
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
        shuffled: list[ImageOutput] = []
        for start in range(0, len(x), batch_size):
            idx = order[start : start + batch_size]
            shuffled += engine.predict(x[idx], [None] * len(idx), g[idx])
        by_position: list[ImageOutput | None] = [None] * len(x)
        for pos, o in zip(order.tolist(), shuffled):
            by_position[pos] = o
        for task, placed in zip(owner, by_position):
            assert placed is not None
            out[task].append(placed)  # type: ignore[union-attr]
        return out

    @torch.inference_mode()
    def reference(self, zoo: Zoo, progress: bool = False) -> dict[str, torch.Tensor | None]:
        """Each task's own model (from ``zoo``, its own preprocessing) on the same images: log-probabilities."""
        out: dict[str, torch.Tensor | None] = {}
        for task in tqdm(self.tasks, desc="eval individual", disable=not progress):
            images = self.sets[task]
            if images is None or task not in zoo.tasks:
                out[task] = None
                continue
            model, prep = zoo.build_model(task).eval(), zoo.metas[task].preprocessing
            logp = [model(to_model_input(chunk, prep)).float().log_softmax(-1) for chunk in images.chunks(self.limit)]
            out[task] = torch.cat(logp)
        return out

    # -- accuracy -------------------------------------------------------------------
    def given_accuracy(self, outputs: Outputs) -> Accuracies:
        """Share of each task's images whose top-1 class (task named) is the label."""
        return {
            t: None if outs is None else _mean([int(o.probabilities.argmax()) for o in outs], self.labels(t))
            for t, outs in outputs.items()
        }

    def routed_accuracy(self, outputs: Outputs) -> dict[str, dict[str, float] | None]:
        """Per task ``{"gate": share routed to the task, "routed": share routed right AND classified right}``."""
        out: dict[str, dict[str, float] | None] = dict.fromkeys(outputs)
        for t, outs in _have(outputs):
            i, y = self.tasks.index(t), self.labels(t)
            here = torch.tensor([o.task == i for o in outs])
            right = torch.tensor([int(o.probabilities.argmax()) for o in outs]) == y
            out[t] = {"gate": float(here.float().mean()), "routed": float((here & right).float().mean())}
        return out

    def reference_accuracy(self, logp: dict[str, torch.Tensor | None]) -> Accuracies:
        """Share of each task's images its own model classifies right."""
        return {t: None if lp is None else _mean(lp.argmax(-1).tolist(), self.labels(t)) for t, lp in logp.items()}


def _have(outputs: Outputs) -> list[tuple[str, list[ImageOutput]]]:
    return [(t, o) for t, o in outputs.items() if o is not None]


def _mean(pred: list[int], labels: torch.Tensor) -> float:
    return float((torch.tensor(pred, dtype=torch.long) == labels).float().mean())
