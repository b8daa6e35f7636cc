"""Source zoos: one pretrained base plus N task checkpoints, each with metadata.

Layout of a zoo directory::

    zoo.json                              ZooManifest (written last: its presence = complete)
    models/<name>/meta.json               ModelMeta
    models/<name>/backbone.safetensors    every tensor but the classifier
    models/<name>/head.safetensors        the classifier (task models only)

Everything downstream treats a zoo as read-only.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from pydantic import BaseModel, ValidationError
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from model_store.architecture import StateDict, build_model, load_into
from model_store.errors import ZooFormatError
from model_store.files import make_world_readable, sha256_file, utc_timestamp, write_json
from model_store.lazy_tensors import LazySafetensors
from model_store.schema import DataSource, ModelMeta, TaskData, ZooManifest

BACKBONE_FILE = "backbone.safetensors"
HEAD_FILE = "head.safetensors"


def _read_schema(path: Path, schema: type[BaseModel]) -> BaseModel:
    """Parse a JSON file with ``schema``; errors name the file and the bad field."""
    if not path.exists():
        raise ZooFormatError(f"{path}: file is missing")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ZooFormatError(f"{path}: invalid JSON ({e})") from e
    try:
        return schema.model_validate(raw)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}" for err in e.errors())
        raise ZooFormatError(f"{path}: {problems}") from e


def _contiguous(state: StateDict) -> StateDict:
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}


class Zoo:
    """A validated zoo on disk. Tensors are read lazily (safetensors memory maps)."""

    def __init__(self, root: Path, manifest: ZooManifest, metas: dict[str, ModelMeta]):
        self.root = root
        self.manifest = manifest
        self.metas = metas

    @classmethod
    def load(cls, root: str | Path, require_base: bool = True) -> Zoo:
        """Read and validate ``zoo.json`` and every model's ``meta.json`` and files."""
        root = Path(root)
        if not root.is_dir():
            raise ZooFormatError(
                f"zoo directory {root} does not exist (build one with `vitmerge zoo build --preset tiny`)"
            )
        manifest = _read_schema(root / "zoo.json", ZooManifest)
        assert isinstance(manifest, ZooManifest)
        if require_base and manifest.base is None:
            raise ZooFormatError(
                f"{root / 'zoo.json'}: base: the zoo has no base model (import one with `vitmerge import ... --role "
                "base`)"
            )
        names = ([manifest.base] if manifest.base else []) + list(manifest.tasks)
        metas: dict[str, ModelMeta] = {}
        for name in names:
            meta = _read_schema(root / "models" / name / "meta.json", ModelMeta)
            assert isinstance(meta, ModelMeta)
            cls._check_meta(root, name, meta, manifest)
            metas[name] = meta
        zoo = cls(root, manifest, metas)
        zoo._check_compatible()
        return zoo

    @staticmethod
    def _check_meta(root: Path, name: str, meta: ModelMeta, manifest: ZooManifest) -> None:
        where = root / "models" / name / "meta.json"
        if meta.name != name:
            raise ZooFormatError(f"{where}: name: '{meta.name}' does not match its directory '{name}'")
        expected_role = "base" if name == manifest.base else "task"
        if meta.role != expected_role:
            raise ZooFormatError(f"{where}: role: expected '{expected_role}', found '{meta.role}'")
        files = [BACKBONE_FILE] + ([HEAD_FILE] if meta.role == "task" else [])
        for f in files:
            if not (root / "models" / name / f).exists():
                raise ZooFormatError(f"{root / 'models' / name / f}: file is missing")

    def _check_compatible(self) -> None:
        """Task models must share the base's architecture and backbone tensor names/shapes."""
        if not self.manifest.base or not self.manifest.shared_init:
            return
        base = self.metas[self.manifest.base]
        base_shapes = self.backbone_shapes(self.manifest.base)
        for task in self.manifest.tasks:
            meta = self.metas[task]
            if meta.architecture != base.architecture:
                raise ZooFormatError(
                    f"{self.root / 'models' / task / 'meta.json'}: architecture: task '{task}' is "
                    f"{meta.architecture.timm_name} {meta.architecture.kwargs}, the base is "
                    f"{base.architecture.timm_name} {base.architecture.kwargs}; every task model must be "
                    "fine-tuned from the base's architecture"
                )
            for field in ("size", "channels"):  # one engine pass takes one input shape; mean/std/crop may differ
                mine, theirs = getattr(meta.preprocessing, field), getattr(base.preprocessing, field)
                if mine != theirs:
                    raise ZooFormatError(
                        f"{self.root / 'models' / task / 'meta.json'}: preprocessing.{field}: task '{task}' takes "
                        f"{mine}, the base {theirs}; every task of a zoo must take the base's input size and channels "
                        "(one engine pass runs a mixed batch); override it with the task's `preprocessing:` in the "
                        "zoo spec if the checkpoint's value is wrong"
                    )
            shapes = self.backbone_shapes(task)
            if shapes != base_shapes:
                diff = sorted(set(shapes.items()) ^ set(base_shapes.items()))[:3]
                raise ZooFormatError(
                    f"{self.root / 'models' / task / BACKBONE_FILE}: backbone tensors differ from the base's (e.g. "
                    f"{diff})"
                )

    # -- reading --------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def tasks(self) -> list[str]:
        return list(self.manifest.tasks)

    @property
    def base(self) -> str:
        if self.manifest.base is None:
            raise ZooFormatError(f"{self.root}: zoo has no base model")
        return self.manifest.base

    def model_dir(self, name: str) -> Path:
        return self.root / "models" / name

    def backbone_path(self, name: str) -> Path:
        return self.model_dir(name) / BACKBONE_FILE

    def backbone_shapes(self, name: str) -> dict[str, tuple[int, ...]]:
        """Tensor names and shapes from the safetensors header (no data read)."""
        with safe_open(self.backbone_path(name), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}

    def backbone(self, name: str) -> StateDict:
        """All backbone tensors of a model (memory-mapped safetensors load)."""
        return load_file(self.backbone_path(name))

    def backbone_lazy(self, name: str) -> LazySafetensors:
        """The backbone as a lazy mapping: tensors are read one at a time on access."""
        return LazySafetensors(self.backbone_path(name))

    def head(self, task: str) -> StateDict:
        return load_file(self.model_dir(task) / HEAD_FILE)

    def build_model(self, name: str) -> nn.Module:
        """The full model (backbone + head) of ``name``, in eval mode."""
        meta = self.metas[name]
        model = build_model(meta.architecture, meta.num_classes)
        head = self.head(name) if meta.role == "task" else None
        return load_into(model, self.backbone(name), head).eval()

    def task_data(self, task: str) -> TaskData:
        """The task's data sources (zoos built before data sources existed: their built-in splits)."""
        return task_data(self.metas[task])

    def file_hashes(self) -> dict[str, str]:
        """sha256 of every file of the zoo, keyed by path relative to the zoo root."""
        return {
            str(p.relative_to(self.root)): sha256_file(p)
            for p in sorted(self.root.rglob("*"))
            if p.is_file() and not p.name.startswith(".")
        }


