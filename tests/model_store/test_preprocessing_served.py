"""Served answers equal the user's own models run by their own libraries (issue 33), over HTTP.

Four user-style zoos, each checkpoint built here by its library at a tiny size and saved with its own
preprocessing config, served from a zoo spec through the real app (`/v1/classify`, task given) on
real-shaped files (:mod:`reference_images`):

* Hugging Face ViTs with DIFFERENT processors per task (a squash ViTImageProcessor, a DeiT-style
  resize 40 + crop 32): a full-rank ``tsv_c`` bundle (exact per task) -- each task served with ITS
  preprocessing; a routed bundle sends each image to a task and gives that task's own answer;
* a timm ViT (``create_transform`` of ``resolve_data_config``: crop_pct 0.9, bicubic);
* an HF CLIP tower + head (``CLIPImageProcessor``: shortest edge, crop, composite on white);
* an open_clip tower + head (``image_transform``, resize_mode longest: padded, premultiplied alpha).

Transformers' default backend runs the same uint8 kernels as vitmerge: probabilities equal to 1e-4.
timm and open_clip run Pillow's filters (<= 2 levels apart, test_preprocessing_reference.py): the
top-1 must be the same on every image, probabilities within 0.02.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from reference_images import foolbox_photos, write_reference_images
from safetensors.torch import save_file
from server_helpers import AsgiHarness, require

from model_store.bundle import BundleStore
from model_store.schema import BundleSpec
from model_store.settings import StoreLayout
from server.cli import main
from server.http.settings import ServerSettings

transformers = require("transformers", "pip install -e '.[test]'")
open_clip = require("open_clip", "pip install -e '.[test]'")
timm = require("timm", "pip install -e .")
MEAN_A, STD_A = [0.45, 0.4, 0.35], [0.25, 0.26, 0.27]
OPEN_CLIP_RGB_FIRST = {"palette.gif", "cmyk.jpg"}  # see test_preprocessing_reference.py


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, Path]:
    return write_reference_images(tmp_path_factory.mktemp("served-images"))


def _jitter(model: torch.nn.Module, seed: int, scale: float = 0.05, skip: str = "\0") -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if skip not in name:
                p.add_(scale * torch.randn(p.shape, generator=gen))
    return model.eval()


def _calibration(folder: Path, first: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for p in foolbox_photos()[first : first + 6]:
        shutil.copy(p, folder / p.name)
    return folder


def _serve(store: Path, zoo: str, method: str, params: dict[str, object] | None = None) -> AsgiHarness:
    args = ["merge", "--zoo", zoo, "--store", str(store), "--method", method, "--quiet"]
    for k, v in (params or {}).items():
        args += ["--param", f"{k}={v}"]
    assert main(args) == 0
    settings = ServerSettings(store=store, zoo=str(store / "zoos" / zoo), watch_interval_s=0, device="cpu")
    return AsgiHarness(settings)


def _served(h: AsgiHarness, path: Path, task: str | None, classes: list[str]) -> tuple[str, torch.Tensor]:
    """(task, class probabilities in class order) of one served file."""
    form = {"top_k": str(len(classes))} | ({"task": task} if task else {})
    r = h.request("POST", "/v1/classify", files={"image": (path.name, path.read_bytes())}, data=form)
    assert r.status_code == 200, r.text
    pred = r.json()["predictions"][0]
    probs = torch.zeros(len(classes))
    for c in pred["top_k"]:
        probs[c["index"]] = c["probability"]
    return pred["task"]["name"], probs


def _create(spec: Path, store: Path) -> None:
    assert main(["zoo", "create", str(spec), "--store", str(store), "--quiet"]) == 0


# -- Hugging Face ViTs, a different processor per task ----------------------------------------------
def _hf_vit(num_labels: int, seed: int):
    cfg = transformers.ViTConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=32,
        patch_size=8,
        num_labels=num_labels,
        id2label={i: f"c{i}" for i in range(num_labels)},
        label2id=None,
    )
    torch.manual_seed(0)  # one pretrained model ...
    model = transformers.ViTForImageClassification(cfg)
    return _jitter(model, seed, skip="classifier" if seed == 0 else "\0")  # ... fine-tuned per task


@pytest.fixture(scope="module")
def hf_world(tmp_path_factory, images):
    root = tmp_path_factory.mktemp("hf-per-task")
    processors = {
        "base": transformers.ViTImageProcessor(size={"height": 32, "width": 32}),
        "squashed": transformers.ViTImageProcessor(
            size={"height": 32, "width": 32}, resample=2, image_mean=MEAN_A, image_std=STD_A
        ),
        "cropped": transformers.DeiTImageProcessor(
            size={"height": 40, "width": 40}, crop_size={"height": 32, "width": 32}, resample=3
        ),
    }
    labels = {"base": 2, "squashed": 4, "cropped": 3}
    for i, (name, proc) in enumerate(processors.items()):
        model = _hf_vit(labels[name], i)
        model.save_pretrained(root / name)
        proc.save_pretrained(root / name)
    spec = {
        "name": "hfpertask",
        "base": {"format": "hf", "path": "base"},
        "tasks": [
            {"name": n, "format": "hf", "path": n, "calibration": str(_calibration(root / f"cal-{n}", 6 * k))}
            for k, n in enumerate(("squashed", "cropped"))
        ],
    }
    (root / "zoo.yaml").write_text(yaml.safe_dump(spec))
    store = root / "store"
    _create(root / "zoo.yaml", store)
    return root, store


def _hf_reference(folder: Path, path: Path) -> torch.Tensor:
    model = transformers.ViTForImageClassification.from_pretrained(folder).eval()
    proc = transformers.AutoImageProcessor.from_pretrained(folder)  # the default (torchvision) backend
    with torch.no_grad():
        return model(**proc(images=Image.open(path).convert("RGB"), return_tensors="pt")).logits[0].softmax(-1)


def test_hf_tasks_are_served_with_their_own_processors(hf_world, images):
    root, store = hf_world
    h = _serve(store, "hfpertask", "tsv_c", {"f": 1.0})  # full rank: exactly each task's weights
    try:
        spec = BundleSpec.model_validate(BundleStore(StoreLayout(store)).load().json("model"))
        own = {t.name: t.preprocessing for t in spec.tasks}
        assert own["cropped"] is not None and own["cropped"].resize_target() == 40  # its own, not the base's
        assert own["squashed"] is not None and own["squashed"].mean == MEAN_A
        for task, n in (("squashed", 4), ("cropped", 3)):
            for name, path in images.items():
                _, got = _served(h, path, task, [f"c{i}" for i in range(n)])
                want = _hf_reference(root / task, path)
                assert torch.allclose(got, want, atol=1e-4), (task, name, got, want)
    finally:
        h.close()


def test_routed_images_get_the_routed_tasks_own_input(hf_world, images):
    """Whichever task the gate picks, the answer is that task's answer with its own preprocessing."""
    _, store = hf_world
    h = _serve(store, "hfpertask", "emr_routed", {"gate_epochs": 1, "gate_size": 32})
    try:
        chosen = set()
        for path in images.values():
            task, routed = _served(h, path, None, [f"c{i}" for i in range(4)])
            n = 4 if task == "squashed" else 3
            _, given = _served(h, path, task, [f"c{i}" for i in range(4)])
            assert torch.allclose(routed[:n], given[:n], atol=1e-6), (path.name, task)
            chosen.add(task)
        assert chosen  # (the 1-epoch gate's choices are not the point here)
    finally:
        h.close()


