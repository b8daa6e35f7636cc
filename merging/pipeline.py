"""Zoo -> merge method -> published bundle (used by `vitmerge merge` and the admin API).

Data flows one way: the zoo's backbones are opened lazily (one tensor per model at a
time), the registry's pure function merges them, the result is written into a
bundle draft and published atomically. Any failure discards the draft: the store
and its ``CURRENT`` stay as they were.

Bundle files (``model.json``'s ``bundle_format`` 2):

* ``model.json``        the typed :class:`~model_store.schema.BundleSpec`: kind (static | emr | gated |
  lowrank), architecture, preprocessing (and each task's own where it differs), tasks + classes,
  EMR rescalers, gating plan, low-rank ranks, gate config and accuracy
* ``heads.safetensors`` every task's classifier, keys ``<task>/<tensor>``
* static: ``backbone.safetensors``
* emr: ``base.safetensors`` (theta_0), ``tau_unified.safetensors``,
  ``masks.safetensors`` (bit-packed uint8, keys ``<task>/<tensor>``)
* gated: ``backbone.safetensors`` (non-gated tensors), ``experts.safetensors``
  (``(N, ...)`` stacks of the gated tensors)
* lowrank: ``backbone.safetensors`` (``W_0`` of matrix layers), ``factors.safetensors`` (``B``, ``A``
  stacks), ``experts.safetensors`` (every task's small tensors)
* with a gate: ``gate.safetensors``
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from merging.gating.router import gate_probabilities
from merging.method_index import REGISTRY, get_method, parse_params, refusal, run_merge
from merging.methods.tsv import LowRankDeltas
from merging.registry import GateArtifact, MergeCache, MergeContext, MergeResult
from merging.types import Tensors
from model_store.architecture import build_gate, build_model, load_into
from model_store.bundle import Bundle, BundleDraft, BundleStore
from model_store.data.attach import calibration_set, test_set
from model_store.data.sources import ImageSet
from model_store.errors import MissingDataError
from model_store.importers.efficientnet_lite0 import efficientnet_lite0_state
from model_store.schema import (
    BundleGateSpec,
    BundleKind,
    BundleSpec,
    BundleTask,
    EMRSpec,
    GatingSpec,
    LowRankSpec,
    ManifestExtra,
    Preprocessing,
    TaskDataRecord,
)
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
    zoo: Zoo, tasks: Sequence[str], bar: tqdm | None = None, progress: bool = False, cache: MergeCache | None = None
) -> MergeContext:
    """Lazy backbones of the zoo plus calibration access for data-dependent methods.

    Calibration images come from each task's calibration source; only the ``limit``
    images a method asks for are decoded. For zoos without a shared base,
    ``pretrained`` is the manifest's base (the first model's own pretraining) and
    ``shared_init`` is False: task-vector methods refuse. ``cache``: gates and Gram matrices shared with
    other merges of the same zoo.
    """
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
            sets[i] = images
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


@torch.inference_mode()
def gate_test_accuracy(
    gate: GateArtifact, zoo: Zoo, tasks: Sequence[str], limit: int | None = None
) -> dict[str, float | None]:
    """Share of each task's TEST images (the first ``limit``) the gate routes to that task
    (None: the task has no test images)."""
    model = build_gate(gate.arch, len(tasks))
    model.load_state_dict(gate.state)
    out: dict[str, float | None] = {}
    for i, task in enumerate(tasks):
        images = test_set(zoo, task)
        if images is None:
            out[task] = None
            continue
        probs = gate_probabilities(model, images.tensors(gate.preprocessing, limit))
        out[task] = float((probs.argmax(-1) == i).float().mean())
    return out


def data_record(zoo: Zoo, tasks: Sequence[str], calibrated: bool) -> dict[str, TaskDataRecord]:
    """Per task: the calibration set a merge read (when it read one) and the test set, with file-list hashes."""
    out: dict[str, TaskDataRecord] = {}
    for task in tasks:
        cal = calibration_set(zoo, task) if calibrated else None
        test = test_set(zoo, task)
        out[task] = TaskDataRecord(
            calibration=cal.record() if cal is not None else None, test=test.record() if test is not None else None
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
    """Write ``backbone`` (``W_0`` of matrix layers), ``factors`` (stacked ``B``, ``A``), ``experts`` (small ones)."""
    keys = deltas.matrix_keys
    draft.add_tensors("backbone", {k: deltas.pretrained[k].float().contiguous() for k in keys})
    factors: dict[str, torch.Tensor] = {}
    for k in keys:
        factors[f"{k}.B"] = torch.stack([task[k][0] for task in deltas.factors])
        factors[f"{k}.A"] = torch.stack([task[k][1] for task in deltas.factors])
    draft.add_tensors("factors", factors)
    small_keys = list(deltas.small[0])
    draft.add_tensors("experts", {k: torch.stack([task[k] for task in deltas.small]) for k in small_keys})
    source = "lora" if deltas.source == "lora" else "tsv_c"
    return LowRankSpec(ranks=dict(deltas.ranks), rank_fraction=deltas.rank_fraction, source=source)


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
    emr = gating = gate = lowrank = None
    if result.emr is not None:
        draft.add_tensors("base", dict(zoo.backbone(zoo.base)))
        draft.add_tensors("tau_unified", result.emr.tau_unified)
        draft.add_tensors(
            "masks", {f"{t}/{k}": v for t, packed in zip(tasks, result.emr.packed_masks) for k, v in packed.items()}
        )
        emr = EMRSpec(rescalers=dict(zip(tasks, result.emr.rescalers)))
    if result.lowrank is not None:
        lowrank = write_lowrank(draft, result.lowrank)
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
    spec = BundleSpec(
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
    )
    draft.add_json("model", spec.model_dump(mode="json"))


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
    spec = get_method(method)
    parsed = parse_params(method, with_zoo_defaults(zoo, spec.name, params))
    chosen = select_tasks(zoo, tasks)
    check_applicable(zoo, spec.name, chosen)
    check_data(zoo, spec.name, chosen)
    start = time.perf_counter()
    if bar is not None:
        result = run_merge(spec.name, merge_context(zoo, chosen, bar, progress, cache), parsed)
    else:
        with tqdm(desc=f"merge {method}", unit="tensor", disable=not progress) as tbar:
            result = run_merge(spec.name, merge_context(zoo, chosen, tbar, progress, cache), parsed)
    seconds = time.perf_counter() - start
    test_images = getattr(parsed, "gate_test_images", None)
    gate_acc = (
        gate_test_accuracy(result.gate, zoo, chosen, test_images)
        if result.gate is not None and test_images != 0
        else None
    )
    data = data_record(zoo, chosen, spec.needs_calibration)
    draft = store.draft()
    reviewed: dict[str, Any] = {}
    try:
        write_bundle(draft, zoo, chosen, result, gate_acc)
        if review is not None:
            reviewed = review(draft.preview(method, parsed.model_dump(), chosen))
        extra = ManifestExtra.model_validate(
            {**result.info.model_dump(exclude_none=True), **reviewed, "data": data, "gate_test_accuracy": gate_acc}
        )
    except BaseException:
        draft.discard()
        raise
    zoo_info = {"name": zoo.name, "path": str(zoo.root), "hashes": zoo.file_hashes()}
    version = store.publish(
        draft, method, parsed.model_dump(), zoo=zoo_info, tasks=chosen, extra=extra, make_current=make_current
    )
    return MergeOutcome(version, result, chosen, seconds)
