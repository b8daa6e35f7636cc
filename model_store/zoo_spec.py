"""Zoo spec files: a user's checkpoints and images as one YAML file (``vitmerge zoo create``).

In the spirit of mergekit's configs and FusionBench's model pools::

    name: products
    base: {format: hf, path: ckpt/vit-base}
    tasks:
      - name: shoes
        format: hf                          # hf | timm (+ model_name, model_kwargs) | clip (+ head) | peft
        path: ckpt/vit-shoes
        classes: [boot, sandal, sneaker]    # optional: else from the checkpoint (HF id2label)
        calibration: data/shoes/unlabeled   # folder of images, a CSV, or builtin:NAME
        test: data/shoes/test               # ImageFolder, a CSV, or builtin:NAME
    gate: {arch: mobilenetv2_100, init: ckpt/mobilenet_v2_imagenet.pth}   # optional

Relative paths resolve against the spec file's folder. Preprocessing comes from the
checkpoint where it says (HF ``preprocessor_config.json``; timm's pretrained config),
overridden field by field by an explicit ``preprocessing:`` block. A zoo is created in
a temporary folder and renamed into place only when every model imported and every
data source checked out: a failed create leaves nothing behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from safetensors.torch import save_file
from tqdm.auto import tqdm

from model_store.errors import ModelStoreError, ZooFormatError
from model_store.files import PUBLISHED_FILE_MODE, write_json
from model_store.schema import AlphaMode, GateInit, Interpolation, Preprocessing, ResizeMode
from model_store.zoo import Zoo

SPEC_SUFFIXES = (".yaml", ".yml")
NAME_PATTERN = r"^[A-Za-z0-9_.-]+$"


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PreprocessingOverride(_Spec):
    """Fields that replace the checkpoint's own preprocessing (any subset; see :class:`Preprocessing`)."""

    size: int | None = Field(default=None, gt=0)
    channels: Literal[1, 3] | None = None
    mean: list[float] | None = None
    std: list[float] | None = None
    interpolation: Interpolation | None = None
    resize: ResizeMode | None = None
    resize_size: int | None = Field(default=None, gt=0)
    crop_pct: float | None = Field(default=None, gt=0, le=1)
    crop_rounding: Literal["round", "floor"] | None = None
    fill: list[int] | None = None
    rescale_factor: float | None = Field(default=None, gt=0)
    alpha: AlphaMode | None = None

    def apply(self, prep: Preprocessing) -> Preprocessing:
        """``prep`` with the fields this block sets; ``source`` says so."""
        fields = self.model_dump(exclude_none=True)
        if not fields:
            return prep
        if "crop_pct" in fields and "resize_size" not in fields:  # a new crop_pct re-derives the resize edge
            fields["resize_size"] = None
        source = f"{prep.source or 'checkpoint'}; zoo spec: {', '.join(sorted(fields))}"
        return Preprocessing.model_validate({**prep.model_dump(), **fields, "source": source})


class ModelSpec(_Spec):
    """One checkpoint: the base or a task model."""

    format: Literal["hf", "timm", "clip", "peft"]
    path: str = Field(
        min_length=1,
        description="HF checkpoint folder, a timm state-dict file, a CLIP tower (HF folder or open_clip file), "
        "or a PEFT LoRA adapter folder (format peft)",
    )
    model_name: str | None = Field(default=None, description="timm model name (format timm)")
    model_kwargs: dict[str, Any] = Field(default_factory=dict, description="timm.create_model kwargs (format timm)")
    projection: str | None = Field(
        default=None, description="format clip: take the visual projection from this CLIP checkpoint"
    )
    open_clip_config: str | None = Field(default=None, description="format clip: open_clip model config JSON")
    base_checkpoint: str | None = Field(
        default=None, description="format peft: the HF ViT folder the adapter was trained on"
    )
    preprocessing: PreprocessingOverride | None = None

    @model_validator(mode="after")
    def _format_fields(self) -> ModelSpec:
        if self.format == "timm" and not self.model_name:
            raise ValueError("format timm needs model_name (e.g. vit_small_patch16_224)")
        only = {"projection": "clip", "open_clip_config": "clip", "base_checkpoint": "peft"}
        for field, fmt in only.items():
            if getattr(self, field) is not None and self.format != fmt:
                raise ValueError(f"{field} is for format {fmt}, not {self.format}")
        return self

    def files(self) -> list[str]:
        """Every file or folder this model is read from (for the spec hash)."""
        extra = [self.projection, self.open_clip_config, self.base_checkpoint]
        return [self.path, *(f for f in extra if f)]


