"""Data sources: where a task's calibration (unlabeled) and test (labeled) images come from.

One code path for every zoo. A source is parsed from what a user writes
(:func:`parse_source`), opened into an :class:`ImageSet` (file list + labels, no
pixels yet) and read in chunks into model inputs (:meth:`ImageSet.tensors`):

* ``builtin:<name>`` -- the offline datasets with their seeded splits
  (:mod:`model_store.data.builtin`);
* a folder (calibration) -- every image file below it, labels ignored;
* an ImageFolder (test) -- one sub-folder per class, named like the task's classes;
* a CSV manifest ``path,label`` -- paths relative to the CSV; ``label`` (a class name,
  or its index) may be empty or absent for calibration.

Files are decoded by the server's decoder (format whitelist, pixel cap); files
without an image extension and hidden files are skipped. File sources are read in a
seeded shuffle of their sorted list, so a prefix of ``limit`` images samples every
class and is the same on every run. Only ``limit`` images are ever decoded.
"""

from __future__ import annotations

import csv
import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from model_store.data.builtin import TASKS, SplitSpec, load_split
from model_store.data.decode import DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS, decode_image
from model_store.data.preprocessing import to_model_input
from model_store.errors import DataSourceError, ImageDecodeError
from model_store.schema import DataSource, HoldoutRecord, Preprocessing, SetRecord
from model_store.settings import DataSettings

Role = Literal["calibration", "test"]
BUILTIN_PREFIX = "builtin:"


def parse_source(value: str, base_dir: Path, role: Role, seed: int = 0) -> DataSource:
    """What a user wrote (``builtin:NAME``, a folder, a CSV) -> a typed source.

    Relative paths resolve against ``base_dir`` (the spec file's folder, or the
    working directory on the command line).
    """
    value = str(value).strip()
    if not value:
        raise DataSourceError(f"{role} source is empty")
    if value.startswith(BUILTIN_PREFIX):
        name = value[len(BUILTIN_PREFIX) :]
        if name not in TASKS:
            raise DataSourceError(
                f"{role} source '{value}': unknown built-in dataset '{name}'; built-in datasets: {', '.join(TASKS)}"
            )
        return DataSource(kind="builtin", location=name, seed=seed)
    path = Path(value).expanduser()
    path = (path if path.is_absolute() else base_dir / path).resolve()
    if not path.exists():
        raise DataSourceError(f"{role} source {path} does not exist")
    if path.is_file():
        if path.suffix.lower() != ".csv":
            raise DataSourceError(
                f"{role} source {path} is a file but not a .csv manifest (give a folder of images or a CSV with "
                "columns path,label)"
            )
        return DataSource(kind="csv", location=str(path), seed=seed)
    return DataSource(kind="folder" if role == "calibration" else "imagefolder", location=str(path), seed=seed)


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file()


def _visible(path: Path, root: Path) -> bool:
    return not any(part.startswith(".") for part in path.relative_to(root).parts)


def _image_files(root: Path) -> list[Path]:
    """Every image file below ``root`` (hidden files/folders and other extensions skipped), sorted."""
    return sorted(p for p in root.rglob("*") if _visible(p, root) and _is_image(p))


