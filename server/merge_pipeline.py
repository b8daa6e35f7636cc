"""Zoo -> merge method -> published bundle (used by `vitmerge merge` and the admin API).

Data flows one way: the zoo's backbones are opened lazily (one tensor per model at a
time), the registry's pure function merges them, the result is written into a
bundle draft and published atomically. Any failure discards the draft: the store
and its ``CURRENT`` stay as they were.

Bundle files (format 1):

* ``model.json``        kind (static | emr), architecture, preprocessing, tasks + classes
* ``heads.safetensors`` every task's classifier, keys ``<task>/<tensor>``
* static: ``backbone.safetensors``
* emr: ``base.safetensors`` (theta_0), ``tau_unified.safetensors``,
  ``masks.safetensors`` (bit-packed uint8, keys ``<task>/<tensor>``), ``emr.json``
  (one rescaler per task)
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from merging.registry import MergeContext, MergeResult, get_method, parse_params, run_merge
from merging.types import Tensors
from model_store.architecture import build_model, load_into
from model_store.bundle import BundleDraft, BundleStore
from model_store.datasets import SplitSpec, load_split
from model_store.errors import ZooFormatError
from model_store.preprocessing import to_model_input
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


def merge_context(zoo: Zoo, tasks: Sequence[str], split: SplitSpec = SplitSpec(), bar: tqdm | None = None) -> MergeContext:
    """Lazy backbones of the zoo plus calibration access for data-dependent methods."""
    if not zoo.manifest.shared_init:
        raise ZooFormatError(f"zoo '{zoo.name}' has no shared pretrained base (shared_init=false): task-vector methods do not apply")
    finetuned: list[Tensors] = [zoo.backbone_lazy(t) for t in tasks]
    if bar is not None:
        finetuned[0] = _Ticking(finetuned[0], bar)

    def build(i: int, backbone: Tensors) -> torch.nn.Module:
        meta = zoo.metas[tasks[i]]
        model = build_model(meta.architecture, meta.num_classes)
        return load_into(model, dict(backbone.items()), zoo.head(tasks[i])).eval()

    def calibration(i: int) -> torch.Tensor:
        meta = zoo.metas[tasks[i]]
        data = load_split(meta.task or tasks[i], "calibration", split)
        return to_model_input(data.images, meta.preprocessing)

    return MergeContext(zoo.backbone_lazy(zoo.base), finetuned, list(tasks), build, calibration)


def write_bundle(draft: BundleDraft, zoo: Zoo, tasks: Sequence[str], result: MergeResult) -> None:
    """Write a merge result and the task heads into ``draft``."""
    base_meta = zoo.metas[zoo.base]
    heads = {f"{t}/{k}": v for t in tasks for k, v in zoo.head(t).items()}
    draft.add_tensors("heads", heads)
    kind = "emr" if result.emr is not None else "static"
    draft.add_json(
        "model",
        {
            "bundle_format": BUNDLE_FORMAT,
            "kind": kind,
            "architecture": base_meta.architecture.model_dump(mode="json"),
            "preprocessing": base_meta.preprocessing.model_dump(mode="json"),
            "tasks": [{"name": t, "class_names": zoo.metas[t].class_names, "individual_test_accuracy": zoo.metas[t].provenance.test_accuracy} for t in tasks],
        },
    )
    if result.emr is not None:
        emr = result.emr
        draft.add_tensors("base", dict(zoo.backbone(zoo.base)))
        draft.add_tensors("tau_unified", emr.tau_unified)
        draft.add_tensors("masks", {f"{t}/{k}": v for t, packed in zip(tasks, emr.packed_masks) for k, v in packed.items()})
        draft.add_json("emr", {"rescalers": dict(zip(tasks, emr.rescalers)), "mask_bit_order": "numpy.packbits big-endian"})
    elif result.backbone is not None:
        draft.add_tensors("backbone", result.backbone)
    else:
        raise ValueError("merge produced neither a backbone nor EMR modulators")


def merge_and_publish(
    zoo: Zoo,
    store: BundleStore,
    method: str,
    params: dict[str, Any] | None = None,
    tasks: Sequence[str] | None = None,
    progress: bool = True,
    make_current: bool = True,
) -> MergeOutcome:
    """Merge ``zoo`` with ``method`` and publish the bundle; returns its version."""
    spec = get_method(method)
    parsed = parse_params(method, params)
    chosen = select_tasks(zoo, tasks)
    with tqdm(desc=f"merge {method}", unit="tensor", disable=not progress) as bar:
        ctx = merge_context(zoo, chosen, bar=bar)
        result = run_merge(spec.name, ctx, parsed)
    draft = store.draft()
    try:
        write_bundle(draft, zoo, chosen, result)
    except BaseException:
        draft.discard()
        raise
    zoo_info = {"name": zoo.name, "path": str(zoo.root), "hashes": zoo.file_hashes()}
    extra = {k: v for k, v in result.info.items() if k != "params"}
    version = store.publish(draft, method, parsed.model_dump(), zoo=zoo_info, tasks=chosen, extra=extra, make_current=make_current)
    return MergeOutcome(version, result, chosen)