def task_data(meta: ModelMeta) -> TaskData:
    """``meta.data``; for preset models written before it existed, the built-in dataset they were trained on."""
    if meta.data.calibration or meta.data.test or meta.role != "task":
        return meta.data
    from model_store.data.builtin import TASKS

    if (
        meta.provenance.source.startswith("vitmerge zoo build")
        and meta.provenance.dataset == meta.task
        and meta.task in TASKS
    ):
        src = DataSource(kind="builtin", location=meta.task, seed=meta.provenance.split_seed or 0)
        return TaskData(calibration=src, test=src)
    return meta.data


class ZooWriter:
    """Writes a zoo model by model; ``finalize`` writes ``zoo.json`` last."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        (self.root / "models").mkdir(parents=True, exist_ok=True)

    def has_model(self, name: str, config_hash: str | None = None) -> bool:
        """True when ``name`` is fully written (and, if given, built from ``config_hash``)."""
        path = self.root / "models" / name / "meta.json"
        if not path.exists():
            return False
        try:
            meta = _read_schema(path, ModelMeta)
        except ZooFormatError:
            return False
        assert isinstance(meta, ModelMeta)
        return config_hash is None or meta.provenance.config_hash == config_hash

    def read_meta(self, name: str) -> ModelMeta:
        meta = _read_schema(self.root / "models" / name / "meta.json", ModelMeta)
        assert isinstance(meta, ModelMeta)
        return meta

    def add_model(self, meta: ModelMeta, backbone: StateDict, head: StateDict | None = None) -> Path:
        """Write one model; ``meta.json`` goes last so a crash never leaves a valid-looking half model."""
        if meta.role == "task" and not head:
            raise ValueError(f"task model '{meta.name}' needs a head")
        final = self.root / "models" / meta.name
        tmp = self.root / "models" / f".{meta.name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file(_contiguous(backbone), tmp / BACKBONE_FILE)
        if head:
            save_file(_contiguous(head), tmp / HEAD_FILE)
        write_json(tmp / "meta.json", meta.model_dump(mode="json"))
        make_world_readable(tmp)  # servers running as another uid read it (safetensors writes 0600)
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        return final

    def set_data(self, name: str, data: TaskData) -> ModelMeta:
        """Replace a written model's data sources (``meta.json`` rewritten atomically)."""
        meta = self.read_meta(name).model_copy(update={"data": data})
        write_json(self.root / "models" / name / "meta.json", meta.model_dump(mode="json"))
        return meta

    def finalize(self, name: str, base: str | None, tasks: list[str], **fields: object) -> Zoo:
        """Write ``zoo.json`` and return the validated zoo."""
        manifest = ZooManifest.model_validate(
            {"name": name, "base": base, "tasks": tasks, "created_at": utc_timestamp(), **fields}
        )
        write_json(self.root / "zoo.json", manifest.model_dump(mode="json"))
        return Zoo.load(self.root, require_base=base is not None)

    def register(self, meta: ModelMeta) -> Zoo:
        """Add an already written model to ``zoo.json`` (creating it), for importers."""
        path = self.root / "zoo.json"
        if path.exists():
            current = _read_schema(path, ZooManifest)
            assert isinstance(current, ZooManifest)
        else:
            current = ZooManifest(name=self.root.name, created_at=utc_timestamp())
        base, tasks = current.base, [t for t in current.tasks if t != meta.name]
        if meta.role == "base":
            base = meta.name
        else:
            tasks.append(meta.name)
        updated = current.model_copy(update={"base": base, "tasks": tasks})
        write_json(path, updated.model_dump(mode="json"))
        return Zoo.load(self.root, require_base=False)