@dataclass
class ImageSet:
    """A task's images of one role, listed but not decoded.

    ``paths`` (file sources) or ``arrays`` (built-in) hold the images in the source's
    canonical order; ``labels`` are class indices (test) or None (calibration).
    """

    source: DataSource
    role: Role
    paths: list[Path] | None
    arrays: np.ndarray | None
    labels: np.ndarray | None
    max_pixels: int = DEFAULT_MAX_PIXELS
    exif_transpose: bool = True

    def __len__(self) -> int:
        return len(self.paths) if self.paths is not None else len(self.arrays)  # type: ignore[arg-type]

    def pixels(self, i: int) -> np.ndarray:
        """Image ``i`` as uint8 ``(H, W)`` or ``(H, W, 3)``; a file that does not decode is named."""
        if self.arrays is not None:
            return self.arrays[i]
        assert self.paths is not None
        path = self.paths[i]
        try:
            return decode_image(path.read_bytes(), self.max_pixels, str(path), exif_transpose=self.exif_transpose)
        except OSError as e:
            raise DataSourceError(f"{self.role} image {path} cannot be read: {e}") from e
        except ImageDecodeError as e:
            raise DataSourceError(f"{self.role} image {e}") from e

    def count(self, limit: int | None = None) -> int:
        return len(self) if limit is None else min(limit, len(self))

    def chunks(self, limit: int | None = None, size: int = 256) -> Iterator[np.ndarray | list[np.ndarray]]:
        """The first ``limit`` images as uint8 pixels, ``size`` at a time: a slice of the built-in array, or a
        list of decoded files (any sizes) -- what :func:`~model_store.data.preprocessing.to_model_input` takes."""
        n = self.count(limit)
        for start in range(0, n, size):
            stop = min(start + size, n)
            if self.arrays is not None:
                yield self.arrays[start:stop]
            else:
                yield [self.pixels(i) for i in range(start, stop)]

    def tensors(self, prep: Preprocessing, limit: int | None = None) -> torch.Tensor:
        """The first ``limit`` images as model input ``(n, C, S, S)``."""
        return self.tensors_for([prep], limit)[0]

    def tensors_for(self, preps: Sequence[Preprocessing], limit: int | None = None) -> list[torch.Tensor]:
        """The first ``limit`` images once per preprocessing in ``preps`` (e.g. the ViT's and the gate's);
        each file is decoded once."""
        outs: list[list[torch.Tensor]] = [[] for _ in preps]
        for chunk in self.chunks(limit):
            for out, p in zip(outs, preps):
                out.append(to_model_input(chunk, p))
        return [torch.cat(o) if o else torch.empty(0, p.channels, p.size, p.size) for o, p in zip(outs, preps)]

    def label_tensor(self, limit: int | None = None) -> torch.Tensor:
        if self.labels is None:
            raise DataSourceError(f"{self.source.describe()} has no labels")
        return torch.as_tensor(self.labels[: self.count(limit)])

    def check_decodable(self) -> None:
        """Open every file's header (format, size): a bad file is named before any work."""
        for path in self.paths or []:
            try:
                decode_image(path.read_bytes(), self.max_pixels, what=str(path), header_only=True)
            except OSError as e:
                raise DataSourceError(f"{self.role} image {path} cannot be read: {e}") from e
            except ImageDecodeError as e:
                raise DataSourceError(f"{self.role} image {e}") from e

    def fingerprint(self) -> str:
        """sha256 of the file list (relative path, size, label) or of the built-in split."""
        h = hashlib.sha256(f"{self.source.kind}:{self.role}:{len(self)}\n".encode())
        if self.paths is not None:
            root = Path(self.source.location)
            root = root.parent if root.is_file() else root
            for i, p in enumerate(self.paths):
                label = "" if self.labels is None else str(int(self.labels[i]))
                h.update(
                    f"{p.relative_to(root) if p.is_relative_to(root) else p}\t{p.stat().st_size}\t{label}\n".encode()
                )
        else:
            h.update(f"{self.source.location}:{self.source.seed}".encode())
            h.update(np.ascontiguousarray(self.arrays[:, :4]).tobytes() if self.arrays is not None else b"")
        return h.hexdigest()

    def record(self) -> SetRecord:
        """What a bundle manifest keeps of this set (to audit and repeat a merge)."""
        return SetRecord(source=self.source, images=len(self), sha256=self.fingerprint())

    def subset(self, indices: Sequence[int]) -> ImageSet:
        """The images at ``indices`` (in that order), same source and role."""
        idx = np.asarray(indices, dtype=np.int64)
        paths = [self.paths[i] for i in idx] if self.paths is not None else None
        arrays = self.arrays[idx] if self.arrays is not None else None
        labels = self.labels[idx] if self.labels is not None else None
        return ImageSet(self.source, self.role, paths, arrays, labels, self.max_pixels, self.exif_transpose)


@dataclass(frozen=True)
class Holdout:
    """A seeded held-out part of each task's calibration images (SPEC section 9): label-free selection
    measures agreement on it, and nothing a merge fits (gates, routers, Grams, Fisher) ever reads it."""

    fraction: float = 0.2
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 < self.fraction < 1.0:
            raise ValueError(f"the held-out fraction must be in (0, 1), got {self.fraction}")

    def indices(self, n: int) -> tuple[list[int], list[int]]:
        """``(fit, held_out)`` positions of ``n`` images, each in the source's order; at least one of each."""
        if n < 2:
            raise DataSourceError(f"a held-out part needs at least 2 calibration images, the task has {n}")
        k = min(n - 1, max(1, round(self.fraction * n)))
        perm = np.random.default_rng(self.seed).permutation(n)
        return sorted(perm[k:].tolist()), sorted(perm[:k].tolist())

    def split(self, images: ImageSet) -> tuple[ImageSet, ImageSet]:
        """``(fit, held_out)`` parts of ``images``."""
        fit, held = self.indices(len(images))
        return images.subset(fit), images.subset(held)

    def record(self, images: ImageSet) -> HoldoutRecord:
        """What a bundle manifest keeps of the split: fraction, seed, both sizes and the held-out part's sha256."""
        fit, held = self.split(images)
        return HoldoutRecord(
            fraction=self.fraction,
            seed=self.seed,
            fit_images=len(fit),
            held_out_images=len(held),
            held_out_sha256=held.fingerprint(),
        )


