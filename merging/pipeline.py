"""Zoo -> merge method -> published bundle (used by `vitmerge merge` and the admin API).

Data flows one way: the zoo's backbones are opened lazily (one tensor per model at a
time), the registry's pure function merges them, the result is written into a
bundle draft and published atomically. Any failure discards the draft: the store
and its ``CURRENT`` stay as they were.

Bundle files (``model.json``'s ``bundle_format`` 2):

* ``model.json``        the typed :class:`~model_store.schema.BundleSpec`: kind (static | emr | gated |
  lowrank), architecture, preprocessing (and each task's own where it differs), tasks + classes,
  EMR rescalers, gating plan, low-rank ranks, gate (or backbone router) config and accuracy
* ``heads.safetensors`` every task's classifier, keys ``<task>/<tensor>``
* static: ``backbone.safetensors``
* emr: ``base.safetensors`` (theta_0), ``tau_unified.safetensors``,
  ``masks.safetensors`` (bit-packed uint8, keys ``<task>/<tensor>``)
* gated: ``backbone.safetensors`` (non-gated tensors), ``experts.safetensors``
  (``(N, ...)`` stacks of the gated tensors)
* lowrank: ``backbone.safetensors`` (``W_0`` of matrix layers), ``factors.safetensors`` (``B``, ``A``
  stacks; quantized: their codes and ``.scale`` stacks, ``model.json``'s ``bundle_format`` 3),
  ``experts.safetensors`` (every task's small tensors); with a backbone router's shared prefix,
  ``backbone`` also holds ``theta_0``'s embeddings and blocks ``1..k`` (no factors or experts there)
* with a gate: ``gate.safetensors``; with a backbone router: ``router.safetensors`` (its head and the
  prefix tensors of ``theta_0`` the bundle does not hold otherwise; :class:`~model_store.schema.BundleRouterSpec`)
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from merging.gating.router import gate_probabilities
from merging.method_index import REGISTRY, get_method, parse_params, refusal, run_merge
from merging.methods.tsv import LowRankDeltas
from merging.registry import GateArtifact, MergeCache, MergeContext, MergeResult, Params, RouterArtifact
from merging.selection import SelectionError, choose, rank, selection_grid
from merging.types import Tensors
from model_store.architecture import build_gate, build_model, load_into
from model_store.backbone_router import BackboneRouter, RouterHead, ViTPrefix, prefix_keys
from model_store.bundle import Bundle, BundleDraft, BundleStore
from model_store.data.attach import calibration_set, held_out_set, test_set
from model_store.data.sources import Holdout, ImageSet
from model_store.errors import MissingDataError
from model_store.importers.efficientnet_lite0 import efficientnet_lite0_state
from model_store.quantize import quantize_rows
from model_store.schema import (
    BUNDLE_FORMAT,
    QUANTIZED_BUNDLE_FORMAT,
    BundleGateSpec,
    BundleKind,
    BundleRouterSpec,
    BundleSpec,
    BundleTask,
    CandidateRecord,
    EMRSpec,
    GatingSpec,
    LowRankSpec,
    ManifestExtra,
    Preprocessing,
    SelectionRecord,
    TaskAgreement,
    TaskDataRecord,
)
from model_store.stored_bytes import stored_bytes
from model_store.zoo import Zoo


class _Ticking(Mapping[str, torch.Tensor]):
    """A mapping that advances a progress bar on every tensor read."""

    def __init__(self, inner: Tensors, bar: tqdm):
        self.inner, self.bar = inner, bar

    def __getitem__(self, key: str) -> torch.Tensor:
        self.bar.update(1)
        return self.inner[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.inner)

    def __len__(self) -> int:
        return len(self.inner)


@dataclass
class MergeOutcome:
    """A published merge: its version, what the method returned, the tasks, and the method's run time."""

    version: str
    result: MergeResult
    tasks: list[str]
    merge_seconds: float = 0.0


