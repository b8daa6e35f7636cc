"""Label-free agreement: how often a bundle answers like the user's own fine-tuned models (issue 33).

Part of the runtime because admin merges record it before publishing (server.http.merge_process): it runs
only the Engine and the zoo's own models, never training code.

For every task, on that task's images (its test images, else its calibration images -- no labels are
read), the share where the served top-1 equals the individual model's top-1: with the task given, and
routed (the image must also be routed to its task), plus the mean KL(individual || served) of the class
probabilities. The individual model runs with its own preprocessing; the bundle runs through the
serving :class:`~server.runtime.engine.Engine` exactly as the server does. "The merged model answers
like yours on 99.3% of your images" is the number a user with unlabeled data can check.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from tqdm.auto import tqdm

from model_store.bundle import Bundle
from model_store.data.attach import calibration_set, test_set
from model_store.data.preprocessing import to_model_input
from model_store.data.sources import ImageSet
from model_store.schema import TaskAgreement
from model_store.zoo import Zoo
from server.runtime.engine import Engine
from server.runtime.protocol import ImageOutput

#: images per task the merge-time agreement reads (the first of the source's seeded order)
DEFAULT_AGREEMENT_IMAGES = 256


#: Which images an agreement was measured on (a task's test images, its calibration images, or the
#: held-out part of its calibration images that label-free selection reads).
Split = Literal["test", "calibration", "calibration_holdout"]


def agreement_images(zoo: Zoo, task: str) -> tuple[ImageSet | None, Split]:
    """The task's test images, else its calibration images (None when it has neither)."""
    test = test_set(zoo, task)
    return (test, "test") if test is not None else (calibration_set(zoo, task), "calibration")


def _kl(ref_logp: torch.Tensor, served: torch.Tensor) -> torch.Tensor:
    """Per-row KL(ref || served) with ``served`` given as probabilities."""
    return (ref_logp.exp() * (ref_logp - served.clamp_min(1e-12).log())).sum(-1)


def summarise_agreement(
    task: str,
    split: Split,
    index: int,
    reference: torch.Tensor,
    given: Sequence[ImageOutput] | None,
    routed: Sequence[ImageOutput] | None,
) -> TaskAgreement:
    """Agreement of served outputs with the task model's log-probabilities ``reference`` (one row per image):
    ``given`` with the task named, ``routed`` with the image routed (it must reach task ``index``); None: that
    pass was not made (a bundle without a gate has no routed one)."""
    n = len(reference)
    if n == 0:
        return TaskAgreement(task=task, split=split, images=0)
    top = reference.argmax(-1)
    top1_given = kl_given = top1_routed = kl_routed = None
    if given is not None:
        served = torch.stack([o.probabilities for o in given])
        top1_given = float((served.argmax(-1) == top).float().mean())
        kl_given = max(float(_kl(reference, served).mean()), 0.0)
    if routed is not None:
        here = [j for j, o in enumerate(routed) if o.task == index]
        top1_routed = 0.0
        if here:
            probs = torch.stack([routed[j].probabilities for j in here])
            top1_routed = int((probs.argmax(-1) == top[here]).sum()) / n
            kl_routed = max(float(_kl(reference[here], probs).mean()), 0.0)
    return TaskAgreement(
        task=task,
        split=split,
        images=n,
        top1_given=top1_given,
        kl_given=kl_given,
        top1_routed=top1_routed,
        kl_routed=kl_routed,
    )


@torch.inference_mode()
def reference_log_probs(zoo: Zoo, task: str, images: ImageSet, limit: int | None, batch_size: int = 64) -> torch.Tensor:
    """The zoo's own model of ``task`` on the first ``limit`` of ``images``: class log-probabilities ``(n, C)``."""
    model = zoo.build_model(task).eval()
    prep = zoo.metas[task].preprocessing
    outs = [model(to_model_input(chunk, prep)).float().log_softmax(-1) for chunk in images.chunks(limit, batch_size)]
    return torch.cat(outs) if outs else torch.empty(0, zoo.metas[task].num_classes)


@torch.inference_mode()
def task_agreement(
    engine: Engine,
    zoo: Zoo,
    task: str,
    limit: int | None = DEFAULT_AGREEMENT_IMAGES,
    batch_size: int = 64,
    images: tuple[ImageSet | None, Split] | None = None,
    reference: torch.Tensor | None = None,
) -> TaskAgreement:
    """Agreement of ``engine``'s bundle with the zoo's model of ``task`` on the task's first ``limit`` images.

    ``images``: these images and what they are (default: :func:`agreement_images`); ``reference``: the zoo
    model's :func:`reference_log_probs` on them, when already computed (a grid of bundles measured on the
    same images runs the individual model once).
    """
    chosen, split = images if images is not None else agreement_images(zoo, task)
    if chosen is None:
        return TaskAgreement(task=task, split=split, images=0)
    i = engine.task_index(task)
    refs = reference if reference is not None else reference_log_probs(zoo, task, chosen, limit, batch_size)
    given: list[ImageOutput] = []
    routed: list[ImageOutput] | None = [] if engine.has_gate else None
    for chunk in chosen.chunks(limit, batch_size):
        x, _ = engine.prepare(chunk, i)
        given += engine.predict(x, [i] * len(x))
        if routed is not None:
            x, gate = engine.prepare(chunk, None)
            routed += engine.predict(x, [None] * len(x), gate)
    return summarise_agreement(task, split, i, refs[: len(given)], given, routed)


def measure_agreement(
    engine: Engine, zoo: Zoo, limit: int | None = DEFAULT_AGREEMENT_IMAGES, progress: bool = False
) -> list[TaskAgreement]:
    """:func:`task_agreement` for every task of the bundle."""
    return [task_agreement(engine, zoo, t, limit) for t in tqdm(engine.tasks, desc="agreement", disable=not progress)]


def agreement_review(zoo: Zoo, limit: int | None = DEFAULT_AGREEMENT_IMAGES) -> Callable[[Bundle], dict[str, Any]]:
    """A merge pipeline ``review`` hook: the unpublished bundle's agreement, for its manifest's ``extra``."""

    def review(bundle: Bundle) -> dict[str, Any]:
        rows = measure_agreement(Engine(bundle, "cpu"), zoo, limit)
        return {"agreement": [r.model_dump(mode="json") for r in rows]}

    return review


def recorded_agreement(bundle: Bundle) -> list[TaskAgreement] | None:
    """The agreement a bundle's manifest recorded at merge time (None: not measured)."""
    return bundle.manifest.extra.agreement


def format_agreement(rows: list[TaskAgreement]) -> str:
    """Markdown table: per task the images read, top-1 agreement and KL, task given and routed."""

    def pct(v: float | None) -> str:
        return "n/a" if v is None else f"{100 * v:.1f}%"

    def kl(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.4f}"

    lines = [
        "| task | images | top-1 agrees (task given) | top-1 agrees (routed) | KL given | KL routed |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.task} | {r.images} {r.split} | {pct(r.top1_given)} | {pct(r.top1_routed)} | {kl(r.kl_given)} "
            f"| {kl(r.kl_routed)} |"
        )
    return "\n".join(lines)
