"""Zoo -> merge method -> published bundle (used by `vitmerge merge` and the admin API).

Data flows one way: the zoo's backbones are opened lazily (one tensor per model at a
time), the registry's pure function merges them, the result is written into a
bundle draft and published atomically. Any failure discards the draft: the store
and its ``CURRENT`` stay as they were.

Bundle files (format 1):

* ``model.json``        kind (static | emr | gated), architecture, preprocessing,
  tasks + classes, EMR rescalers, gating plan, gate config and accuracy
* ``heads.safetensors`` every task's classifier, keys ``<task>/<tensor>``
* static: ``backbone.safetensors``
* emr: ``base.safetensors`` (theta_0), ``tau_unified.safetensors``,
  ``masks.safetensors`` (bit-packed uint8, keys ``<task>/<tensor>``)
* gated: ``backbone.safetensors`` (non-gated tensors), ``experts.safetensors``
  (``(N, ...)`` stacks of the gated tensors)
* with a gate: ``gate.safetensors``
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from merging.gate import build_gate, gate_probabilities
from merging.registry import GateArtifact, MergeContext, MergeResult, get_method, parse_params, refusal, run_merge
from merging.types import Tensors
from model_store.architecture import build_model, load_into
from model_store.bundle import BundleDraft, BundleStore
from model_store.datasets import SplitSpec, load_split
from model_store.importers.efficientnet_lite0 import efficientnet_lite0_state
from model_store.preprocessing import to_model_input
from model_store.schema import Preprocessing
from model_store.zoo import Zoo

BUNDLE_FORMAT = 1


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
    version: str
    result: MergeResult
    tasks: list[str]


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


def merge_context(zoo: Zoo, tasks: Sequence[str], split: SplitSpec = SplitSpec(), bar: tqdm | None = None, progress: bool = False) -> MergeContext:
    """Lazy backbones of the zoo plus calibration access for data-dependent methods.

    For zoos without a shared base, ``pretrained`` is the manifest's base (the first
    model's own pretraining) and ``shared_init`` is False: task-vector methods refuse.
    """
    finetuned: list[Tensors] = [zoo.backbone_lazy(t) for t in tasks]
    if bar is not None:
        finetuned[0] = _Ticking(finetuned[0], bar)

    def build(i: int, backbone: Tensors) -> torch.nn.Module:
        meta = zoo.metas[tasks[i]]
        model = build_model(meta.architecture, meta.num_classes)
        return load_into(model, dict(backbone.items()), zoo.head(tasks[i])).eval()

    def calibration(i: int, prep: Preprocessing | None = None) -> torch.Tensor:
        meta = zoo.metas[tasks[i]]
        data = load_split(meta.task or tasks[i], "calibration", split)
        return to_model_input(data.images, prep or meta.preprocessing)

    return MergeContext(zoo.backbone_lazy(zoo.base), finetuned, list(tasks), build, calibration, gate_init, progress,
                        heads=[zoo.head(t) for t in tasks], shared_init=shares_init(zoo, tasks))


def gate_init(arch: str) -> dict[str, torch.Tensor] | None:
    """ImageNet weights for gate architectures that have them offline."""
    if arch == "efficientnet_lite0":
        return efficientnet_lite0_state()
    return None


@torch.inference_mode()
def gate_test_accuracy(gate: GateArtifact, tasks: Sequence[str], split: SplitSpec = SplitSpec()) -> dict[str, float]:
    """Share of each task's TEST images the gate routes to that task."""
    model = build_gate(gate.arch, len(tasks))
    model.load_state_dict(gate.state)
    out = {}
    for i, task in enumerate(tasks):
        data = load_split(task, "test", split)
        probs = gate_probabilities(model, to_model_input(data.images, gate.preprocessing))
        out[task] = float((probs.argmax(-1) == i).float().mean())
    return out


def bundle_kind(result: MergeResult) -> str:
    if result.emr is not None:
        return "emr"
    if result.experts is not None:
        return "gated"
    if result.backbone is not None:
        return "static"
    raise ValueError("merge produced neither a backbone, EMR modulators nor experts")