def select_tasks(zoo: Zoo, tasks: Sequence[str] | None) -> list[str]:
    """The zoo's tasks, or the requested subset (validated)."""
    if not tasks:
        return zoo.tasks
    unknown = [t for t in tasks if t not in zoo.tasks]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; the zoo has {zoo.tasks}")
    if len(set(tasks)) != len(tasks):
        raise ValueError("tasks must be unique")
    return list(tasks)


def shares_init(zoo: Zoo, tasks: Sequence[str] | None = None) -> bool:
    """Whether the task models come from one pretrained base (manifest flag and recorded init seeds)."""
    seeds = {zoo.metas[t].provenance.init_seed for t in (tasks or zoo.tasks)} - {None}
    return zoo.manifest.shared_init and len(seeds) <= 1


def check_applicable(zoo: Zoo, method: str, tasks: Sequence[str] | None = None) -> None:
    """ValueError when ``method`` needs a shared base that the zoo's models do not have."""
    if get_method(method).needs_shared_base and not shares_init(zoo, tasks):
        raise ValueError(refusal(method))


def check_data(zoo: Zoo, method: str, tasks: Sequence[str] | None = None) -> None:
    """MissingDataError naming the task and the fix when ``method`` needs calibration images a task lacks."""
    if not get_method(method).needs_calibration:
        return
    for task in tasks or zoo.tasks:
        if zoo.task_data(task).calibration is None:
            raise MissingDataError(
                f"merge method '{method}' needs calibration images, but task '{task}' of zoo '{zoo.name}' has none; "
                "add them with 'calibration:' for that task in the zoo spec, "
                f"`vitmerge zoo data --zoo {zoo.name} --task {task} --calibration SRC`, "
                f"or --calibration on `vitmerge import`; data-free methods: "
                + ", ".join(sorted(n for n, m in REGISTRY.items() if not m.needs_calibration))
            )
        if zoo.task_data(task).calibration.kind != "builtin":  # type: ignore[union-attr]
            calibration_set(zoo, task)  # lists the files now: a missing folder fails before any work


def merge_context(
    zoo: Zoo,
    tasks: Sequence[str],
    bar: tqdm | None = None,
    progress: bool = False,
    cache: MergeCache | None = None,
    holdout: Holdout | None = None,
) -> MergeContext:
    """Lazy backbones of the zoo plus calibration access for data-dependent methods.

    Calibration images come from each task's calibration source; only the ``limit``
    images a method asks for are decoded. With ``holdout`` the held-out part of each
    task's calibration images is left out (label-free selection measures on it). For zoos
    without a shared base, ``pretrained`` is the manifest's base (the first model's own
    pretraining) and ``shared_init`` is False: task-vector methods refuse. ``cache``: gates and Gram
    matrices shared with other merges of the same zoo (never with ``holdout``: what it holds was fit on
    every calibration image).
    """
    if cache is not None and holdout is not None:
        raise ValueError("a merge with a held-out calibration part cannot share a cache fit on every image")
    finetuned: list[Tensors] = [zoo.backbone_lazy(t) for t in tasks]
    if bar is not None:
        finetuned[0] = _Ticking(finetuned[0], bar)
    sets: dict[int, ImageSet] = {}

    def build(i: int, backbone: Tensors) -> torch.nn.Module:
        meta = zoo.metas[tasks[i]]
        model = build_model(meta.architecture, meta.num_classes)
        return load_into(model, dict(backbone.items()), zoo.head(tasks[i])).eval()

    def calibration(i: int, prep: Preprocessing | None = None, limit: int | None = None) -> torch.Tensor:
        if i not in sets:
            images = calibration_set(zoo, tasks[i])
            if images is None:
                raise MissingDataError(
                    f"task '{tasks[i]}' has no calibration images "
                    f"(`vitmerge zoo data --task {tasks[i]} --calibration SRC`)"
                )
            sets[i] = holdout.split(images)[0] if holdout is not None else images
        return sets[i].tensors(prep or zoo.metas[tasks[i]].preprocessing, limit)

    return MergeContext(
        zoo.backbone_lazy(zoo.base),
        finetuned,
        list(tasks),
        build,
        calibration,
        lambda arch: gate_init(arch, zoo),
        progress,
        heads=[zoo.head(t) for t in tasks],
        shared_init=shares_init(zoo, tasks),
        cache=cache,
        base_preprocessing=zoo.metas[zoo.base].preprocessing if zoo.base else None,
    )


