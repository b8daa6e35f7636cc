"""Attaching data sources to a zoo's task models (``vitmerge zoo data``, import flags, zoo specs)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from model_store.data.sources import Holdout, ImageSet, open_source, parse_source
from model_store.errors import DataSourceError, MissingDataError, ZooFormatError
from model_store.schema import DataSource, TaskData
from model_store.zoo import Zoo, ZooWriter


def checked_source(value: str | None, base_dir: Path, role: str, class_names: Sequence[str]) -> DataSource | None:
    """Parse, list and header-check a source; every problem is a :class:`DataSourceError` naming it."""
    if value is None:
        return None
    source = parse_source(value, base_dir, role)  # type: ignore[arg-type]
    images = open_source(source, role, class_names)  # type: ignore[arg-type]
    images.check_decodable()
    return source


def task_data_from(
    calibration: str | None,
    test: str | None,
    base_dir: Path,
    class_names: Sequence[str],
    current: TaskData | None = None,
) -> TaskData:
    """New data sources for a task (None keeps the current one)."""
    current = current or TaskData()
    return TaskData(
        calibration=checked_source(calibration, base_dir, "calibration", class_names) or current.calibration,
        test=checked_source(test, base_dir, "test", class_names) or current.test,
    )


def attach_data(
    zoo_dir: str | Path,
    task: str,
    calibration: str | None = None,
    test: str | None = None,
    base_dir: Path | None = None,
) -> Zoo:
    """Set a task model's calibration and/or test source (validated first; nothing written on error)."""
    zoo = Zoo.load(zoo_dir, require_base=False)
    if task not in zoo.tasks:
        raise ZooFormatError(f"zoo {zoo.root} has no task '{task}'; its tasks: {', '.join(zoo.tasks) or 'none'}")
    if calibration is None and test is None:
        raise DataSourceError("nothing to attach: give --calibration SRC and/or --test SRC")
    meta = zoo.metas[task]
    try:
        data = task_data_from(calibration, test, base_dir or Path.cwd(), meta.class_names, zoo.task_data(task))
    except DataSourceError as e:
        raise DataSourceError(f"task '{task}': {e}") from e
    ZooWriter(zoo.root).set_data(task, data)
    return Zoo.load(zoo.root, require_base=False)


def calibration_set(zoo: Zoo, task: str) -> ImageSet | None:
    """The task's calibration images (None when it has no calibration source)."""
    src = zoo.task_data(task).calibration
    return None if src is None else open_source(src, "calibration", exif_transpose=zoo.manifest.exif_transpose)


def held_out_set(zoo: Zoo, task: str, holdout: Holdout) -> ImageSet:
    """The held-out part of the task's calibration images (label-free selection measures on it); a task without
    calibration images is a clear error."""
    images = calibration_set(zoo, task)
    if images is None:
        raise MissingDataError(
            f"choosing settings without labels needs calibration images for every task; task '{task}' has none "
            f"(`vitmerge zoo data --task {task} --calibration SRC`)"
        )
    return holdout.split(images)[1]


def require_test_set(zoo: Zoo, task: str, purpose: str = "this") -> ImageSet:
    """:func:`test_set`, refusing a task without test images with a message that says how to add them."""
    images = test_set(zoo, task)
    if images is None:
        raise MissingDataError(
            f"{purpose} needs test images for every task; task '{task}' has none (add them with "
            f"'test:' in the zoo spec or `vitmerge zoo data --task {task} --test SRC`)"
        )
    return images


def test_set(zoo: Zoo, task: str) -> ImageSet | None:
    """The task's labeled test images (None when it has no test source)."""
    src = zoo.task_data(task).test
    return (
        None
        if src is None
        else open_source(src, "test", zoo.metas[task].class_names, exif_transpose=zoo.manifest.exif_transpose)
    )
