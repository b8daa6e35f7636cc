"""Zoos of differently-initialised ViTs (issue 8): no shared pretrained base.

Every task model gets its OWN pretraining run on fashion (the tiny presets'
"ImageNet"), from a different seed, which changes both the random initialisation
and the data order, and is then fine-tuned on its task, as in FS-Merge section
3.2. The zoo records this: ``zoo.json`` has ``shared_init: false``, each model's
``provenance.init_seed`` is its pretraining seed, and the pretrained checkpoints
are kept as ``models/base-<task>`` (the manifest's ``base`` is the first task's,
which gives the zoo its architecture and preprocessing; no other model was
fine-tuned from it). Task-vector methods refuse such a zoo.

Builds keep :func:`model_store.presets.build_zoo`'s contract: deterministic by
seed, resumable per model (matched by config hash), cached when complete.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path

from safetensors.torch import load_file

from model_store.architecture import head_prefix, split_head
from model_store.presets import (
    _GRAY,
    BuildReport,
    TaskRecipe,
    ZooPreset,
    _meta,
    _train_one,
    cached_build,
)
from model_store.training import TrainConfig
from model_store.zoo import BACKBONE_FILE, ZooWriter


@dataclass(frozen=True)
class DiffInitPreset(ZooPreset):
    """A preset whose task models each come from their own pretraining run.

    ``pretrain_seeds[i]`` seeds task i's pretraining (initialisation and data order).
    """

    pretrain_seeds: tuple[int, ...] = ()

    def pretrain_for(self, i: int) -> TaskRecipe:
        assert self.pretrain is not None
        return replace(self.pretrain, train=replace(self.pretrain.train, seed=self.pretrain_seeds[i]))


def base_name(task: str) -> str:
    return f"base-{task}"


def build_diffinit(preset: DiffInitPreset, root: str | Path, force: bool = False, progress: bool = True) -> BuildReport:
    """Build (or return the cached) differently-initialised zoo of ``preset`` in ``root``."""
    from tqdm.auto import tqdm

    if len(preset.pretrain_seeds) != len(preset.tasks) or len(set(preset.pretrain_seeds)) != len(preset.tasks):
        raise ValueError(f"preset '{preset.name}' needs one distinct pretraining seed per task")
    root = Path(root)
    chash = preset.config_hash()
    start = time.perf_counter()
    if not force and (cached := cached_build(root, chash, start)) is not None:
        return cached
    writer = ZooWriter(root)
    (root / "zoo.json").unlink(missing_ok=True)
    trained, reused, accs = [], [], {}
    with tqdm(total=2 * len(preset.tasks), desc=f"zoo {preset.name}", unit="model", disable=not progress) as bar:
        for i, recipe in enumerate(preset.tasks):
            base, seed = base_name(recipe.task), preset.pretrain_seeds[i]
            pre = preset.pretrain_for(i)
            if not force and writer.has_model(base, chash):
                reused.append(base)
            else:
                model, acc, secs, _ = _train_one(preset, pre, None, progress)
                backbone, _ = split_head(model.state_dict(), head_prefix(model))
                writer.add_model(_diff_meta(preset, base, None, [], acc, secs, pre, seed), backbone)
                trained.append(base)
            bar.update(1)
            if not force and writer.has_model(recipe.task, chash):
                reused.append(recipe.task)
                accs[recipe.task] = writer.read_meta(recipe.task).provenance.test_accuracy or 0.0
            else:
                init = load_file(writer.root / "models" / base / BACKBONE_FILE)
                model, acc, secs, classes = _train_one(preset, recipe, init, progress)
                backbone, head = split_head(model.state_dict(), head_prefix(model))
                writer.add_model(_diff_meta(preset, recipe.task, recipe.task, list(classes), acc, secs, recipe, seed), backbone, head)
                trained.append(recipe.task)
                accs[recipe.task] = acc
            bar.update(1)
    tasks = [r.task for r in preset.tasks]
    zoo = writer.finalize(preset.name, base_name(tasks[0]), tasks, shared_init=False, preset=preset.name, config_hash=chash)
    return BuildReport(zoo, trained, reused, time.perf_counter() - start, accs)


def _diff_meta(preset: DiffInitPreset, name: str, task: str | None, classes: list[str], acc: float, secs: float, recipe: TaskRecipe, seed: int):
    meta = _meta(preset, name, task, classes, acc, secs, recipe)
    note = (f"own pretraining on the fashion train split (seed {seed}: init and data order); head dropped" if task is None
            else f"fine-tuned on {task} from {base_name(task)} (pretraining seed {seed}); shares no initialisation with the other task models")
    prov = meta.provenance.model_copy(update={"init_seed": seed, "notes": note})
    return meta.model_copy(update={"provenance": prov})


_TINY_ARCH = {"timm_name": "vit_tiny_patch16_224", "kwargs": {"img_size": 28, "patch_size": 7, "embed_dim": 128, "depth": 4, "num_heads": 4, "in_chans": 1}}
_TEST_ARCH = {"timm_name": "vit_tiny_patch16_224", "kwargs": {"img_size": 16, "patch_size": 4, "embed_dim": 48, "depth": 2, "num_heads": 2, "in_chans": 1}}

DIFFINIT_PRESETS: dict[str, DiffInitPreset] = {
    # The tiny preset's architecture and recipes; four pretraining runs instead of one.
    "tiny-diffinit": DiffInitPreset(
        name="tiny-diffinit",
        architecture=_TINY_ARCH,
        preprocessing={"size": 28, **_GRAY},
        pretrain=TaskRecipe("fashion", TrainConfig(epochs=2, lr=1e-3, batch_size=128), max_train=60000),
        tasks=(
            TaskRecipe("mnist", TrainConfig(epochs=10, lr=5e-4, batch_size=64)),
            TaskRecipe("animals", TrainConfig(epochs=5, lr=5e-4, batch_size=64)),
            TaskRecipe("solar", TrainConfig(epochs=10, lr=5e-4, batch_size=64)),
            TaskRecipe("digits", TrainConfig(epochs=20, lr=5e-4, batch_size=64)),
        ),
        pretrain_seeds=(11, 22, 33, 44),
    ),
    # For the test suite: the `test` preset's architecture, two tasks, short pretraining.
    "test-diffinit": DiffInitPreset(
        name="test-diffinit",
        architecture=_TEST_ARCH,
        preprocessing={"size": 16, **_GRAY},
        pretrain=TaskRecipe("fashion", TrainConfig(epochs=2, lr=2e-3, batch_size=64), max_train=10000),
        tasks=(
            TaskRecipe("mnist", TrainConfig(epochs=8, lr=2e-3, batch_size=64)),
            TaskRecipe("digits", TrainConfig(epochs=20, lr=2e-3, batch_size=64)),
        ),
        pretrain_seeds=(11, 22),
    ),
}