def gate_init(arch: str, zoo: Zoo | None = None) -> dict[str, torch.Tensor] | None:
    """Pretrained gate weights: the zoo's own (zoo spec ``gate.init``), else those offline (EfficientNet-Lite0)."""
    gate = zoo.manifest.gate if zoo is not None else None
    if gate is not None and gate.arch == arch and gate.file:
        from safetensors.torch import load_file

        return load_file(zoo.root / gate.file)  # type: ignore[union-attr]
    if arch == "efficientnet_lite0":
        return efficientnet_lite0_state()
    return None


def with_zoo_defaults(zoo: Zoo, method: str, params: dict[str, Any] | None) -> dict[str, Any]:
    """``params`` plus the zoo's gate architecture (zoo spec ``gate.arch``) unless the caller chose one."""
    out = dict(params or {})
    if zoo.manifest.gate is not None and "gate_arch" in get_method(method).params.model_fields:
        out.setdefault("gate_arch", zoo.manifest.gate.arch)
    return out


def routing_test_accuracy(
    route: Callable[[torch.Tensor], torch.Tensor],
    prep: Preprocessing,
    zoo: Zoo,
    tasks: Sequence[str],
    limit: int | None = None,
) -> dict[str, float | None]:
    """Share of each task's TEST images (the first ``limit``, preprocessed with ``prep``) that ``route`` (images
    -> task index per image) sends to that task (None: the task has no test images)."""
    out: dict[str, float | None] = {}
    for i, task in enumerate(tasks):
        images = test_set(zoo, task)
        x = images.tensors(prep, limit) if images is not None else None
        if x is None or len(x) == 0:
            out[task] = None
            continue
        picked = torch.cat([route(chunk) for chunk in x.split(256)])
        out[task] = float((picked == i).float().mean())
    return out


@torch.inference_mode()
def gate_test_accuracy(
    gate: GateArtifact, zoo: Zoo, tasks: Sequence[str], limit: int | None = None
) -> dict[str, float | None]:
    """:func:`routing_test_accuracy` of a CNN gate (reading its own input preprocessing)."""
    model = build_gate(gate.arch, len(tasks))
    model.load_state_dict(gate.state)
    return routing_test_accuracy(
        lambda x: gate_probabilities(model, x).argmax(-1), gate.preprocessing, zoo, tasks, limit
    )


@torch.inference_mode()
def router_test_accuracy(
    router: RouterArtifact, zoo: Zoo, tasks: Sequence[str], limit: int | None = None
) -> dict[str, float | None]:
    """:func:`routing_test_accuracy` of a backbone router: ``theta_0`` is the zoo's base, the input its
    preprocessing."""
    base = zoo.metas[zoo.base]
    model = BackboneRouter(
        ViTPrefix(base.architecture, router.k, dict(zoo.backbone(zoo.base))), RouterHead.from_state(router.head)
    )
    return routing_test_accuracy(lambda x: model(x).argmax(-1), base.preprocessing, zoo, tasks, limit)


def write_router(
    draft: BundleDraft,
    zoo: Zoo,
    kind: BundleKind,
    router: RouterArtifact,
    theta0: Tensors,
    test_accuracy: dict[str, float | None] | None = None,
) -> BundleRouterSpec:
    """Write ``router.safetensors``: the head (``head/<name>``) and ``theta0/<key>`` for each of ``theta_0``'s
    prefix tensors that ``theta0`` (what the bundle's ``base`` (emr) or ``backbone`` (lowrank) file holds of
    ``theta_0``) lacks."""
    base = zoo.backbone(zoo.base)
    theta0_file = {"emr": "base", "lowrank": "backbone"}.get(kind)
    held = set(theta0) if theta0_file is not None else set()
    missing = [k for k in prefix_keys(list(base), router.k) if k not in held]
    tensors = {f"head/{k}": v for k, v in router.head.items()}
    tensors |= {f"theta0/{k}": base[k].float() for k in missing}
    draft.add_tensors("router", tensors)
    return BundleRouterSpec(
        k=router.k,
        variant=router.variant,
        hidden=router.hidden,
        theta0_file=theta0_file,
        holdout_accuracy=router.holdout_accuracy,
        epochs_run=router.epochs_run,
        calibration_images=router.calibration_images,
        test_accuracy=test_accuracy or {},
    )


