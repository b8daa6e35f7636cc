"""Reading raw checkpoint files and writing imported models into a zoo."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import load_file

from model_store.architecture import StateDict, build_model, head_prefix, load_into, split_head
from model_store.data.attach import task_data_from
from model_store.errors import CheckpointImportError
from model_store.schema import Architecture, LoraAdapter, ModelMeta, Preprocessing, Provenance, TaskData
from model_store.zoo import Zoo, ZooWriter

_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "module")


def read_state_dict(path: str | Path) -> StateDict:
    """Tensors of a checkpoint file: safetensors, or a torch pickle read with ``weights_only``.

    Unwraps the usual containers (``{"state_dict": ...}``, ``{"model": ...}``) and a
    ``module.`` prefix left by DataParallel/DDP.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointImportError(f"checkpoint {path} does not exist")
    state: object
    if path.suffix == ".safetensors":
        state = load_file(path)
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise CheckpointImportError(f"{path}: not a readable torch checkpoint ({e})") from e
    for key in _WRAPPER_KEYS:
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointImportError(f"{path}: expected a dict of tensors")
    if all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def read_json(path: Path) -> dict:
    """A JSON file of a checkpoint; invalid JSON is an import error naming the file."""
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointImportError(f"{path}: invalid JSON ({e})") from e


def read_hf_config(ckpt_dir: Path) -> dict:
    """``config.json`` of a Hugging Face checkpoint directory."""
    if not (ckpt_dir / "config.json").exists():
        raise CheckpointImportError(f"{ckpt_dir}: config.json is missing (not a Hugging Face checkpoint directory)")
    return read_json(ckpt_dir / "config.json")


def hf_weights(ckpt_dir: Path) -> Path:
    """``model.safetensors`` (else ``pytorch_model.bin``) of a Hugging Face checkpoint directory."""
    found = next((ckpt_dir / f for f in ("model.safetensors", "pytorch_model.bin") if (ckpt_dir / f).exists()), None)
    if found is None:
        raise CheckpointImportError(f"{ckpt_dir}: neither model.safetensors nor pytorch_model.bin found")
    return found


def id2label_classes(config: dict, state: StateDict) -> list[str] | None:
    """Class names from an HF config's ``id2label`` when they fit the state's head, else None."""
    id2label = config.get("id2label") or {}
    labels = [str(id2label[k]) for k in sorted(id2label, key=int)]
    head = state.get("head.weight")
    return labels if labels and head is not None and len(labels) == head.shape[0] else None


@dataclass(frozen=True)
class ImportTarget:
    """Where an imported model goes and as what (every importer takes one).

    ``zoo_dir``/``name``/``role``: the zoo directory, the model's name there, ``base`` or ``task``. A task
    model's ``task`` name (default ``name``), ``class_names`` (default: the checkpoint's own, else 0..C-1),
    ``calibration``/``test`` data sources (``builtin:NAME``, a folder, a CSV; relative to ``data_dir``,
    default the working directory). Preprocessing: ``preprocessing`` replaces the checkpoint's own;
    ``adjust_preprocessing`` edits it (a zoo spec's override).
    """

    zoo_dir: str | Path
    name: str
    role: Literal["base", "task"] = "task"
    task: str | None = None
    class_names: list[str] | None = None
    preprocessing: Preprocessing | None = None
    adjust_preprocessing: Callable[[Preprocessing], Preprocessing] | None = None
    calibration: str | None = None
    test: str | None = None
    data_dir: str | Path | None = None

    def preprocessing_for(self, own: Preprocessing) -> Preprocessing:
        """The model's preprocessing: the override, else the checkpoint's ``own`` (edited when asked)."""
        if self.preprocessing is not None:
            return self.preprocessing
        return self.adjust_preprocessing(own) if self.adjust_preprocessing is not None else own


def save_imported(
    target: ImportTarget,
    state: StateDict,
    arch: Architecture,
    prep: Preprocessing,
    source: str,
    class_names: list[str] | None = None,
    lora: LoraAdapter | None = None,
) -> Zoo:
    """Validate ``state`` by a strict load into ``arch`` and add it to ``target``'s zoo.

    ``prep``: the checkpoint's own preprocessing (``target`` may replace or edit it); ``class_names``: the
    checkpoint's own (``target.class_names`` win). Data sources are checked before anything is written.
    ``lora``: the adapter the model was made from (kept in its provenance).
    """
    role, name, task = target.role, target.name, target.task
    calibration, test, data_dir = target.calibration, target.test, target.data_dir
    class_names = target.class_names or class_names
    prep = target.preprocessing_for(prep)
    if role not in ("base", "task"):
        raise CheckpointImportError(f"role must be 'base' or 'task', got '{role}'")
    probe = build_model(arch, 0)
    backbone, head = split_head(state, head_prefix(probe))
    if role == "task":
        classes = class_names or _default_classes(head)
        model = build_model(arch, len(classes))
    else:
        classes, head = [], {}
        model = probe
    try:
        load_into(model, backbone, head)
    except RuntimeError as e:
        raise CheckpointImportError(f"checkpoint does not fit {arch.timm_name} {arch.kwargs}: {str(e)[:800]}") from e
    if role == "base" and (calibration or test):
        raise CheckpointImportError("data sources belong to task models; import the base without --calibration/--test")
    data = (
        task_data_from(calibration, test, Path(data_dir) if data_dir else Path.cwd(), classes)
        if role == "task"
        else TaskData()
    )
    meta = ModelMeta(
        name=name,
        role=role,
        task=(task or name) if role == "task" else None,
        class_names=classes,
        architecture=arch,
        preprocessing=prep,
        provenance=Provenance(source=source, lora=lora),
        data=data,
    )
    writer = ZooWriter(target.zoo_dir)
    writer.add_model(meta, backbone, head or None)
    return writer.register(meta)


