"""Pydantic schemas of the on-disk metadata (zoo models and merged bundles)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

FORMAT_VERSION = 1  # the `format_version` of every schema below (a Literal[1] field)

#: The gate (router) networks a zoo or bundle may hold: timm names, the default first.
GateArch = Literal["efficientnet_lite0", "mobilenetv2_100"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Preprocessing(_Strict):
    """How raw pixels become the model's input tensor."""

    size: int = Field(gt=0, description="square input side in pixels")
    channels: Literal[1, 3]
    mean: list[float]
    std: list[float]
    interpolation: Literal["bilinear", "bicubic"] = "bilinear"

    @model_validator(mode="after")
    def _per_channel(self) -> Preprocessing:
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError(f"mean and std need {self.channels} values (one per channel)")
        if any(s <= 0 for s in self.std):
            raise ValueError("std values must be > 0")
        return self


class Architecture(_Strict):
    """A timm model name plus constructor kwargs (without ``num_classes``)."""

    timm_name: str
    kwargs: dict[str, Any] = Field(default_factory=dict)
    layer_norm_eps: float | None = Field(default=None, description="LayerNorm eps when it differs from timm's")
    projection_dim: int | None = Field(
        default=None,
        gt=0,
        exclude_if=lambda v: v is None,
        description="CLIP towers: a linear projection to this many dimensions and an L2 normalisation run "
        "before the head (``fc_norm.proj.weight``, part of each model's backbone); None: no projection",
    )

    @field_validator("kwargs")
    @classmethod
    def _no_num_classes(cls, v: dict[str, Any]) -> dict[str, Any]:
        if "num_classes" in v:
            raise ValueError("num_classes is derived from class_names; remove it from kwargs")
        return v


class LoraAdapter(_Strict):
    """The PEFT LoRA adapter a task model was made from (``W0 + scale * B @ A`` folded in at import)."""

    rank: int = Field(gt=0, description="the adapter's ``r`` (the largest, with a rank_pattern)")
    alpha: float
    rslora: bool = False
    layers: list[str] = Field(default_factory=list, description="timm weights that received a LoRA delta")


class Provenance(_Strict):
    """Where a checkpoint came from and how well it did."""

    source: str
    dataset: str | None = None
    split_seed: int | None = None
    epochs: int | None = None
    test_accuracy: float | None = Field(default=None, ge=0.0, le=1.0)
    init_seed: int | None = None
    config_hash: str | None = None
    train_seconds: float | None = None
    notes: str | None = None
    lora: LoraAdapter | None = Field(default=None, exclude_if=lambda v: v is None)


class DataSource(_Strict):
    """Where a task's images come from (``model_store.data.sources`` reads them).

    * ``builtin``: one of the offline datasets, cut by today's seeded splits
      (``location`` = dataset name, ``seed`` = split seed);
    * ``folder``: any tree of image files, labels ignored (calibration);
    * ``imagefolder``: one sub-folder per class (test; the torchvision/timm convention);
    * ``csv``: a manifest with columns ``path`` (relative to the CSV) and ``label``.

    File sources are read in a seeded shuffle of their sorted file list (``seed``), so a
    ``max_images`` prefix is a sample of every class, the same one each run.
    """

    kind: Literal["builtin", "folder", "imagefolder", "csv"]
    location: str = Field(min_length=1, description="dataset name (builtin) or an absolute path")
    seed: int = 0

    def describe(self) -> str:
        return f"builtin:{self.location}" if self.kind == "builtin" else self.location


class TaskData(_Strict):
    """A task's data sources: unlabeled calibration images, labeled test images (both optional)."""

    calibration: DataSource | None = None
    test: DataSource | None = None


class ModelMeta(_Strict):
    """``meta.json`` of one zoo model (the base or a task model)."""

    format_version: Literal[1] = 1
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    role: Literal["base", "task"]
    task: str | None = None
    class_names: list[str] = Field(default_factory=list)
    architecture: Architecture
    preprocessing: Preprocessing
    provenance: Provenance
    data: TaskData = Field(default_factory=TaskData)

    @model_validator(mode="after")
    def _task_fields(self) -> ModelMeta:
        if self.role == "task":
            if not self.task:
                raise ValueError("a task model needs 'task'")
            if len(self.class_names) < 2:
                raise ValueError("a task model needs at least 2 class_names")
            if len(set(self.class_names)) != len(self.class_names):
                raise ValueError("class_names must be unique")
        return self

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