def test_a_task_whose_input_size_differs_is_refused_naming_task_and_field(hf_world, tmp_path, capsys):
    root, _ = hf_world
    spec = yaml.safe_load((root / "zoo.yaml").read_text())
    spec["base"]["path"] = str(root / "base")
    for t in spec["tasks"]:
        t["path"] = str(root / t["path"])
    spec["tasks"][1]["preprocessing"] = {"size": 28}
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(spec))
    assert main(["zoo", "create", str(tmp_path / "bad.yaml"), "--store", str(tmp_path / "s"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "task 'cropped'" in err and "preprocessing.size" in err, err
    assert not (tmp_path / "s" / "zoos" / "hfpertask").exists()


# -- timm ---------------------------------------------------------------------------------------------
TIMM_KW = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}


def test_timm_model_is_served_as_create_transform_feeds_it(tmp_path, images):
    torch.manual_seed(0)
    base = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=5, **TIMM_KW).eval()
    task = _jitter(copy.deepcopy(base), 1)
    save_file({k: v.contiguous() for k, v in base.state_dict().items()}, tmp_path / "base.safetensors")
    save_file({k: v.contiguous() for k, v in task.state_dict().items()}, tmp_path / "task.safetensors")
    common = {"format": "timm", "model_name": "vit_tiny_patch16_224", "model_kwargs": TIMM_KW}
    spec = {
        "name": "timmzoo",
        "base": {**common, "path": "base.safetensors"},
        "tasks": [{**common, "name": "things", "path": "task.safetensors", "classes": list("abcde")}],
    }
    (tmp_path / "zoo.yaml").write_text(yaml.safe_dump(spec))
    _create(tmp_path / "zoo.yaml", tmp_path / "store")
    cfg = timm.data.resolve_data_config({"input_size": (3, 32, 32)}, model=task)
    transform = timm.data.create_transform(**cfg)
    h = _serve(tmp_path / "store", "timmzoo", "emr")  # one task: EMR's weights are exactly the task's
    try:
        for name, path in images.items():
            _, got = _served(h, path, "things", list("abcde"))
            with torch.no_grad():
                want = task(transform(Image.open(path).convert("RGB"))[None])[0].softmax(-1)
            assert got.argmax() == want.argmax() and (got - want).abs().max() < 0.02, (name, got, want)
    finally:
        h.close()


# -- CLIP: transformers and open_clip towers with linear heads ------------------------------------------
def _head(path: Path, classes: int, dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    w, b = 20 * torch.randn(classes, dim, generator=gen), torch.randn(classes, generator=gen)
    save_file({"weight": w, "bias": b}, path)
    return w, b


def _clip_spec(root: Path, name: str, base: str, task: str, **extra: object) -> Path:
    spec = {
        "name": name,
        "base": {"format": "clip", "path": base, **extra},
        "tasks": [{"name": "pets", "format": "clip", "path": task, "head": "head.safetensors", **extra}],
    }
    (root / "zoo.yaml").write_text(yaml.safe_dump(spec))
    return root / "zoo.yaml"


def test_hf_clip_tower_is_served_as_clip_image_processor_feeds_it(tmp_path, images):
    cfg = transformers.CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8,
        projection_dim=16,
    )  # fmt: skip
    proc = transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    torch.manual_seed(0)
    base = transformers.CLIPVisionModelWithProjection(cfg).eval()
    base.save_pretrained(tmp_path / "base")
    proc.save_pretrained(tmp_path / "base")
    task = _jitter(base, 1, skip="visual_projection")
    task.save_pretrained(tmp_path / "task")
    proc.save_pretrained(tmp_path / "task")
    w, b = _head(tmp_path / "head.safetensors", 3, 16, 2)
    _create(_clip_spec(tmp_path, "clipzoo", "base", "task"), tmp_path / "store")
    h = _serve(tmp_path / "store", "clipzoo", "emr")
    try:
        for name, path in images.items():
            _, got = _served(h, path, "pets", ["0", "1", "2"])
            with torch.no_grad():  # the raw file: CLIPImageProcessor converts modes itself (do_convert_rgb)
                emb = task(**proc(images=Image.open(path), return_tensors="pt")).image_embeds
                want = (torch.nn.functional.normalize(emb, dim=-1) @ w.T + b)[0].softmax(-1)
            assert torch.allclose(got, want, atol=1e-4), (name, got, want)
    finally:
        h.close()


def test_open_clip_tower_is_served_as_its_preprocess_feeds_it(tmp_path, images):
    model_cfg = {
        "embed_dim": 16,
        "quick_gelu": False,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
        "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1},
    }
    pre = {"size": 32, "mean": [0.5] * 3, "std": [0.25] * 3, "interpolation": "bicubic", "resize_mode": "longest"}
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": pre}))
    torch.manual_seed(3)
    base = open_clip.model.CLIP(16, model_cfg["vision_cfg"], model_cfg["text_cfg"], quick_gelu=False).eval()
    torch.save(base.state_dict(), tmp_path / "base.pt")
    task = _jitter(base, 4, scale=0.02, skip="visual.proj")
    torch.save(task.state_dict(), tmp_path / "task.pt")
    w, b = _head(tmp_path / "head.safetensors", 3, 16, 5)
    _create(_clip_spec(tmp_path, "oczoo", "base.pt", "task.pt"), tmp_path / "store")
    transform = open_clip.image_transform(
        32, is_train=False, mean=pre["mean"], std=pre["std"], resize_mode="longest", interpolation="bicubic"
    )
    h = _serve(tmp_path / "store", "oczoo", "emr")
    try:
        for name, path in images.items():
            _, got = _served(h, path, "pets", ["0", "1", "2"])
            img = Image.open(path)
            x = transform(img.convert("RGB") if name in OPEN_CLIP_RGB_FIRST else img)[None]
            with torch.no_grad():
                want = (task.encode_image(x, normalize=True) @ w.T + b)[0].softmax(-1)
            assert got.argmax() == want.argmax() and (got - want).abs().max() < 0.02, (name, got, want)
    finally:
        h.close()


def test_served_preprocessing_is_reported_per_task(hf_world):
    """``/v2`` metadata names each task's own preprocessing where it differs (PIXELS clients follow it)."""
    _, store = hf_world
    h = AsgiHarness(ServerSettings(store=store, watch_interval_s=0, device="cpu"))
    try:
        meta = h.request("GET", "/v2/models/vitmerge").json()["parameters"]
        assert set(meta["task_preprocessing"]) <= {"squashed", "cropped"} and "cropped" in meta["task_preprocessing"]
        assert np.isclose(meta["task_preprocessing"]["cropped"]["resize_size"], 40)
    finally:
        h.close()


def test_agreement_on_a_zoo_with_calibration_images_only(hf_world, capsys):
    """No test images, no labels: each merge records its agreement with the user's models on the calibration
    images; an exact bundle agrees everywhere (KL ~ 0); `vitmerge eval --agreement` prints it; /v1/models shows it."""
    _, store = hf_world
    assert main(["merge", "--zoo", "hfpertask", "--store", str(store), "--method", "tsv_c", "--param", "f=1.0"]) == 0
    out = capsys.readouterr().out
    assert "agreement with your own models" in out and "| squashed | 6 calibration | 100.0% | n/a |" in out, out
    bundle = BundleStore(StoreLayout(store)).load()
    recorded = bundle.manifest.extra.agreement
    assert recorded is not None
    rows = {r.task: r for r in recorded}
    for task in ("squashed", "cropped"):
        assert rows[task].split == "calibration" and rows[task].images == 6
        assert rows[task].top1_given == 1.0 and rows[task].kl_given is not None and rows[task].kl_given < 1e-6
        assert rows[task].top1_routed is None
    assert main(["eval", "--agreement", "--store", str(store), "--quiet"]) == 0
    assert "| cropped | 6 calibration | 100.0% | n/a |" in capsys.readouterr().out
    h = AsgiHarness(ServerSettings(store=store, watch_interval_s=0, device="cpu"))
    try:
        listed = {v["version"]: v for v in h.request("GET", "/v1/models").json()["versions"]}
        assert listed[bundle.version]["agreement"] == [r.model_dump(mode="json") for r in recorded]
    finally:
        h.close()
