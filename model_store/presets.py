"""Zoo presets built by us: a tiny ViT pretrained on fashion, fine-tuned per task.

``tiny`` is the demo zoo the server runs on; ``test`` is a smaller one for the
test suite. Both follow the papers' setting: ONE pretrained checkpoint (our
"ImageNet" is the fashion train split), then every task model is fine-tuned
(all layers) from that same checkpoint with its own head.

Builds are deterministic by seed, resumable per model (each finished model is
kept and reused when its config hash matches) and cached: a complete zoo whose
``zoo.json`` carries the same config hash is returned at once.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm

from model_store.architecture import build_model, head_prefix, split_head
from model_store.datasets import SplitSpec, load_split
from model_store.errors import ZooFormatError
from model_store.preprocessing import to_model_input
from model_store.schema import Architecture, ModelMeta, Preprocessing, Provenance
from model_store.training import TrainConfig, accuracy, train_classifier
from model_store.zoo import BACKBONE_FILE, Zoo, ZooWriter


@dataclass(frozen=True)
class TaskRecipe:
    """How one model of a preset is trained."""

    task: str
    train: TrainConfig
    max_train: int | None = None


@dataclass(frozen=True)
class ZooPreset:
    """Everything that determines a built zoo (its hash names the build)."""

    name: str
    architecture: dict
    preprocessing: dict
    pretrain: TaskRecipe
    tasks: tuple[TaskRecipe, ...]
    split: SplitSpec = field(default_factory=SplitSpec)
    seed: int = 0

    def config_hash(self) -> str:
        blob = json.dumps(asdict(self), sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    @property
    def arch(self) -> Architecture:
        return Architecture.model_validate(self.architecture)

    @property
    def prep(self) -> Preprocessing:
        return Preprocessing.model_validate(self.preprocessing)


_GRAY = {"channels": 1, "mean": [0.5], "std": [0.5]}

PRESETS: dict[str, ZooPreset] = {
    "tiny": ZooPreset(
        name="tiny",
        architecture={
            "timm_name": "vit_tiny_patch16_224",
            "kwargs": {"img_size": 28, "patch_size": 7, "embed_dim": 128, "depth": 4, "num_heads": 4, "in_chans": 1},
        },
        preprocessing={"size": 28, **_GRAY},
        pretrain=TaskRecipe("fashion", TrainConfig(epochs=2, lr=1e-3, batch_size=128), max_train=60000),
        tasks=(
            TaskRecipe("mnist", TrainConfig(epochs=10, lr=5e-4, batch_size=64)),
            TaskRecipe("animals", TrainConfig(epochs=5, lr=5e-4, batch_size=64)),
            TaskRecipe("solar", TrainConfig(epochs=10, lr=5e-4, batch_size=64)),
            TaskRecipe("digits", TrainConfig(epochs=20, lr=5e-4, batch_size=64)),
        ),
    ),
    "test": ZooPreset(
        name="test",
        architecture={
            "timm_name": "vit_tiny_patch16_224",
            "kwargs": {"img_size": 16, "patch_size": 4, "embed_dim": 48, "depth": 2, "num_heads": 2, "in_chans": 1},
        },
        preprocessing={"size": 16, **_GRAY},
        pretrain=TaskRecipe("fashion", TrainConfig(epochs=2, lr=2e-3, batch_size=64), max_train=20000),
        tasks=(
            TaskRecipe("mnist", TrainConfig(epochs=5, lr=1e-3, batch_size=64)),
            TaskRecipe("animals", TrainConfig(epochs=4, lr=1e-3, batch_size=64)),
            TaskRecipe("solar", TrainConfig(epochs=5, lr=1e-3, batch_size=64)),
            TaskRecipe("digits", TrainConfig(epochs=8, lr=1e-3, batch_size=64)),
        ),
    ),
}


@dataclass
class BuildReport:
    """What a build did: which models were trained or reused, and their accuracies."""

    zoo: Zoo
    trained: list[str]
    reused: list[str]
    seconds: float
    test_accuracy: dict[str, float]
    cached: bool = False


def get_preset(name: str) -> ZooPreset:
    if name not in PRESETS:
        raise KeyError(f"unknown zoo preset '{name}'; known presets: {', '.join(sorted(PRESETS))}")
    return PRESETS[name]


def _tensors(task: str, split: str, preset: ZooPreset, limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    data = load_split(task, split, preset.split, limit=limit)  # type: ignore[arg-type]
    assert data.labels is not None
    return to_model_input(data.images, preset.prep), torch.as_tensor(data.labels)


def _train_one(preset: ZooPreset, recipe: TaskRecipe, init: dict[str, torch.Tensor] | None, progress: bool) -> tuple[torch.nn.Module, float, float, tuple[str, ...]]:
    """Train one model (from ``init`` backbone when given); returns model, test acc, seconds, classes."""
    x_tr, y_tr = _tensors(recipe.task, "train", preset, recipe.max_train)
    x_te, y_te = _tensors(recipe.task, "test", preset)
    classes = load_split(recipe.task, "test", preset.split, limit=1).class_names
    torch.manual_seed(preset.seed + recipe.train.seed)
    model = build_model(preset.arch, len(classes))
    if init is not None:
        missing, unexpected = model.load_state_dict(init, strict=False)
        if unexpected or any(not k.startswith(head_prefix(model)) for k in missing):
            raise RuntimeError(f"base checkpoint does not fit the architecture: missing={missing} unexpected={unexpected}")
    seconds = train_classifier(model, x_tr, y_tr, recipe.train, desc=f"{preset.name}:{recipe.task}", progress=progress)
    return model, accuracy(model, x_te, y_te), seconds, classes


def build_zoo(preset_name: str, root: str | Path, force: bool = False, progress: bool = True) -> BuildReport:
    """Build (or return the cached) zoo of ``preset_name`` in directory ``root``."""
    preset = get_preset(preset_name)
    if isinstance(preset, DiffInitPreset):  # one pretraining run per task (model_store/diffinit.py)
        return build_diffinit(preset, root, force, progress)
    root = Path(root)
    chash = preset.config_hash()
    start = time.perf_counter()
    if not force and (root / "zoo.json").exists():
        try:
            zoo = Zoo.load(root)
            if zoo.manifest.config_hash == chash:
                accs = {t: zoo.metas[t].provenance.test_accuracy or 0.0 for t in zoo.tasks}
                return BuildReport(zoo, [], [zoo.base, *zoo.tasks], time.perf_counter() - start, accs, cached=True)
        except ZooFormatError:
            pass
    writer = ZooWriter(root)
    (root / "zoo.json").unlink(missing_ok=True)
    trained, reused, accs = [], [], {}
    names = ["base", *(r.task for r in preset.tasks)]
    with tqdm(total=len(names), desc=f"zoo {preset.name}", unit="model", disable=not progress) as bar:
        if not force and writer.has_model("base", chash):
            reused.append("base")
        else:
            model, acc, secs, _ = _train_one(preset, preset.pretrain, None, progress)
            backbone, _ = split_head(model.state_dict(), head_prefix(model))
            writer.add_model(_meta(preset, "base", None, [], acc, secs, preset.pretrain), backbone)
            trained.append("base")
        bar.update(1)
        base_backbone = load_file(writer.root / "models" / "base" / BACKBONE_FILE)
        for recipe in preset.tasks:
            if not force and writer.has_model(recipe.task, chash):
                reused.append(recipe.task)
                accs[recipe.task] = writer.read_meta(recipe.task).provenance.test_accuracy or 0.0
            else:
                model, acc, secs, classes = _train_one(preset, recipe, base_backbone, progress)
                backbone, head = split_head(model.state_dict(), head_prefix(model))
                writer.add_model(_meta(preset, recipe.task, recipe.task, list(classes), acc, secs, recipe), backbone, head)
                trained.append(recipe.task)
                accs[recipe.task] = acc
            bar.update(1)
    zoo = writer.finalize(preset.name, "base", [r.task for r in preset.tasks], preset=preset.name, config_hash=chash)
    return BuildReport(zoo, trained, reused, time.perf_counter() - start, accs)


def _meta(preset: ZooPreset, name: str, task: str | None, classes: list[str], acc: float, secs: float, recipe: TaskRecipe) -> ModelMeta:
    return ModelMeta(
        name=name,
        role="base" if task is None else "task",
        task=task,
        class_names=classes,
        architecture=preset.arch,
        preprocessing=preset.prep,
        provenance=Provenance(
            source=f"vitmerge zoo build --preset {preset.name}",
            dataset=recipe.task,
            split_seed=preset.split.seed,
            epochs=recipe.train.epochs,
            test_accuracy=acc,
            init_seed=preset.seed,
            config_hash=preset.config_hash(),
            train_seconds=round(secs, 2),
            notes=("pretraining on the fashion train split; head dropped" if task is None else f"fine-tuned from base on {task}"),
        ),
    )


# Zoos of differently-initialised models (issue 8) register here.
from model_store.diffinit import DIFFINIT_PRESETS, DiffInitPreset, build_diffinit

PRESETS.update(DIFFINIT_PRESETS)