def data_record(
    zoo: Zoo, tasks: Sequence[str], calibrated: bool, holdout: Holdout | None = None
) -> dict[str, TaskDataRecord]:
    """Per task: the calibration set a merge read (when it read one; with ``holdout``, how it was split) and
    the test set, with file-list hashes."""
    out: dict[str, TaskDataRecord] = {}
    for task in tasks:
        cal = calibration_set(zoo, task) if calibrated or holdout is not None else None
        test = test_set(zoo, task)
        out[task] = TaskDataRecord(
            calibration=cal.record() if cal is not None else None,
            holdout=holdout.record(cal) if cal is not None and holdout is not None else None,
            test=test.record() if test is not None else None,
        )
    return out


def bundle_kind(result: MergeResult) -> BundleKind:
    if result.emr is not None:
        return "emr"
    if result.lowrank is not None:
        return "lowrank"
    if result.experts is not None:
        return "gated"
    if result.backbone is not None:
        return "static"
    raise ValueError("merge produced neither a backbone, EMR modulators nor experts")


def write_lowrank(draft: BundleDraft, deltas: LowRankDeltas) -> LowRankSpec:
    """Write ``backbone`` (``W_0`` of matrix layers), ``factors`` (stacked ``B``, ``A``; at ``deltas.bits`` < 32
    their per-row codes and ``.scale`` stacks), ``experts`` (small ones)."""
    keys = deltas.matrix_keys
    shared = {k: v.float().contiguous() for k, v in deltas.shared.items()}  # a shared prefix: theta_0 as it is
    draft.add_tensors("backbone", {**{k: deltas.pretrained[k].float().contiguous() for k in keys}, **shared})
    factors: dict[str, torch.Tensor] = {}
    for k in keys:
        for i, name in enumerate(("B", "A")):
            stack = torch.stack([task[k][i] for task in deltas.factors])
            if deltas.bits == 32:
                factors[f"{k}.{name}"] = stack
            else:
                factors[f"{k}.{name}"], factors[f"{k}.{name}.scale"] = quantize_rows(stack, deltas.bits)
    draft.add_tensors("factors", factors)
    small_keys = list(deltas.small[0])
    draft.add_tensors("experts", {k: torch.stack([task[k] for task in deltas.small]) for k in small_keys})
    source = "lora" if deltas.source == "lora" else "tsv_c"
    layout = "two per byte, even column in the low nibble, two's complement" if deltas.bits == 4 else None
    return LowRankSpec(
        ranks=dict(deltas.ranks),
        rank_fraction=deltas.rank_fraction,
        source=source,
        bits=deltas.bits,
        int4_layout=layout,
    )


def own_preprocessing(zoo: Zoo, task: str) -> Preprocessing | None:
    """The task model's preprocessing when it turns images into other tensors than the base's (else None):
    a task is served with its own, never silently with the base's."""
    mine, base = zoo.metas[task].preprocessing, zoo.metas[zoo.base].preprocessing
    return None if mine.pixels_equal(base) else mine