def _shuffled(items: list, seed: int) -> list:
    order = np.random.default_rng(seed).permutation(len(items))
    return [items[i] for i in order]


def _class_index(label: str, class_names: Sequence[str], where: str) -> int:
    if label in class_names:
        return list(class_names).index(label)
    if label.isdigit() and int(label) < len(class_names):
        return int(label)
    raise DataSourceError(f"{where}: label '{label}' is not one of the task's classes ({', '.join(class_names)})")


def _read_csv(path: Path, role: Role, class_names: Sequence[str] | None) -> tuple[list[Path], list[int] | None]:
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
            fields = [c.strip() for c in reader.fieldnames or []]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataSourceError(f"{role} manifest {path} cannot be read: {e}") from e
    if not rows:
        raise DataSourceError(
            f"{role} manifest {path} has no rows (expected a header 'path,label' and one row per image)"
        )
    if "path" not in fields:
        raise DataSourceError(f"{role} manifest {path}: no 'path' column (columns: {', '.join(fields)})")
    paths: list[Path] = []
    labels: list[int] = []
    for n, row in enumerate(rows, start=2):
        row = {k.strip(): (v or "").strip() for k, v in row.items() if k is not None}
        rel = row.get("path", "")
        if not rel:
            raise DataSourceError(f"{role} manifest {path}, line {n}: empty path")
        file = (path.parent / rel).resolve()
        if file.suffix.lower() not in IMAGE_EXTENSIONS:
            continue
        if not file.is_file():
            raise DataSourceError(f"{role} manifest {path}, line {n}: image {file} does not exist")
        paths.append(file)
        if role == "test":
            label = row.get("label", "")
            if not label:
                raise DataSourceError(f"{role} manifest {path}, line {n}: test images need a label (column 'label')")
            assert class_names is not None
            labels.append(_class_index(label, class_names, f"{role} manifest {path}, line {n}"))
    return paths, (labels if role == "test" else None)


def _read_imagefolder(root: Path, class_names: Sequence[str]) -> tuple[list[Path], list[int]]:
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise DataSourceError(
            f"test folder {root} has no class sub-folders (expected one folder per class: {', '.join(class_names)})"
        )
    unknown = [p.name for p in folders if p.name not in class_names]
    if unknown:
        raise DataSourceError(
            f"test folder {root}: sub-folder(s) {', '.join(unknown)} are not classes of the task (classes: "
            f"{', '.join(class_names)})"
        )
    paths: list[Path] = []
    labels: list[int] = []
    for folder in folders:
        files = _image_files(folder)
        if not files:
            raise DataSourceError(f"test folder {root}: class folder '{folder.name}' has no images")
        paths += files
        labels += [list(class_names).index(folder.name)] * len(files)
    return paths, labels


def open_source(
    source: DataSource,
    role: Role,
    class_names: Sequence[str] | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    exif_transpose: bool = True,
) -> ImageSet:
    """List a source's images (and labels for test); refuses empty or mislabeled sources.

    ``exif_transpose``: photos with an EXIF orientation are turned upright when decoded (the zoo's setting).
    """
    if role == "test" and not class_names:
        raise DataSourceError("test images need the task's class names")
    if source.kind == "builtin":
        data = load_split(source.location, role, SplitSpec(seed=source.seed), cache_root=DataSettings().cache_root())
        if role == "test" and class_names is not None and len(class_names) != len(data.class_names):
            raise DataSourceError(
                f"builtin:{source.location} has {len(data.class_names)} classes, the task has {len(class_names)}"
            )
        return ImageSet(source, role, None, data.images, data.labels, max_pixels, exif_transpose)
    root = Path(source.location)
    if not root.exists():
        raise DataSourceError(f"{role} source {root} does not exist")
    labels: list[int] | None = None
    if source.kind == "csv":
        paths, labels = _read_csv(root, role, class_names)
    elif source.kind == "imagefolder":
        assert class_names is not None
        paths, labels = _read_imagefolder(root, class_names)
    else:
        paths = _image_files(root)
    if not paths:
        raise DataSourceError(
            f"{role} source {root} has no images (extensions read: {', '.join(sorted(IMAGE_EXTENSIONS))})"
        )
    pairs = _shuffled(list(zip(paths, labels if labels is not None else [None] * len(paths))), source.seed)
    ordered = [p for p, _ in pairs]
    arr = None if labels is None else np.asarray([lab for _, lab in pairs], dtype=np.int64)
    return ImageSet(source, role, ordered, None, arr, max_pixels, exif_transpose)
