"""The model input equals what the checkpoint's OWN library makes of the same file (SPEC section 10).

References, run here on real-shaped images (:mod:`reference_images`):

* transformers' image processors (ViT, DeiT, BEiT, CLIP), both backends: ``torchvision`` (the default in
  transformers 5: the same uint8 kernels, so equal to float rounding) and ``pil`` (Pillow's filters);
* ``timm.data.create_transform`` of ``resolve_data_config`` (center / squash / border crop modes);
* open_clip's ``image_transform`` (shortest / longest / squash).

Tolerances are in uint8 levels (a difference of ``d`` levels is ``d / 255 / std`` in the model input):
Pillow's antialiased filters and torchvision's uint8 kernels differ by rounding, <= 2 levels on
photos (measured: max 1-2; mean <= 0.007, 0.1 on the portrait squashed 2.3:1.3); transformers' PIL
backend <= 6 on that portrait. Pillow's premultiplied RGBA resize (open_clip on an RGBA image)
divides by alpha afterwards, so a 1-level difference becomes 255/alpha levels where the image is
nearly transparent: measured max 11 (mean 0.004). The served answers then must equal the
library-run models' (``test_preprocessing_served.py``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from reference_images import KINDS, write_reference_images
from server_helpers import require

from model_store.data.decode import decode_image
from model_store.data.preprocessing import to_model_input
from model_store.errors import CheckpointImportError
from model_store.importers.clip import open_clip_preprocessing
from model_store.importers.hf_processor import processor_preprocessing
from model_store.importers.timm_checkpoint import default_preprocessing, timm_data_config_preprocessing
from model_store.schema import Architecture, Preprocessing

transformers = require("transformers", "pip install -e '.[test]'")
open_clip = require("open_clip", "pip install -e '.[test]'")
timm_data = require("timm.data", "pip install -e .")

#: open_clip's preprocess on a palette or CMYK PIL image resizes (nearest-neighbour for palette) and pads
#: (CMYK 0 = white) in that mode; vitmerge converts them to RGB first, like `preprocess(img.convert("RGB"))`
OPEN_CLIP_CONVERTED_FIRST = {"palette.gif", "cmyk.jpg"}


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, Path]:
    return write_reference_images(tmp_path_factory.mktemp("reference-images"))


def ours(path: Path, prep: Preprocessing) -> torch.Tensor:
    """What the server makes of the file: its decoder, then the preprocessing."""
    return to_model_input(decode_image(path.read_bytes())[None], prep)[0]


def levels(a: torch.Tensor, b: torch.Tensor, prep: Preprocessing) -> tuple[float, float]:
    """(max, mean) |a - b| in uint8 levels."""
    assert a.shape == b.shape, (a.shape, b.shape)
    d = (a - b).abs() * torch.tensor(prep.std).view(-1, 1, 1) / prep.rescale_factor
    return float(d.max()), float(d.mean())


@pytest.mark.parametrize(
    "kind", ["ViTImageProcessor", "DeiTImageProcessor", "BeitImageProcessor", "CLIPImageProcessor"]
)
def test_transformers_image_processors(images, tmp_path, kind):
    """Both backends; ViT/DeiT/BEiT processors do not convert modes, so users pass `.convert("RGB")`."""
    getattr(transformers, kind)().save_pretrained(tmp_path)
    prep = processor_preprocessing(tmp_path, 224, 3)
    for backend, worst, mean in (("torchvision", 1e-3, 1e-4), ("pil", 6.0, 0.25)):
        proc = transformers.AutoImageProcessor.from_pretrained(tmp_path, backend=backend)
        for name, path in images.items():
            img = Image.open(path)
            ref = proc(images=img if kind == "CLIPImageProcessor" else img.convert("RGB"), return_tensors="pt")
            got_max, got_mean = levels(ours(path, prep), ref["pixel_values"][0], prep)
            assert got_max <= worst + 1e-3 and got_mean <= mean, (kind, backend, name, KINDS[name], got_max, got_mean)


def test_processor_configs_users_write(images, tmp_path):
    """Shortest-edge + crop on a ViT processor, no rescale/normalise, nearest and lanczos resampling."""
    configs = [
        {"size": {"shortest_edge": 250}, "do_center_crop": True, "crop_size": {"height": 224, "width": 224}},
        {"size": {"height": 224, "width": 224}, "resample": 0, "do_normalize": False},
        {"size": {"height": 256, "width": 256}, "resample": 1, "do_center_crop": True, "crop_size": 224},
    ]
    for cfg in configs:
        folder = tmp_path / str(len(list(tmp_path.iterdir())))
        transformers.ViTImageProcessor(**cfg).save_pretrained(folder)
        prep = processor_preprocessing(folder, 224, 3)
        proc = transformers.AutoImageProcessor.from_pretrained(folder)
        for name, path in images.items():
            ref = proc(images=Image.open(path).convert("RGB"), return_tensors="pt")["pixel_values"][0]
            assert levels(ours(path, prep), ref, prep)[0] <= 1e-3, (cfg, name)


@pytest.mark.parametrize(
    "field,value,why",
    [
        ("do_pad", True, "field 'do_pad'"),
        ("resample", 4, "field 'resample'"),
        ("size", {"shortest_edge": 224, "longest_edge": 400}, "size.longest_edge"),
        ("do_resize", False, "field 'do_resize'"),
        ("crop_size", {"height": 200, "width": 200}, "crop_size 200"),
        ("image_mean", [0.5, 0.5], "field 'image_mean'"),
    ],
)
def test_processor_fields_we_cannot_honour_are_refused_naming_file_and_field(tmp_path, field, value, why):
    cfg = {"image_processor_type": "DeiTImageProcessor", field: value}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointImportError, match=why) as err:
        processor_preprocessing(tmp_path, 224, 3)
    assert "preprocessor_config.json" in str(err.value)


TIMM_CONFIGS = [
    {"interpolation": "bicubic", "crop_pct": 0.9, "crop_mode": "center"},
    {"interpolation": "bilinear", "crop_pct": 0.875, "crop_mode": "center"},
    {"interpolation": "bicubic", "crop_pct": 1.0, "crop_mode": "center"},
    {"interpolation": "bicubic", "crop_pct": 0.95, "crop_mode": "squash"},
    {"interpolation": "bilinear", "crop_pct": 0.9, "crop_mode": "border"},
]


@pytest.mark.parametrize("extra", TIMM_CONFIGS, ids=lambda c: f"{c['crop_mode']}-{c['crop_pct']}-{c['interpolation']}")
def test_timm_create_transform(images, extra):
    cfg = {"input_size": (3, 224, 224), "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225), **extra}
    prep = timm_data_config_preprocessing(cfg, "test config")
    transform = timm_data.create_transform(**cfg)
    for name, path in images.items():
        ref = transform(Image.open(path).convert("RGB"))  # timm's loaders convert to RGB
        got_max, got_mean = levels(ours(path, prep), ref, prep)
        assert got_max <= 2.001 and got_mean <= 0.12, (extra, name, got_max, got_mean)


def test_timm_pretrained_configs_are_read_completely():
    """The architecture's own pretrained config: crop_pct / crop_mode / interpolation / mean / std; img_size wins."""
    import timm

    for name in ("vit_small_patch16_224", "deit_tiny_patch16_224", "vit_base_patch16_clip_224"):
        cfg = timm_data.resolve_data_config({}, model=timm.create_model(name, pretrained=False, num_classes=0))
        prep = default_preprocessing(Architecture(timm_name=name))
        assert prep.size == cfg["input_size"][-1] and prep.interpolation == cfg["interpolation"]
        assert prep.crop_pct == pytest.approx(cfg["crop_pct"]) and prep.resize == "shortest_edge"
        assert prep.mean == pytest.approx(list(cfg["mean"])) and prep.std == pytest.approx(list(cfg["std"]))
    small = default_preprocessing(Architecture(timm_name="vit_small_patch16_224", kwargs={"img_size": 56}))
    assert small.size == 56 and small.resize_target() == int(56 / 0.9)