class GateInit(_Strict):
    """A user's pretrained weights for the gate network, copied into the zoo."""

    arch: GateArch
    file: str | None = Field(
        default=None, description="safetensors file inside the zoo (timm naming); None: the default init"
    )
    source: str | None = Field(default=None, description="where the weights were imported from")


class ZooManifest(_Strict):
    """``zoo.json``: which models make up a zoo."""

    format_version: Literal[1] = 1
    name: str = Field(min_length=1)
    base: str | None = None
    tasks: list[str] = Field(default_factory=list)
    shared_init: bool = True
    preset: str | None = None
    config_hash: str | None = None
    created_at: str
    gate: GateInit | None = None
    spec: str | None = Field(default=None, description="the zoo spec file this zoo was created from")

    @field_validator("tasks")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError("task names must be unique")
        return v


class FileEntry(_Strict):
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    bytes: int = Field(ge=0)


class BundleManifest(_Strict):
    """``manifest.json`` of a merged bundle."""

    format_version: Literal[1] = 1
    version: str
    method: str
    params: dict[str, Any] = Field(default_factory=dict)
    zoo: dict[str, Any] = Field(default_factory=dict, description="source zoo name and sha256 of its files")
    tasks: list[str] = Field(default_factory=list)
    created_at: str
    files: dict[str, FileEntry]
    extra: dict[str, Any] = Field(default_factory=dict)


#: How a bundle makes task weights (``model.json``'s ``kind``).
BundleKind = Literal["static", "emr", "gated", "lowrank"]

#: ``bundle_format`` of the ``model.json`` this code writes; readers accept exactly this one.
BUNDLE_FORMAT: Literal[1] = 1


class BundleTask(_Strict):
    """One task of a bundle: its classes and its individual model's accuracy (when known)."""

    name: str = Field(min_length=1)
    class_names: list[str] = Field(min_length=2)
    individual_test_accuracy: float | None = None


class EMRSpec(_Strict):
    """EMR modulators: one rescaler per task (the masks are tensors of the bundle)."""

    rescalers: dict[str, float]
    mask_bit_order: Literal["numpy.packbits big-endian"] = "numpy.packbits big-endian"


class GatingSpec(_Strict):
    """Which tensors of a gated bundle are per-task expert stacks."""

    gated_keys: list[str]
    attn_blocks: list[int] = Field(default_factory=list)
    mlp_blocks: list[int] = Field(default_factory=list)


class LowRankSpec(_Strict):
    """Low-rank task deltas: per matrix layer its rank; ``factors`` holds ``{key}.B`` (N, m, r) and
    ``{key}.A`` (N, r, n), ``experts`` every task's small tensors (N, ...), ``backbone`` ``W_0``."""

    ranks: dict[str, int]
    rank_fraction: float | None = None
    source: Literal["tsv_c", "lora"] = "tsv_c"


class GateSpec(_Strict):
    """The bundle's gate (router) network and how well it routed."""

    arch: GateArch
    preprocessing: Preprocessing
    holdout_accuracy: float | None = None
    epochs_run: int | None = None
    test_accuracy: dict[str, float | None] = Field(default_factory=dict)


class BundleSpec(_Strict):
    """``model.json``: the contract between the merge pipeline (writer) and the serving runtime (reader).

    ``kind`` says how task weights are made: ``static`` (one backbone), ``emr`` (``theta_0 +
    lam_t M_t tau_uni``), ``gated`` (per-image mixing of expert stacks) or ``lowrank``
    (``W_0 + B_t A_t`` per matrix layer, task t's own small tensors).
    """

    bundle_format: Literal[1] = BUNDLE_FORMAT
    kind: BundleKind
    architecture: Architecture
    preprocessing: Preprocessing
    tasks: list[BundleTask] = Field(min_length=1)
    emr: EMRSpec | None = None
    gating: GatingSpec | None = None
    lowrank: LowRankSpec | None = None
    gate: GateSpec | None = None

    @model_validator(mode="after")
    def _kind_fields(self) -> BundleSpec:
        names = [t.name for t in self.tasks]
        if len(set(names)) != len(names):
            raise ValueError("task names must be unique")
        if self.kind == "emr" and (self.emr is None or set(self.emr.rescalers) != set(names)):
            raise ValueError("an emr bundle needs emr.rescalers for every task")
        if self.kind == "gated" and self.gating is None:
            raise ValueError("a gated bundle needs gating.gated_keys")
        if self.kind == "lowrank" and self.lowrank is None:
            raise ValueError("a lowrank bundle needs lowrank.ranks")
        return self

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]