class TaskSpec(ModelSpec):
    """A task model with its classes and data sources."""

    name: str = Field(pattern=NAME_PATTERN)
    classes: list[str] | None = None
    calibration: str | None = Field(default=None, description="unlabeled images: a folder, a CSV, or builtin:NAME")
    test: str | None = Field(default=None, description="labeled images: an ImageFolder, a CSV, or builtin:NAME")
    head: str | None = Field(
        default=None,
        description="format clip: the task's linear head file ('weight' classes x dim, optional 'bias' and "
        "'logit_scale')",
    )
    logit_scale: float | None = Field(default=None, gt=0, description="format clip: multiply the head by this")

    @model_validator(mode="after")
    def _clip_head(self) -> TaskSpec:
        if self.format != "clip" and (self.head is not None or self.logit_scale is not None):
            raise ValueError(f"head and logit_scale are for format clip, not {self.format}")
        if self.format == "clip" and self.head is None:
            raise ValueError("a format clip task needs head: a linear head file (classes x dim)")
        return self

    def files(self) -> list[str]:
        return [*super().files(), *([self.head] if self.head else [])]


class ZooGateSpec(_Spec):
    """The zoo's gate (router) network: its architecture and pretrained weights."""

    arch: Literal["mobilenetv2_100", "efficientnet_lite0"]
    init: str | None = Field(default=None, description="ImageNet weights (timm or torchvision naming)")


class ZooSpec(_Spec):
    """A whole zoo spec file."""

    name: str = Field(pattern=NAME_PATTERN)
    base: ModelSpec
    tasks: list[TaskSpec] = Field(min_length=1)
    gate: ZooGateSpec | None = None
    exif_transpose: bool = Field(
        default=True,
        description="turn calibration/test photos with an EXIF orientation tag upright (as transformers' load_image)",
    )

    @field_validator("tasks")
    @classmethod
    def _unique(cls, v: list[TaskSpec]) -> list[TaskSpec]:
        names = [t.name for t in v]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"task names must be unique; repeated: {', '.join(dup)}")
        if "base" in names:
            raise ValueError("'base' is reserved for the base model; rename that task")
        return v


def is_spec_file(value: str | Path) -> bool:
    path = Path(value)
    return path.suffix.lower() in SPEC_SUFFIXES and path.is_file()


def load_spec(path: str | Path) -> ZooSpec:
    """Parse and validate a spec file; errors name the file and the field."""
    path = Path(path)
    if not path.is_file():
        raise ZooFormatError(f"zoo spec {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ZooFormatError(f"{path}: not valid YAML ({e})") from e
    if not isinstance(raw, dict):
        raise ZooFormatError(f"{path}: expected a mapping with name, base and tasks")
    try:
        return ZooSpec.model_validate(raw)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}" for err in e.errors())
        raise ZooFormatError(f"{path}: {problems}") from e


def _resolve(base_dir: Path, value: str) -> Path:
    p = Path(value).expanduser()
    return (p if p.is_absolute() else base_dir / p).resolve()


