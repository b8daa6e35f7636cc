"""Settings chosen without labels (SPEC section 9): the smallest bundle of a grid that answers like the user's models.

``vitmerge merge ... --target-agreement 0.995`` and the admin merge API's ``target_agreement``. Every task's
calibration images are split, seeded, into a part the merge fits on (gates, routers, Grams and Fisher read
only that: :func:`~merging.pipeline.merge_context` with a :class:`~model_store.data.sources.Holdout`) and a
held-out part (20% by default). Over a small grid of the method's parameters (``f``, ``bits``, ``router_k``
where the method has them) each candidate is written into an unpublished draft, loaded into the serving
:class:`~server.runtime.engine.Engine` and measured: its top-1 agreement with each task's own model on that
task's held-out images -- routed (the bundle's router picks the task) when the bundle has a router, else with
the task given. The candidate with the fewest stored bytes whose agreement reaches the target on EVERY task
is published, with the grid (every candidate's bytes and agreement) and the split in its manifest. No test
image is read to choose; a grid where no candidate reaches the target is refused, naming the best reached.

Cheap by construction: the candidates share one merge context, so the gate trains once per gate parameters
and TSV's SVDs run once, at the grid's largest ``f`` (visited first; smaller ones truncate its factors); each
task's own model runs once on its held-out images.

Lives in the runtime (not in ``merging``) because measuring a candidate needs the Engine.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

from pydantic import BaseModel, Field
from tqdm.auto import tqdm

from merging.method_index import get_method, parse_params
from merging.pipeline import Candidate, MergeOutcome, MergePlan, build_candidate, plan_merge, publish_candidate
from model_store.bundle import Bundle, BundleStore
from model_store.data.attach import calibration_set
from model_store.data.sources import Holdout, ImageSet
from model_store.errors import MissingDataError
from model_store.schema import TaskAgreement
from model_store.stored_bytes import stored_bytes
from model_store.zoo import Zoo
from server.runtime.agreement import reference_log_probs, task_agreement
from server.runtime.engine import Engine

#: The parameters a grid may sweep, and the values swept when the caller names none (for the methods that
#: have the parameter): TSV-C's rank fraction, the factors' stored width, and the backbone router's depth.
DEFAULT_GRID: dict[str, tuple[Any, ...]] = {
    "f": (0.02, 0.03, 0.045, 0.06, 0.1),
    "bits": (32, 8, 4),
    "router_k": (1, 2, 3),
}


class SelectionError(ValueError):
    """No candidate of the grid reaches the target agreement (or the grid itself is invalid)."""


class CandidateRecord(BaseModel):
    """One candidate of the grid: its swept parameters, stored bytes and held-out agreement per task."""

    params: dict[str, Any]
    stored_bytes: int = Field(ge=0)
    x_one_model: float = Field(ge=0.0, description="stored bytes as a multiple of one float32 model")
    agreement: list[TaskAgreement]
    min_agreement: float = Field(ge=0.0, le=1.0, description="the worst task's agreement (the selection's measure)")
    worst_task: str
    meets_target: bool


class SelectionRecord(BaseModel):
    """What ``--target-agreement`` chose and why (the bundle manifest's ``extra.selection``)."""

    target_agreement: float = Field(gt=0.0, le=1.0)
    measure: Literal["routed", "given"] = Field(description="top-1 agreement routed, or task given (no router)")
    split: Literal["calibration_holdout"] = "calibration_holdout"
    holdout: dict[str, Any] = Field(description="fraction, seed and held-out images per task")
    grid: dict[str, list[Any]]
    candidates: list[CandidateRecord]
    chosen: dict[str, Any]


#: Called with every measured candidate (its swept parameters, the draft bundle, its record): a benchmark
#: measures more on it (e.g. test accuracy), after the choice-relevant numbers are recorded.
OnCandidate = Callable[[dict[str, Any], Bundle, CandidateRecord], None]


def _sweeps(method: str, params: Mapping[str, Any], axis: str) -> bool:
    """Whether ``axis`` is swept by default for ``method`` with ``params``: the method has it (and a router
    depth only for the backbone router)."""
    fields = get_method(method).params.model_fields
    if axis not in fields:
        return False
    router = params.get("router", fields["router"].default if "router" in fields else None)
    return axis != "router_k" or router != "gate"


def selection_grid(
    method: str, params: Mapping[str, Any], grid: Mapping[str, Sequence[Any]] | None = None
) -> tuple[dict[str, list[Any]], list[dict[str, Any]]]:
    """The grid's axes and its candidates (parameter overrides), largest ``f`` first.

    ``grid`` names axes and values (others of :data:`DEFAULT_GRID` the method has keep their defaults); every
    candidate is validated here, before any work. :class:`SelectionError` for an axis the method lacks, an
    empty axis, a bad value, or a grid of one method without any axis to sweep.
    """
    name = get_method(method).name
    fields = get_method(name).params.model_fields
    axes: dict[str, list[Any]] = {a: list(v) for a, v in DEFAULT_GRID.items() if _sweeps(name, params, a)}
    for axis, values in (grid or {}).items():
        if axis not in fields:
            raise SelectionError(
                f"grid axis '{axis}' is not a parameter of '{name}' (its parameters: {', '.join(fields) or 'none'})"
            )
        if not values:
            raise SelectionError(f"grid axis '{axis}' has no values")
        axes[axis] = list(dict.fromkeys(values))
    if not axes:
        raise SelectionError(
            f"'{name}' has none of the parameters a grid sweeps by default ({', '.join(DEFAULT_GRID)}); name some with "
            "grid axes"
        )
    keys = list(axes)
    candidates = [dict(zip(keys, values)) for values in itertools.product(*axes.values())]
    for c in candidates:
        try:
            parse_params(name, {**params, **c})
        except ValueError as e:
            raise SelectionError(f"grid candidate {c}: {e}") from e
    candidates.sort(key=lambda c: -float(c.get("f") or 0.0))  # the largest f first: its SVDs serve the others
    return axes, candidates


def held_out_images(zoo: Zoo, tasks: Sequence[str], holdout: Holdout) -> dict[str, ImageSet]:
    """Each task's held-out calibration images; a task without calibration images is a clear error."""
    out = {}
    for task in tasks:
        images = calibration_set(zoo, task)
        if images is None:
            raise MissingDataError(
                f"choosing settings without labels needs calibration images for every task; task '{task}' has none "
                f"(`vitmerge zoo data --task {task} --calibration SRC`)"
            )
        out[task] = holdout.split(images)[1]
    return out


def _rank(record: CandidateRecord) -> tuple[int, float]:
    """Fewer stored bytes first; among equal sizes the higher worst-task agreement."""
    return record.stored_bytes, -record.min_agreement


def choose(records: Sequence[CandidateRecord], target: float) -> CandidateRecord:
    """The candidate with the fewest stored bytes that meets ``target`` on every task (ties: the higher worst-task
    agreement, then grid order); :class:`SelectionError` naming the best agreement reached when none does."""
    meeting = [r for r in records if r.meets_target]
    if meeting:
        return min(meeting, key=_rank)
    if not records:
        raise SelectionError("the grid has no candidates")
    best = max(records, key=lambda r: (r.min_agreement, -r.stored_bytes))
    raise SelectionError(
        f"no candidate of the grid reaches agreement {target} on every task's held-out calibration images; the best "
        f"reached {best.min_agreement:.4f} (task '{best.worst_task}') with {best.params} "
        f"({best.x_one_model:.3f}x one model); widen the grid or lower the target"
    )


def measure_candidate(
    plan: MergePlan,
    candidate: Candidate,
    overrides: dict[str, Any],
    held: Mapping[str, ImageSet],
    references: Mapping[str, Any],
    target: float,
    device: str = "cpu",
) -> tuple[CandidateRecord, Bundle]:
    """A candidate draft's stored bytes and held-out agreement through the serving Engine."""
    bundle = candidate.preview(plan)
    size = stored_bytes(bundle)
    engine = Engine(bundle, device)
    rows = [
        task_agreement(engine, plan.zoo, t, None, images=(held[t], "calibration_holdout"), reference=references[t])
        for t in plan.tasks
    ]
    routed = engine.has_gate
    values = [(r.top1_routed if routed else r.top1_given) or 0.0 for r in rows]
    worst = min(range(len(values)), key=values.__getitem__)
    record = CandidateRecord(
        params=overrides,
        stored_bytes=size.total,
        x_one_model=size.x_one_model,
        agreement=rows,
        min_agreement=values[worst],
        worst_task=plan.tasks[worst],
        meets_target=values[worst] >= target,
    )
    return record, bundle


def select_and_publish(
    zoo: Zoo,
    store: BundleStore,
    method: str,
    params: dict[str, Any] | None = None,
    target: float = 0.995,
    grid: Mapping[str, Sequence[Any]] | None = None,
    tasks: Sequence[str] | None = None,
    holdout: Holdout | None = None,
    progress: bool = False,
    make_current: bool = True,
    bar: Any = None,
    review: Callable[[Bundle], dict[str, Any]] | None = None,
    device: str = "cpu",
    on_candidate: OnCandidate | None = None,
) -> tuple[MergeOutcome, SelectionRecord]:
    """Publish the smallest candidate of the grid whose held-out agreement reaches ``target`` on every task.

    Nothing is published when none does (:class:`SelectionError`) or anything fails; every draft but the
    chosen one is discarded as soon as it is beaten.
    """
    if not 0.0 < target <= 1.0:
        raise SelectionError(f"the target agreement must be in (0, 1], got {target}")
    holdout = holdout or Holdout()
    plan = plan_merge(zoo, method, params, tasks, progress, bar, holdout)
    axes, overrides = selection_grid(plan.method, plan.params, grid)
    held = held_out_images(zoo, plan.tasks, holdout)
    references = {t: reference_log_probs(zoo, t, held[t], None) for t in plan.tasks}
    records: list[CandidateRecord] = []
    best: tuple[Candidate, CandidateRecord] | None = None
    try:
        for over in tqdm(overrides, desc=f"select {plan.method}", disable=not progress):
            candidate = build_candidate(plan, store, over)
            record, bundle = measure_candidate(plan, candidate, over, held, references, target, device)
            records.append(record)
            if on_candidate is not None:
                on_candidate(over, bundle, record)
            if record.meets_target and (best is None or _rank(record) < _rank(best[1])):
                if best is not None:
                    best[0].draft.discard()
                best = (candidate, record)
            else:
                candidate.draft.discard()
        chosen = choose(records, target)
    except BaseException:
        if best is not None:
            best[0].draft.discard()
        raise
    assert best is not None and best[1] is chosen
    selection = SelectionRecord(
        target_agreement=target,
        measure="routed" if any(r.top1_routed is not None for r in chosen.agreement) else "given",
        holdout={"fraction": holdout.fraction, "seed": holdout.seed, "images": {t: len(held[t]) for t in plan.tasks}},
        grid=axes,
        candidates=records,
        chosen=chosen.params,
    )
    outcome = publish_candidate(
        plan, store, best[0], make_current, review, extra={"selection": selection.model_dump(mode="json")}
    )
    return outcome, selection


def format_selection(selection: SelectionRecord) -> str:
    """Markdown table of a selection: per candidate its parameters, x one model, worst-task agreement, chosen."""
    lines = [
        f"| candidate | x one model | min {selection.measure} agreement (task) | meets {selection.target_agreement} |",
        "|---|---|---|---|",
    ]
    for r in sorted(selection.candidates, key=lambda r: r.stored_bytes):
        name = ", ".join(f"{k}={v}" for k, v in r.params.items())
        mark = " **chosen**" if r.params == selection.chosen else ""
        lines.append(
            f"| {name}{mark} | {r.x_one_model:.3f} | {100 * r.min_agreement:.2f}% ({r.worst_task}) "
            f"| {'yes' if r.meets_target else 'no'} |"
        )
    return "\n".join(lines)


def check_method_for_selection(method: str) -> None:
    """ValueError when ``method`` has no parameter a grid can sweep (refused before any work)."""
    selection_grid(method, {})
