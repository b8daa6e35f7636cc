"""Real-shaped image files for the preprocessing reference tests: foolbox's ImageNet photos cut to the
shapes users send (4:3, 16:9, portrait, a tiny odd size) and in the modes they come in (gray, RGBA with
soft and hard transparency, a palette GIF, a CMYK JPEG, an EXIF-rotated photo)."""

from __future__ import annotations

import glob
import importlib.util
from pathlib import Path

import numpy as np
from PIL import Image

#: file name -> what it is (the modes a library may treat specially)
KINDS = {
    "landscape_4x3.jpg": "RGB 4:3 JPEG",
    "wide_16x9.png": "RGB 16:9 PNG",
    "portrait.jpg": "RGB portrait JPEG",
    "tiny_23x17.png": "RGB, smaller than the model input",
    "gray.png": "gray (L) PNG",
    "rgba.png": "RGBA PNG, transparent, soft and half-transparent regions",
    "palette.gif": "palette (P) GIF",
    "cmyk.jpg": "CMYK JPEG",
}


def foolbox_photos() -> list[Path]:
    root = Path(importlib.util.find_spec("foolbox").origin).parent / "data"  # type: ignore[arg-type,union-attr]
    return sorted(Path(p) for p in glob.glob(str(root / "imagenet_*.jpg")))


def write_reference_images(folder: Path) -> dict[str, Path]:
    """Write every :data:`KINDS` image into ``folder``; returns name -> path."""
    folder.mkdir(parents=True, exist_ok=True)
    photos = foolbox_photos()

    def photo(i: int) -> Image.Image:
        return Image.open(photos[i]).convert("RGB")

    rgba = photo(5).crop((0, 0, 300, 260)).convert("RGBA")
    alpha = np.full((260, 300), 255, np.uint8)
    alpha[:, :60] = 0  # fully transparent (its colour hidden)
    alpha[:, 60:120] = np.linspace(0, 255, 60)[None].astype(np.uint8)  # a soft edge
    alpha[180:, :] = 128
    rgba.putalpha(Image.fromarray(alpha))
    images = {
        "landscape_4x3.jpg": photo(0).crop((0, 64, 512, 448)),
        "wide_16x9.png": photo(1).crop((0, 112, 512, 400)),
        "portrait.jpg": photo(2).crop((100, 0, 388, 512)),
        "tiny_23x17.png": photo(3).resize((23, 17), Image.Resampling.BICUBIC),
        "gray.png": photo(4).convert("L").crop((0, 0, 400, 300)),
        "rgba.png": rgba,
        "palette.gif": photo(6).crop((0, 0, 320, 240)).quantize(64),
        "cmyk.jpg": photo(7).crop((0, 0, 360, 480)).convert("CMYK"),
    }
    out = {}
    for name, img in images.items():
        img.save(folder / name)
        out[name] = folder / name
    return out