def _stat_lines(path: Path) -> list[str]:
    files = sorted(path.rglob("*")) if path.is_dir() else [path]
    return [f"{f}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files if f.is_file()]


def spec_hash(spec: ZooSpec, spec_dir: Path) -> str:
    """Hash of the spec and of its checkpoint files (path, size, mtime): a changed spec or checkpoint
    re-creates the zoo."""
    h = hashlib.sha256(json.dumps(spec.model_dump(mode="json"), sort_keys=True).encode())
    h.update(str(spec_dir.resolve()).encode())
    for m in [spec.base, *spec.tasks]:
        for f in m.files():
            p = _resolve(spec_dir, f)
            h.update("\n".join(_stat_lines(p) if p.exists() else [f"{p}:missing"]).encode())
    if spec.gate is not None and spec.gate.init:
        p = _resolve(spec_dir, spec.gate.init)
        h.update("\n".join(_stat_lines(p) if p.exists() else [f"{p}:missing"]).encode())
    return h.hexdigest()[:16]


def _import_one(m: ModelSpec, spec_dir: Path, zoo_dir: Path, name: str, role: str) -> None:
    """Import one model of the spec (with its data sources, for tasks)."""
    from model_store.importers.common import ImportTarget

    path = _resolve(spec_dir, m.path)
    task = m if isinstance(m, TaskSpec) else None
    target = ImportTarget(
        zoo_dir,
        name,
        "task" if role == "task" else "base",
        class_names=task.classes if task else None,
        adjust_preprocessing=m.preprocessing.apply if m.preprocessing else None,
        calibration=task.calibration if task else None,
        test=task.test if task else None,
        data_dir=spec_dir,
    )
    if m.format == "hf":
        from model_store.importers.hf_vit import import_hf_vit

        import_hf_vit(path, target)
    elif m.format == "clip":
        from model_store.importers.clip import import_clip

        opt = lambda v: _resolve(spec_dir, v) if v else None  # noqa: E731
        import_clip(
            path,
            target,
            head=opt(task.head if task else None),
            logit_scale=task.logit_scale if task else None,
            projection=opt(m.projection),
            open_clip_config=opt(m.open_clip_config),
        )
    elif m.format == "peft":
        from model_store.errors import CheckpointImportError
        from model_store.importers.peft_lora import import_peft

        if task is None:
            raise CheckpointImportError("a PEFT adapter is a task model: the base must be its HF ViT (format hf)")
        import_peft(path, target, _resolve(spec_dir, m.base_checkpoint) if m.base_checkpoint else None)
    else:
        from model_store.importers.timm_checkpoint import import_timm

        assert m.model_name is not None
        import_timm(path, m.model_name, target, m.model_kwargs)


def create_zoo(
    spec_path: str | Path, zoos_dir: str | Path, name: str | None = None, force: bool = False, progress: bool = True
) -> Zoo:
    """Create the zoo a spec file describes in ``zoos_dir/<name>`` (atomically: all or nothing)."""
    spec_path = Path(spec_path).resolve()
    spec = load_spec(spec_path)
    spec_dir = spec_path.parent
    name = name or spec.name
    zoos_dir = Path(zoos_dir)
    target = zoos_dir / name
    if target.exists() and not force:
        raise ZooFormatError(
            f"zoo '{name}' already exists at {target} (use --force to replace it, or --name for another name)"
        )
    zoos_dir.mkdir(parents=True, exist_ok=True)
    tmp = zoos_dir / f".{name}.creating-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with tqdm(total=1 + len(spec.tasks), desc=f"zoo create {name}", unit="model", disable=not progress) as bar:
            bar.set_postfix_str("base")
            _import_one(spec.base, spec_dir, tmp, "base", "base")
            bar.update(1)
            for task in spec.tasks:
                bar.set_postfix_str(task.name)
                try:
                    _import_one(task, spec_dir, tmp, task.name, "task")
                except ModelStoreError as e:
                    raise type(e)(f"task '{task.name}': {e}") from e
                bar.update(1)
        gate = _gate(spec, spec_dir, tmp)
        zoo = Zoo.load(tmp)  # architectures and tensor shapes of every task against the base
        manifest = zoo.manifest.model_copy(
            update={
                "name": name,
                "gate": gate,
                "spec": str(spec_path),
                "config_hash": spec_hash(spec, spec_dir),
                "tasks": [t.name for t in spec.tasks],
                "exif_transpose": spec.exif_transpose,
            }
        )
        write_json(tmp / "zoo.json", manifest.model_dump(mode="json"))
        Zoo.load(tmp)
        old = zoos_dir / f".{name}.replaced-{os.getpid()}"
        if target.exists():
            target.rename(old)
        tmp.rename(target)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Zoo.load(target)


def _gate(spec: ZooSpec, spec_dir: Path, zoo_dir: Path) -> GateInit | None:
    """Copy the spec's gate weights into the zoo (timm naming), checked against the architecture."""
    if spec.gate is None:
        return None
    if spec.gate.init is None:
        return GateInit(arch=spec.gate.arch)
    from model_store.importers.gate_weights import load_gate_weights

    src = _resolve(spec_dir, spec.gate.init)
    state = load_gate_weights(src, spec.gate.arch)
    (zoo_dir / "gate").mkdir(exist_ok=True)
    save_file(state, zoo_dir / "gate" / "init.safetensors")
    (zoo_dir / "gate" / "init.safetensors").chmod(PUBLISHED_FILE_MODE)  # safetensors writes 0600
    return GateInit(arch=spec.gate.arch, file="gate/init.safetensors", source=str(src))


def ensure_zoo(spec_path: str | Path, zoos_dir: str | Path, progress: bool = True) -> Zoo:
    """The spec's zoo in the store: created on first use, re-created when the spec or its checkpoints changed."""
    spec_path = Path(spec_path).resolve()
    spec = load_spec(spec_path)
    target = Path(zoos_dir) / spec.name
    if (target / "zoo.json").exists():
        try:
            zoo = Zoo.load(target)
            if zoo.manifest.config_hash == spec_hash(spec, spec_path.parent):
                return zoo
        except ZooFormatError:
            pass
    return create_zoo(spec_path, zoos_dir, force=True, progress=progress)