def _default_classes(head: StateDict) -> list[str]:
    weights = [v for k, v in head.items() if k.endswith("weight")]
    if not weights:
        raise CheckpointImportError(
            "task checkpoint has no classifier head; import it with --role base or pass a checkpoint with a head"
        )
    return [str(i) for i in range(weights[0].shape[0])]


def check_fits_zoo(zoo_dir: str | Path, name: str, backbone: StateDict, arch: Architecture) -> None:
    """Refuse, before anything is written, a model whose backbone does not fit the zoo's models.

    The reference is the zoo's base (else its first task, other than ``name``); the error
    names the first tensor that is missing, extra or of another shape (a CLIP tower's
    projection :data:`~model_store.architecture.PROJECTION_KEY` of another width included),
    then an architecture difference. Values may differ: a fine-tuned projection is a task's
    own 2-D weight like any other, merged by every method.
    """
    if not (Path(zoo_dir) / "zoo.json").exists():
        return
    zoo = Zoo.load(zoo_dir, require_base=False)
    others = [n for n in [zoo.manifest.base, *zoo.tasks] if n and n != name]
    if not others or not zoo.manifest.shared_init:
        return
    ref = others[0]
    shapes = zoo.backbone_shapes(ref)
    for key in sorted(set(shapes) | set(backbone)):
        mine = tuple(backbone[key].shape) if key in backbone else None
        if mine != shapes.get(key):
            raise CheckpointImportError(
                f"backbone tensor '{key}' is {_shape(mine)} in this checkpoint but {_shape(shapes.get(key))} in "
                f"'{ref}' of zoo {zoo.root}: it is not the same architecture as the zoo's models"
            )
    if zoo.metas[ref].architecture != arch:
        raise CheckpointImportError(
            f"architecture {arch.model_dump(mode='json')} differs from '{ref}''s "
            f"{zoo.metas[ref].architecture.model_dump(mode='json')} in zoo {zoo.root}"
        )


def _shape(shape: tuple[int, ...] | None) -> str:
    return "absent" if shape is None else "x".join(map(str, shape)) if shape else "a scalar"


def read_head(path: str | Path, dim: int, logit_scale: float | None = None) -> StateDict:
    """A linear head file -> ``head.weight`` (classes x ``dim``) / ``head.bias``, the logit scale folded in.

    The file (safetensors or a torch state dict) holds ``weight`` (or ``head.weight``)
    and optionally ``bias`` and ``logit_scale`` (CLIP's log-parameterised scale, as in
    ``CLIPModel.logit_scale``: the head is multiplied by its exp). ``logit_scale`` here is a
    plain multiplier (e.g. 100 for CLIP text-embedding heads saved without it).
    """
    tensors = read_state_dict(path)
    weight = tensors.get("weight", tensors.get("head.weight"))
    if weight is None:
        raise CheckpointImportError(f"head file {path}: no 'weight' tensor (classes x {dim}); found {sorted(tensors)}")
    if weight.ndim != 2 or weight.shape[1] != dim:
        hint = " (transposed? it must be classes x dim)" if weight.ndim == 2 and weight.shape[0] == dim else ""
        raise CheckpointImportError(
            f"head file {path}: 'weight' is {_shape(tuple(weight.shape))}, the model's embedding has {dim} "
            f"dimensions{hint}"
        )
    bias = tensors.get("bias", tensors.get("head.bias", torch.zeros(weight.shape[0])))
    if tuple(bias.shape) != (weight.shape[0],):
        raise CheckpointImportError(
            f"head file {path}: 'bias' is {_shape(tuple(bias.shape))}, expected {weight.shape[0]}"
        )
    scale = 1.0
    if "logit_scale" in tensors:
        if logit_scale is not None:
            raise CheckpointImportError(f"head file {path} has a logit_scale: do not pass another one")
        scale = float(tensors["logit_scale"].float().exp())
    elif logit_scale is not None:
        scale = float(logit_scale)
    return {"head.weight": weight.float() * scale, "head.bias": bias.float() * scale}