def write_bundle(
    draft: BundleDraft,
    zoo: Zoo,
    tasks: Sequence[str],
    result: MergeResult,
    gate_accuracy: dict[str, float | None] | None = None,
) -> None:
    """Write a merge result and the task heads into ``draft``."""
    base_meta = zoo.metas[zoo.base]
    heads = dict(zip(tasks, result.heads)) if result.heads is not None else {t: zoo.head(t) for t in tasks}
    draft.add_tensors("heads", {f"{t}/{k}": v for t in tasks for k, v in heads[t].items()})
    emr = gating = gate = lowrank = router = None
    theta0: Tensors = {}  # what the bundle holds of theta_0 under its own names (a router's prefix reads it)
    if result.emr is not None:
        theta0 = dict(zoo.backbone(zoo.base))
        draft.add_tensors("base", dict(theta0))
        draft.add_tensors("tau_unified", result.emr.tau_unified)
        draft.add_tensors(
            "masks", {f"{t}/{k}": v for t, packed in zip(tasks, result.emr.packed_masks) for k, v in packed.items()}
        )
        emr = EMRSpec(rescalers=dict(zip(tasks, result.emr.rescalers)))
    if result.lowrank is not None:
        lowrank = write_lowrank(draft, result.lowrank)
        theta0 = {k: result.lowrank.pretrained[k] for k in result.lowrank.matrix_keys} | result.lowrank.shared
    if result.backbone is not None:
        draft.add_tensors("backbone", result.backbone)
    if result.experts is not None:
        assert result.plan is not None
        draft.add_tensors("experts", result.experts)
        gating = GatingSpec(
            gated_keys=list(result.plan.gated_keys),
            attn_blocks=list(result.plan.attn_blocks),
            mlp_blocks=list(result.plan.mlp_blocks),
        )
    if result.gate is not None:
        art = result.gate
        draft.add_tensors("gate", art.state)
        gate = BundleGateSpec(
            arch=art.arch,
            preprocessing=art.preprocessing,
            holdout_accuracy=art.holdout_accuracy,
            epochs_run=art.epochs_run,
            test_accuracy=gate_accuracy or {},
        )
    if result.router is not None:
        router = write_router(draft, zoo, bundle_kind(result), result.router, theta0, gate_accuracy)
    spec = BundleSpec(
        bundle_format=QUANTIZED_BUNDLE_FORMAT if lowrank is not None and lowrank.bits != 32 else BUNDLE_FORMAT,
        kind=bundle_kind(result),
        architecture=base_meta.architecture,
        preprocessing=base_meta.preprocessing,
        tasks=[
            BundleTask(
                name=t,
                class_names=zoo.metas[t].class_names,
                individual_test_accuracy=zoo.metas[t].provenance.test_accuracy,
                preprocessing=own_preprocessing(zoo, t),
            )
            for t in tasks
        ],
        emr=emr,
        lowrank=lowrank,
        gating=gating,
        gate=gate,
        router=router,
    )
    draft.add_json("model", spec.model_dump(mode="json"))


@dataclass
class MergePlan:
    """A checked merge of one zoo: the method, its raw parameters (zoo defaults filled in), the tasks, and
    the context every candidate of it merges from (lazy backbones, calibration access, ``memo``)."""

    zoo: Zoo
    method: str
    params: dict[str, Any]
    tasks: list[str]
    ctx: MergeContext
    holdout: Holdout | None = None


@dataclass
class Candidate:
    """A merge written into an unpublished draft."""

    draft: BundleDraft
    result: MergeResult
    params: Params
    seconds: float = 0.0  # the method's run time

    def preview(self, plan: MergePlan) -> Bundle:
        return self.draft.preview(plan.method, self.params.model_dump(), plan.tasks)


def plan_merge(
    zoo: Zoo,
    method: str,
    params: dict[str, Any] | None = None,
    tasks: Sequence[str] | None = None,
    progress: bool = False,
    bar: Any = None,
    holdout: Holdout | None = None,
    cache: MergeCache | None = None,
) -> MergePlan:
    """Check ``method``, its parameters and the tasks against ``zoo`` (a clear error before any work) and open
    the merge context; with ``holdout`` the context's calibration access leaves each task's held-out part out;
    ``cache``: gates and Gram matrices shared with other merges of the zoo (not with ``holdout``)."""
    spec = get_method(method)
    raw = with_zoo_defaults(zoo, spec.name, params)
    parse_params(spec.name, raw)
    chosen = select_tasks(zoo, tasks)
    check_applicable(zoo, spec.name, chosen)
    check_data(zoo, spec.name, chosen)
    ctx = merge_context(zoo, chosen, bar=bar, progress=progress, cache=cache, holdout=holdout)
    return MergePlan(zoo, spec.name, raw, chosen, ctx, holdout)