@pytest.mark.parametrize("mode", ["shortest", "longest", "squash"])
def test_open_clip_image_transform(images, mode):
    cfg = {"size": 224, "resize_mode": mode, "interpolation": "bicubic", "fill_color": 0}
    prep = open_clip_preprocessing(cfg, 224, 3, "test config")
    transform = open_clip.image_transform(224, is_train=False, resize_mode=mode, interpolation="bicubic")
    for name, path in images.items():
        img = Image.open(path)
        ref = transform(img.convert("RGB") if name in OPEN_CLIP_CONVERTED_FIRST else img)
        got_max, got_mean = levels(ours(path, prep), ref, prep)
        worst = 16.001 if name == "rgba.png" else 2.001
        assert got_max <= worst and got_mean <= 0.12, (mode, name, got_max, got_mean)


def test_alpha_modes_follow_each_library(images):
    """The same RGBA file: dropped (timm), on white (transformers' do_convert_rgb), premultiplied (open_clip)."""
    path = images["rgba.png"]
    base = {"size": 64, "channels": 3, "mean": [0.0] * 3, "std": [1.0] * 3, "rescale_factor": 1.0}
    drop, white, pre = (ours(path, Preprocessing(**base, alpha=a)) for a in ("drop", "white", "premultiplied"))
    hidden = np.asarray(Image.open(path).convert("RGB").resize((64, 64), Image.Resampling.BILINEAR), np.float32)
    assert float((drop - torch.from_numpy(hidden).permute(2, 0, 1)).abs().max()) <= 1
    # the fully transparent columns (above the half-transparent bottom rows) become white, or black under
    # Pillow's premultiplied resize
    assert float(white[:, :40, :8].min()) == 255 and float(pre[:, :40, :8].max()) == 0


def test_exif_orientation_is_applied_like_transformers_load_image(images, tmp_path):
    img = Image.open(images["landscape_4x3.jpg"])
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to view
    img.save(tmp_path / "rotated.jpg", exif=exif)
    data = (tmp_path / "rotated.jpg").read_bytes()
    upright = decode_image(data)
    want = np.asarray(transformers.image_utils.load_image(str(tmp_path / "rotated.jpg")))
    assert upright.shape == want.shape == (512, 384, 3) and np.array_equal(upright, want)
    assert decode_image(data, exif_transpose=False).shape == (384, 512, 3)


def test_batches_of_one_size_and_ragged_lists_agree(images):
    prep = Preprocessing(size=32, channels=3, mean=[0.5] * 3, std=[0.5] * 3, resize="shortest_edge", crop_pct=0.9)
    pixels = [decode_image(p.read_bytes()) for p in images.values()]
    together = to_model_input(pixels, prep)
    one_by_one = torch.stack([to_model_input(p[None], prep)[0] for p in pixels])
    assert torch.equal(together, one_by_one)
