"""Reading raw checkpoint files and writing imported models into a zoo."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from model_store.architecture import StateDict, build_model, head_prefix, load_into, split_head
from model_store.data.attach import task_data_from
from model_store.errors import CheckpointImportError
from model_store.schema import Architecture, ModelMeta, Preprocessing, Provenance, TaskData
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


def save_imported(
    zoo_dir: str | Path,
    name: str,
    role: str,
    state: StateDict,
    arch: Architecture,
    prep: Preprocessing,
    source: str,
    task: str | None = None,
    class_names: list[str] | None = None,
    calibration: str | None = None,
    test: str | None = None,
    data_dir: str | Path | None = None,
) -> Zoo:
    """Validate ``state`` by a strict load into ``arch`` and add it to the zoo at ``zoo_dir``.

    ``calibration``/``test`` are data sources (``builtin:NAME``, a folder, a CSV; relative
    to ``data_dir``, default the working directory), checked before anything is written.
    """
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
        provenance=Provenance(source=source),
        data=data,
    )
    writer = ZooWriter(zoo_dir)
    writer.add_model(meta, backbone, head or None)
    return writer.register(meta)


def _default_classes(head: StateDict) -> list[str]:
    weights = [v for k, v in head.items() if k.endswith("weight")]
    if not weights:
        raise CheckpointImportError(
            "task checkpoint has no classifier head; import it with --role base or pass a checkpoint with a head"
        )
    return [str(i) for i in range(weights[0].shape[0])]