def build_candidate(plan: MergePlan, store: BundleStore, overrides: dict[str, Any] | None = None) -> Candidate:
    """Merge ``plan`` with ``overrides`` on its parameters and write the bundle into a new draft (not published;
    the gate's test accuracy is not measured: nothing here reads test images)."""
    parsed = parse_params(plan.method, {**plan.params, **(overrides or {})})
    start = time.perf_counter()
    result = run_merge(plan.method, plan.ctx, parsed)
    seconds = time.perf_counter() - start
    draft = store.draft()
    try:
        write_bundle(draft, plan.zoo, plan.tasks, result)
    except BaseException:
        draft.discard()
        raise
    return Candidate(draft, result, parsed, seconds)


def _record_gate_accuracy(draft: BundleDraft, accuracy: dict[str, float | None]) -> None:
    """Write the gate's (or the backbone router's) test accuracy into the draft's ``model.json``."""
    spec = BundleSpec.model_validate(json.loads((draft.path / "model.json").read_text()))
    routing = spec.gate if spec.gate is not None else spec.router
    assert routing is not None
    routing.test_accuracy = accuracy
    draft.add_json("model", spec.model_dump(mode="json"))


def publish_candidate(
    plan: MergePlan,
    store: BundleStore,
    candidate: Candidate,
    make_current: bool = True,
    review: Callable[[Bundle], dict[str, Any]] | None = None,
    extra: dict[str, Any] | None = None,
) -> MergeOutcome:
    """Publish a candidate: its gate's routing accuracy on test images (a report), ``review``'s entries, the data
    record and the stored bytes go into the bundle; when anything raises, the draft is discarded."""
    result, parsed = candidate.result, candidate.params
    try:
        test_images = getattr(parsed, "gate_test_images", None)
        gate_acc = None
        if result.gate is not None and test_images != 0:
            gate_acc = gate_test_accuracy(result.gate, plan.zoo, plan.tasks, test_images)
            _record_gate_accuracy(candidate.draft, gate_acc)
        elif result.router is not None and test_images != 0:
            gate_acc = router_test_accuracy(result.router, plan.zoo, plan.tasks, test_images)
            _record_gate_accuracy(candidate.draft, gate_acc)
        accuracy_key = "gate_test_accuracy" if result.gate is not None else "router_test_accuracy"
        reviewed = review(candidate.preview(plan)) if review is not None else {}
        data = data_record(plan.zoo, plan.tasks, get_method(plan.method).needs_calibration, plan.holdout)
        manifest_extra = ManifestExtra.model_validate(
            {
                **result.info.model_dump(exclude_none=True),
                **reviewed,
                "data": data,
                accuracy_key: gate_acc,
                "stored_bytes": stored_bytes(candidate.preview(plan)),
                **(extra or {}),
            }
        )
    except BaseException:
        candidate.draft.discard()
        raise
    zoo_info = {"name": plan.zoo.name, "path": str(plan.zoo.root), "hashes": plan.zoo.file_hashes()}
    version = store.publish(
        candidate.draft,
        plan.method,
        parsed.model_dump(),
        zoo=zoo_info,
        tasks=plan.tasks,
        extra=manifest_extra,
        make_current=make_current,
    )
    return MergeOutcome(version, result, plan.tasks, candidate.seconds)


def merge_and_publish(
    zoo: Zoo,
    store: BundleStore,
    method: str,
    params: dict[str, Any] | None = None,
    tasks: Sequence[str] | None = None,
    progress: bool = True,
    make_current: bool = True,
    bar: Any = None,
    review: Callable[[Bundle], dict[str, Any]] | None = None,
    cache: MergeCache | None = None,
) -> MergeOutcome:
    """Merge ``zoo`` with ``method`` and publish the bundle; returns its version.

    ``bar`` (anything with ``update(n)``, e.g. a job's progress) replaces the tqdm bar. ``review`` sees the
    written, unpublished bundle and returns entries for its manifest's ``extra`` (the serving layer's
    agreement with the individual models); when it raises, nothing is published. ``cache``: gates and Gram
    matrices shared with other merges of the same zoo (the accuracy benchmark).
    """
    with tqdm(desc=f"merge {method}", unit="tensor", disable=not progress or bar is not None) as tbar:
        plan = plan_merge(zoo, method, params, tasks, progress, bar if bar is not None else tbar, cache=cache)
        candidate = build_candidate(plan, store)
    return publish_candidate(plan, store, candidate, make_current, review)


