"""Pydantic schemas of the on-disk metadata (zoo models and merged bundles)."""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

#: ``format_version`` of what this code writes: 2 since preprocessing says resize mode, crop, rescale and
#: alpha (:class:`Preprocessing`); format 1 (a square squash) still reads.
FORMAT_VERSION: Literal[2] = 2

#: The gate (router) networks a zoo or bundle may hold: timm names, the default first.
GateArch = Literal["efficientnet_lite0", "mobilenetv2_100"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


#: Resampling filters (Pillow's, as torchvision runs them on uint8 tensors): ``nearest`` is Pillow's
#: NEAREST (torchvision's ``nearest-exact``). Pillow's BOX and HAMMING have no tensor kernel: refused at import.
Interpolation = Literal["nearest", "bilinear", "bicubic", "lanczos"]
#: ``squash``: to ``resize_size`` x ``resize_size`` (aspect lost); ``shortest_edge``: the shorter side to
#: ``resize_size``, the longer ``int(resize_size * long / short)`` (torchvision ``Resize(int)``, transformers
#: ``shortest_edge``); ``longest_edge``: the longer side to ``resize_size``, both ``round(side / ratio)``
#: (timm / open_clip ``ResizeKeepRatio(longest=1)``).
ResizeMode = Literal["squash", "shortest_edge", "longest_edge"]
#: What an image with transparency becomes: ``drop`` the alpha (Pillow ``convert("RGB")``, timm's loader);
#: ``white``: composite onto white (transformers' ``do_convert_rgb``); ``premultiplied``: resized with
#: premultiplied alpha, then dropped (Pillow's own RGBA resize: open_clip's preprocess on an RGBA image).
AlphaMode = Literal["drop", "white", "premultiplied"]


class Preprocessing(_Strict):
    """How raw pixels become the model's input tensor (SPEC section 10), as the checkpoint's library does it.

    On uint8 pixels, in this order: channels (gray -> RGB by repetition, colour -> gray by ITU-R 601
    luma, transparency by ``alpha``); resize (``resize`` to :meth:`resize_target`, antialiased, as
    Pillow); center crop to ``size`` x ``size`` (padding with ``fill`` where the image is smaller,
    the offset rounded by ``crop_rounding``); then ``x * rescale_factor`` normalised by mean/std.
    A format-1 spec (size, channels, mean, std, interpolation) reads as a squash to ``size``.
    """

    size: int = Field(gt=0, description="the model's square input side in pixels (after the crop)")
    channels: Literal[1, 3]
    mean: list[float]
    std: list[float]
    interpolation: Interpolation = "bilinear"
    resize: ResizeMode = "squash"
    resize_size: int | None = Field(
        default=None, gt=0, description="the resize target edge; None: floor(size / crop_pct), else size"
    )
    crop_pct: float | None = Field(
        default=None, gt=0, le=1, description="timm's crop_pct: resize to floor(size / crop_pct), crop size"
    )
    crop_rounding: Literal["round", "floor"] = Field(
        default="round",
        description="center-crop offset: torchvision/timm/open_clip round((H - size) / 2); transformers floors it",
    )
    fill: list[int] = Field(
        default_factory=lambda: [0], description="pad value (0-255, one or one per channel) around a small image"
    )
    rescale_factor: float = Field(default=1 / 255, gt=0, description="uint8 -> float scale before mean/std")
    alpha: AlphaMode = "drop"
    source: str | None = Field(
        default=None, exclude_if=lambda v: v is None, description="where these values were read (for people)"
    )

    @model_validator(mode="after")
    def _per_channel(self) -> Preprocessing:
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError(f"mean and std need {self.channels} values (one per channel)")
        if any(s <= 0 for s in self.std):
            raise ValueError("std values must be > 0")
        if len(self.fill) not in (1, self.channels) or any(not 0 <= v <= 255 for v in self.fill):
            raise ValueError(f"fill needs 1 or {self.channels} values in 0..255")
        return self

    def resize_target(self) -> int:
        """The resize edge: ``resize_size``, else ``floor(size / crop_pct)`` with a crop_pct, else ``size``."""
        if self.resize_size is not None:
            return self.resize_size
        if self.crop_pct is not None:
            return math.floor(self.size / self.crop_pct)
        return self.size

    def describe(self) -> str:
        """One line for people: e.g. ``shortest edge 256 -> crop 224, bicubic, mean [...] std [...]``."""
        edge = {"squash": "squash to", "shortest_edge": "shortest edge", "longest_edge": "longest edge"}[self.resize]
        crop = f" -> crop {self.size}" if self.resize_target() != self.size or self.resize != "squash" else ""
        alpha = "" if self.alpha == "drop" else f", alpha {self.alpha}"
        return (
            f"{edge} {self.resize_target()}{crop}, {self.interpolation}, mean {[round(v, 4) for v in self.mean]} "
            f"std {[round(v, 4) for v in self.std]}{alpha}"
        )

    def pixels_equal(self, other: Preprocessing) -> bool:
        """Whether both turn every image into the same tensor (``source`` aside)."""
        return self.model_dump(exclude={"source"}) == other.model_dump(exclude={"source"})


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

    format_version: Literal[1, 2] = FORMAT_VERSION
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
    exif_transpose: bool = Field(
        default=True, description="data sources turn photos with an EXIF orientation upright when decoding them"
    )

    @field_validator("tasks")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError("task names must be unique")
        return v


class FileEntry(_Strict):
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    bytes: int = Field(ge=0)


class TaskAgreement(_Strict):
    """How often a bundle answers like the user's own model of one task, on that task's images (no labels).

    ``top1_given``: share of images where the bundle with the task given picks the individual model's top-1;
    ``top1_routed``: share routed to this task AND picking that top-1 (None: the bundle has no router);
    ``kl_*``: mean KL(individual || bundle) of the class probabilities (routed: over images routed here).
    ``split``: the task's test images, its calibration images, or their held-out part (label-free selection).
    """

    task: str
    split: Literal["test", "calibration", "calibration_holdout"]
    images: int = Field(ge=0)
    top1_given: float | None = Field(default=None, ge=0.0, le=1.0)
    top1_routed: float | None = Field(default=None, ge=0.0, le=1.0)
    kl_given: float | None = Field(default=None, ge=0.0)
    kl_routed: float | None = Field(default=None, ge=0.0)


class StoredBytes(_Strict):
    """What a bundle stores (SPEC section 9): every tensor's bytes as stored -- packed codes, scales, router
    or gate, heads, small tensors -- per safetensors file, and the total as a multiple of one float32
    model (the bundle architecture's backbone, without a head)."""

    total: int = Field(ge=0)
    files: dict[str, int] = Field(default_factory=dict, description="tensor bytes per file (name without suffix)")
    one_model_fp32: int = Field(gt=0, description="bytes of one float32 backbone of the bundle's architecture")
    x_one_model: float = Field(ge=0.0, description="total / one_model_fp32")


def _omit_none(**kwargs: Any) -> Any:
    """An optional field left out of the JSON while unset (a manifest shows what its merge reported)."""
    return Field(default=None, exclude_if=lambda v: v is None, **kwargs)


class SetRecord(_Strict):
    """What a bundle keeps of an image set a merge or its evaluation reads: where from, how many, which."""

    source: DataSource
    images: int = Field(ge=0)
    sha256: str = Field(description="of the file list (relative path, size, label) or of the built-in split")


class HoldoutRecord(_Strict):
    """A seeded split of a task's calibration images (SPEC section 9): the merge fit on ``fit_images`` of them,
    label-free selection measured agreement on the other ``held_out_images``."""

    fraction: float = Field(gt=0.0, lt=1.0)
    seed: int
    fit_images: int = Field(ge=1)
    held_out_images: int = Field(ge=1)
    held_out_sha256: str = Field(description="of the held-out part's file list")


class TaskDataRecord(_Strict):
    """A task's calibration set (when the merge read one), how it was split for label-free selection (when it
    was), and its test set (None: the task has none)."""

    calibration: SetRecord | None = None
    holdout: HoldoutRecord | None = _omit_none()
    test: SetRecord | None = None


class MergeInfo(_Strict):
    """What a merge method reports about its result (kept flat in the bundle manifest's ``extra``)."""

    rescalers: dict[str, float] | None = _omit_none(description="EMR: each task's rescaler lambda_t")
    rank_fraction: float | None = _omit_none(description="TSV-C: the rank fraction f")
    ranks: list[int] | None = _omit_none(description="LoRA: the distinct per-layer ranks")
    gated_attn_blocks: list[int] | None = _omit_none(description="gated merges: attention blocks kept per task")
    gated_mlp_blocks: list[int] | None = _omit_none(description="gated merges: MLP blocks kept per task")
    similarity: dict[str, list[tuple[int, float]]] | None = _omit_none(
        description="gated merges: (block, weight similarity) per kind, lowest first"
    )
    sweeps: int | None = _omit_none(description="MuDSC: matching sweeps run")
    converged: bool | None = _omit_none(description="MuDSC: whether the matching converged")
    merge_seconds: float | None = _omit_none()
    optimised_parameters: int | None = _omit_none(description="trained merges: parameters optimised")
    training_images: int | None = _omit_none(description="trained merges: images (with augmentations) seen")
    final_loss: float | None = _omit_none(description="trained merges: the last epoch's loss")


class CandidateRecord(_Strict):
    """One candidate of a label-free selection grid: its swept parameters, stored bytes and held-out agreement."""

    params: dict[str, Any]
    stored_bytes: int = Field(ge=0)
    x_one_model: float = Field(ge=0.0, description="stored bytes as a multiple of one float32 model")
    agreement: list[TaskAgreement]
    min_agreement: float = Field(ge=0.0, le=1.0, description="the worst task's agreement (the selection's measure)")
    worst_task: str
    meets_target: bool


class SelectionRecord(_Strict):
    """What ``--target-agreement`` chose and why (SPEC section 9; the bundle manifest's ``extra.selection``)."""

    target_agreement: float = Field(gt=0.0, le=1.0)
    measure: Literal["routed", "given"] = Field(description="top-1 agreement routed, or task given (no router)")
    split: Literal["calibration_holdout"] = "calibration_holdout"
    holdout: dict[str, Any] = Field(description="fraction, seed and held-out images per task")
    grid: dict[str, list[Any]]
    candidates: list[CandidateRecord]
    chosen: dict[str, Any]


#: ``extra_format`` of the manifest extras this code writes
EXTRA_FORMAT: Literal[1] = 1


class ManifestExtra(MergeInfo):
    """``manifest.json``'s ``extra``: the method's :class:`MergeInfo` (flat), each task's data sets, the gate's
    routing accuracy on test images and the bundle's agreement with each task's own model (issue 33).

    Keys of older manifests that are none of these are kept in ``legacy`` (never written by this code)."""

    extra_format: Literal[1] = EXTRA_FORMAT
    data: dict[str, TaskDataRecord] | None = _omit_none()
    gate_test_accuracy: dict[str, float | None] | None = _omit_none(
        description="share of each task's test images the gate routes to it (None: no test images)"
    )
    agreement: list[TaskAgreement] | None = _omit_none()
    stored_bytes: StoredBytes | None = _omit_none()
    selection: SelectionRecord | None = _omit_none(description="what --target-agreement chose, and from what")
    legacy: dict[str, Any] | None = _omit_none()

    @model_validator(mode="before")
    @classmethod
    def _keep_unknown(cls, value: Any) -> Any:
        if not isinstance(value, dict):
            return value
        known = set(cls.model_fields)
        unknown = {k: v for k, v in value.items() if k not in known}
        if not unknown:
            return value
        return {**{k: v for k, v in value.items() if k in known}, "legacy": {**(value.get("legacy") or {}), **unknown}}


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
    extra: ManifestExtra = Field(default_factory=ManifestExtra)


#: How a bundle makes task weights (``model.json``'s ``kind``).
BundleKind = Literal["static", "emr", "gated", "lowrank"]

#: ``bundle_format`` of the ``model.json`` this code writes (2: per-task preprocessing, the full
#: :class:`Preprocessing`); readers accept 1, 2 and 3.
BUNDLE_FORMAT: Literal[2] = 2
#: ``bundle_format`` of a bundle whose low-rank factors are quantized (``lowrank.bits`` 8 or 4): readers
#: older than quantization refuse it instead of misreading integer codes as weights.
QUANTIZED_BUNDLE_FORMAT: Literal[3] = 3


class BundleTask(_Strict):
    """One task of a bundle: its classes and its individual model's accuracy (when known)."""

    name: str = Field(min_length=1)
    class_names: list[str] = Field(min_length=2)
    individual_test_accuracy: float | None = None
    preprocessing: Preprocessing | None = Field(
        default=None,
        exclude_if=lambda v: v is None,
        description="the task model's own preprocessing where it differs from the bundle's (same size and channels)",
    )


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
    ``{key}.A`` (N, r, n), ``experts`` every task's small tensors (N, ...), ``backbone`` ``W_0``.

    ``bits`` 8 or 4 (SPEC section 9; :mod:`model_store.quantize`): ``{key}.B`` / ``{key}.A`` hold per-row
    symmetric codes (int8 ``(N, m, r)``, or uint8 ``(N, m, ceil(r/2))`` with two 4-bit codes per byte) and
    ``{key}.B.scale`` (N, m) / ``{key}.A.scale`` (N, r) their float32 scales; such a bundle is
    ``bundle_format`` 3. Absent (older bundles): 32, float32 factors."""

    ranks: dict[str, int]
    rank_fraction: float | None = None
    source: Literal["tsv_c", "lora"] = "tsv_c"
    bits: Literal[32, 8, 4] = Field(
        default=32, exclude_if=lambda v: v == 32, description="stored width of the factors' numbers"
    )
    int4_layout: Literal["two per byte, even column in the low nibble, two's complement"] | None = Field(
        default=None, exclude_if=lambda v: v is None, description="how 4-bit codes are packed (bits 4 only)"
    )

    @model_validator(mode="after")
    def _layout(self) -> LowRankSpec:
        if (self.bits == 4) != (self.int4_layout is not None):
            raise ValueError("lowrank.int4_layout is given exactly when bits is 4")
        return self


class BundleGateSpec(_Strict):
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

    bundle_format: Literal[1, 2, 3] = BUNDLE_FORMAT
    kind: BundleKind
    architecture: Architecture
    preprocessing: Preprocessing
    tasks: list[BundleTask] = Field(min_length=1)
    emr: EMRSpec | None = None
    gating: GatingSpec | None = None
    lowrank: LowRankSpec | None = None
    gate: BundleGateSpec | None = None

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
        if self.lowrank is not None and self.lowrank.bits != 32 and self.bundle_format < QUANTIZED_BUNDLE_FORMAT:
            raise ValueError(f"quantized low-rank factors need bundle_format {QUANTIZED_BUNDLE_FORMAT}")
        for t in self.tasks:
            for field in ("size", "channels"):
                if t.preprocessing is not None and getattr(t.preprocessing, field) != getattr(
                    self.preprocessing, field
                ):
                    raise ValueError(f"task '{t.name}': preprocessing.{field} differs from the bundle's")
        return self

    def task_preprocessing(self) -> list[Preprocessing]:
        """Each task's input preprocessing, in task order (the bundle's where a task has none of its own)."""
        return [t.preprocessing or self.preprocessing for t in self.tasks]

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]