def write_bundle(draft: BundleDraft, zoo: Zoo, tasks: Sequence[str], result: MergeResult, gate_accuracy: dict[str, float] | None = None) -> None:
    """Write a merge result and the task heads into ``draft``."""
    base_meta = zoo.metas[zoo.base]
    kind = bundle_kind(result)
    spec: dict[str, Any] = {
        "bundle_format": BUNDLE_FORMAT,
        "kind": kind,
        "architecture": base_meta.architecture.model_dump(mode="json"),
        "preprocessing": base_meta.preprocessing.model_dump(mode="json"),
        "tasks": [{"name": t, "class_names": zoo.metas[t].class_names, "individual_test_accuracy": zoo.metas[t].provenance.test_accuracy} for t in tasks],
    }
    heads = dict(zip(tasks, result.heads)) if result.heads is not None else {t: zoo.head(t) for t in tasks}
    draft.add_tensors("heads", {f"{t}/{k}": v for t in tasks for k, v in heads[t].items()})
    if result.emr is not None:
        emr = result.emr
        draft.add_tensors("base", dict(zoo.backbone(zoo.base)))
        draft.add_tensors("tau_unified", emr.tau_unified)
        draft.add_tensors("masks", {f"{t}/{k}": v for t, packed in zip(tasks, emr.packed_masks) for k, v in packed.items()})
        spec["emr"] = {"rescalers": dict(zip(tasks, emr.rescalers)), "mask_bit_order": "numpy.packbits big-endian"}
    if result.backbone is not None:
        draft.add_tensors("backbone", result.backbone)
    if result.experts is not None:
        assert result.plan is not None
        draft.add_tensors("experts", result.experts)
        spec["gating"] = {"gated_keys": list(result.plan.gated_keys), "attn_blocks": list(result.plan.attn_blocks), "mlp_blocks": list(result.plan.mlp_blocks)}
    if result.gate is not None:
        gate = result.gate
        draft.add_tensors("gate", gate.state)
        spec["gate"] = {
            "arch": gate.arch,
            "preprocessing": gate.preprocessing.model_dump(mode="json"),
            "holdout_accuracy": gate.holdout_accuracy,
            "epochs_run": gate.epochs_run,
            "test_accuracy": gate_accuracy or {},
        }
    draft.add_json("model", spec)


def merge_and_publish(
    zoo: Zoo,
    store: BundleStore,
    method: str,
    params: dict[str, Any] | None = None,
    tasks: Sequence[str] | None = None,
    progress: bool = True,
    make_current: bool = True,
    bar: Any = None,
) -> MergeOutcome:
    """Merge ``zoo`` with ``method`` and publish the bundle; returns its version.

    ``bar`` (anything with ``update(n)``, e.g. a job's progress) replaces the tqdm bar.
    """
    spec = get_method(method)
    parsed = parse_params(method, params)
    chosen = select_tasks(zoo, tasks)
    check_applicable(zoo, spec.name, chosen)
    if bar is not None:
        result = run_merge(spec.name, merge_context(zoo, chosen, bar=bar, progress=progress), parsed)
    else:
        with tqdm(desc=f"merge {method}", unit="tensor", disable=not progress) as tbar:
            result = run_merge(spec.name, merge_context(zoo, chosen, bar=tbar, progress=progress), parsed)
    gate_acc = gate_test_accuracy(result.gate, chosen) if result.gate is not None else None
    draft = store.draft()
    try:
        write_bundle(draft, zoo, chosen, result, gate_acc)
    except BaseException:
        draft.discard()
        raise
    zoo_info = {"name": zoo.name, "path": str(zoo.root), "hashes": zoo.file_hashes()}
    extra = {k: v for k, v in result.info.items() if k != "params"}
    if gate_acc is not None:
        extra["gate_test_accuracy"] = gate_acc
    version = store.publish(draft, method, parsed.model_dump(), zoo=zoo_info, tasks=chosen, extra=extra, make_current=make_current)
    return MergeOutcome(version, result, chosen)