#: Label-free selection's measurement of a candidate (the serving layer's: :mod:`server.runtime.selection`):
#: each task's agreement with its own model on that task's held-out calibration images.
MeasureAgreement = Callable[[Bundle], list[TaskAgreement]]
#: Called with every measured candidate (its swept parameters, the draft bundle, its record): a benchmark
#: measures more on it (e.g. test accuracy), after the choice-relevant numbers are recorded.
OnCandidate = Callable[[dict[str, Any], Bundle, CandidateRecord], None]


def candidate_record(
    overrides: dict[str, Any], bundle: Bundle, rows: list[TaskAgreement], target: float
) -> CandidateRecord:
    """A measured candidate: its stored bytes and its worst task's agreement (routed when the bundle routes,
    else with the task given) against ``target``."""
    size = stored_bytes(bundle)
    routed = any(r.top1_routed is not None for r in rows)
    values = [(r.top1_routed if routed else r.top1_given) or 0.0 for r in rows]
    worst = min(range(len(values)), key=values.__getitem__)
    return CandidateRecord(
        params=overrides,
        stored_bytes=size.total,
        x_one_model=size.x_one_model,
        agreement=rows,
        min_agreement=values[worst],
        worst_task=rows[worst].task,
        meets_target=values[worst] >= target,
    )


def select_and_publish(
    zoo: Zoo,
    store: BundleStore,
    method: str,
    params: dict[str, Any] | None,
    target: float,
    measure: MeasureAgreement,
    grid: Mapping[str, Sequence[Any]] | None = None,
    tasks: Sequence[str] | None = None,
    holdout: Holdout | None = None,
    progress: bool = False,
    make_current: bool = True,
    bar: Any = None,
    review: Callable[[Bundle], dict[str, Any]] | None = None,
    on_candidate: OnCandidate | None = None,
) -> tuple[MergeOutcome, SelectionRecord]:
    """Settings chosen without labels (SPEC section 9): publish the smallest candidate (stored bytes) of a grid
    over the method's ``f`` / ``bits`` / ``router_k`` whose agreement, as ``measure`` gives it on each task's
    held-out calibration images, reaches ``target`` on every task.

    The candidates share one merge context whose calibration access leaves the held-out part out (the gate
    trains once, TSV's SVDs run once at the largest ``f``); no test image is read to choose. The choice, the
    grid with every candidate's bytes and agreement, and the split are recorded in the manifest. Nothing is
    published when no candidate reaches the target (:class:`SelectionError` naming the best reached) or
    anything fails; every draft but the best so far is discarded as soon as it is beaten.
    """
    if not 0.0 < target <= 1.0:
        raise SelectionError(f"the target agreement must be in (0, 1], got {target}")
    holdout = holdout or Holdout()
    plan = plan_merge(zoo, method, params, tasks, progress, bar, holdout)
    axes, overrides = selection_grid(plan.method, plan.params, grid)
    held = {t: len(held_out_set(zoo, t, holdout)) for t in plan.tasks}  # every task has some: checked first
    records: list[CandidateRecord] = []
    best: tuple[Candidate, CandidateRecord] | None = None
    try:
        for over in tqdm(overrides, desc=f"select {plan.method}", disable=not progress):
            candidate = build_candidate(plan, store, over)
            bundle = candidate.preview(plan)
            record = candidate_record(over, bundle, measure(bundle), target)
            records.append(record)
            if on_candidate is not None:
                on_candidate(over, bundle, record)
            if record.meets_target and (best is None or rank(record) < rank(best[1])):
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
        holdout={"fraction": holdout.fraction, "seed": holdout.seed, "images": held},
        grid=axes,
        candidates=records,
        chosen=chosen.params,
    )
    outcome = publish_candidate(plan, store, best[0], make_current, review, extra={"selection": selection})
    return outcome, selection
