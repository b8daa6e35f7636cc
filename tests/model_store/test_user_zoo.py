"""A user's own zoo end to end: HF checkpoints + image folders/CSVs -> zoo create -> merge -> eval -> serve.

Everything is real: three Hugging Face ViTs that `transformers` builds and fine-tunes
here on real images (scikit-learn digits, foolbox's ImageNet/CIFAR samples) written in
the layouts users have (ImageFolder, flat folder, CSV manifests) at sizes and channel
counts other than the model's; task names the project has never heard of.
"""

from __future__ import annotations

import csv
import glob
import importlib.util
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from server_helpers import AsgiHarness, LiveServer, require

from model_store.bundle import BundleStore
from model_store.data.preprocessing import to_model_input
from model_store.data.sources import open_source
from model_store.errors import DataSourceError
from model_store.schema import DataSource, Preprocessing
from model_store.settings import StoreLayout
from model_store.zoo import Zoo
from server.cli import main

transformers = require("transformers", "pip install -e '.[test]'")

GLYPHS = ["zero", "one", "two"]
PHOTOS = ["imagenet", "cifar"]
MEAN, STD = [0.45, 0.4, 0.35], [0.25, 0.26, 0.27]


@dataclass
class World:
    root: Path
    spec: Path
    store: Path
    hf: dict[str, Path]


def _foolbox(prefix: str) -> list[Path]:
    root = Path(importlib.util.find_spec("foolbox").origin).parent / "data"  # type: ignore[arg-type,union-attr]
    return sorted(Path(p) for p in glob.glob(str(root / f"{prefix}_*")))


def _write_images(data: Path) -> dict[str, list[tuple[np.ndarray, int]]]:
    """Glyphs: digits 0-2 (8x8 gray PNG) as a flat calibration folder + ImageFolder test.
    Photos: foolbox ImageNet (512 px JPEG) vs CIFAR (32 px PNG) as CSV manifests. Returns train sets."""
    from sklearn.datasets import load_digits

    d = load_digits()
    keep = np.flatnonzero(d.target < 3)[np.random.default_rng(0).permutation(int((d.target < 3).sum()))]
    imgs = np.round(d.images * (255 / 16)).astype(np.uint8)
    train, calib, test = keep[:240], keep[240:340], keep[340:400]
    unl = data / "glyphs" / "unlabeled"
    (unl / "batch2").mkdir(parents=True)
    for n, i in enumerate(calib):
        Image.fromarray(imgs[i]).save(unl / ("batch2" if n % 2 else "") / f"g{n:03d}.png")
    (unl / "notes.txt").write_text("not an image: skipped")
    (unl / ".hidden.png").write_bytes(b"hidden files are skipped")
    for n, i in enumerate(test):
        folder = data / "glyphs" / "test" / GLYPHS[d.target[i]]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(imgs[i]).save(folder / f"t{n:03d}.png")
    photos = [(p, 0) for p in _foolbox("imagenet")] + [(p, 1) for p in _foolbox("cifar10") + _foolbox("cifar100")]
    rng = np.random.default_rng(1)
    by_class = {c: [p for p in photos if p[1] == c] for c in (0, 1)}
    rows: dict[str, list] = {"train": [], "calib": [], "test": []}
    for _c, items in by_class.items():
        items = [items[i] for i in rng.permutation(len(items))]
        k = len(items) // 3
        rows["train"] += items[:k]
        rows["calib"] += items[k : 2 * k]
        rows["test"] += items[2 * k :]
    pdir = data / "photos" / "images"
    pdir.mkdir(parents=True)
    for part in ("calib", "test"):
        with open(data / "photos" / f"{part}.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["path", "label"])
            for src, c in rows[part]:
                shutil.copy(src, pdir / src.name)
                w.writerow([f"images/{src.name}", PHOTOS[c] if part == "test" else ""])
    rgb = lambda p: np.asarray(Image.open(p).convert("RGB"))  # noqa: E731
    return {"glyphs": [(imgs[i], int(d.target[i])) for i in train], "photos": [(rgb(p), c) for p, c in rows["train"]]}


def _hf_config(num_labels: int, id2label: dict[int, str] | None = None, hidden: int = 32):
    return transformers.ViTConfig(
        hidden_size=hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=2 * hidden,
        image_size=32,
        patch_size=8,
        num_channels=3,
        num_labels=num_labels,
        id2label=id2label,
        label2id=None,
    )


def _save(model, path: Path) -> Path:
    model.save_pretrained(path)
    transformers.ViTImageProcessor(
        size={"height": 32, "width": 32}, image_mean=MEAN, image_std=STD, resample=3
    ).save_pretrained(path)
    return path


def _finetune(
    base, num_labels: int, id2label: dict[int, str] | None, train: list[tuple[np.ndarray, int]], steps: int, seed: int
):
    """A task model: the base's backbone fine-tuned (all layers) with a new head."""
    torch.manual_seed(seed)
    model = transformers.ViTForImageClassification(_hf_config(num_labels, id2label))
    model.vit.load_state_dict(base.vit.state_dict())
    prep = Preprocessing(size=32, channels=3, mean=MEAN, std=STD, interpolation="bicubic")
    x = torch.cat([to_model_input(img[None], prep) for img, _ in train])
    y = torch.tensor([c for _, c in train])
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    model.train()
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (32,), generator=gen)
        loss = model(pixel_values=x[idx], labels=y[idx]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def _spec(world_root: Path, **changes) -> dict:
    spec = {
        "name": "products",
        "base": {"format": "hf", "path": "ckpt/base"},
        "tasks": [
            {
                "name": "glyphs",
                "format": "hf",
                "path": "ckpt/glyphs",
                "classes": GLYPHS,
                "calibration": "data/glyphs/unlabeled",
                "test": "data/glyphs/test",
            },
            {
                "name": "photos",
                "format": "hf",
                "path": "ckpt/photos",
                "calibration": "data/photos/calib.csv",
                "test": "data/photos/test.csv",
            },
        ],
    }
    for task, fields in changes.items():
        for t in spec["tasks"]:
            if t["name"] == task:
                t.update(fields)
                for k in [k for k, v in fields.items() if v is None]:
                    del t[k]
    return spec


def _write_spec(root: Path, name: str, spec: dict) -> Path:
    path = root / name
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    root = tmp_path_factory.mktemp("user")
    train = _write_images(root / "data")
    torch.manual_seed(0)
    base = transformers.ViTForImageClassification(_hf_config(2)).eval()
    hf = {"base": _save(base, root / "ckpt" / "base")}
    hf["glyphs"] = _save(_finetune(base, 3, None, train["glyphs"], 400, 1), root / "ckpt" / "glyphs")
    hf["photos"] = _save(_finetune(base, 2, dict(enumerate(PHOTOS)), train["photos"], 150, 2), root / "ckpt" / "photos")
    spec = _write_spec(root, "zoo.yaml", _spec(root))
    return World(root, spec, root / "store", hf)


def _hf_accuracy(ckpt: Path, images: list[tuple[Path, int]], prep: Preprocessing) -> float:
    """transformers' own model on the images (labels read here from the folders / CSV)."""
    model = transformers.ViTForImageClassification.from_pretrained(ckpt).eval()
    x = torch.cat([to_model_input(np.asarray(_pil(p))[None], prep) for p, _ in images])
    with torch.no_grad():
        pred = model(pixel_values=x).logits.argmax(-1)
    return float((pred == torch.tensor([c for _, c in images])).float().mean())


def _pil(path: Path) -> Image.Image:
    img = Image.open(path)
    return img.convert("L" if img.mode in ("L", "1", "I", "I;16") else "RGB")


def _test_images(world: World, task: str) -> list[tuple[Path, int]]:
    if task == "glyphs":
        return [
            (p, GLYPHS.index(p.parent.name)) for p in sorted((world.root / "data" / "glyphs" / "test").rglob("*.png"))
        ]
    with open(world.root / "data" / "photos" / "test.csv") as f:
        return [(world.root / "data" / "photos" / r["path"], PHOTOS.index(r["label"])) for r in csv.DictReader(f)]


def _table(out: str) -> dict[str, list[str]]:
    """Markdown rows of `vitmerge eval` -> {row name: cells}."""
    rows = {}
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and not line.startswith("|---") and cells[0] != "method":
            rows[cells[0]] = cells[1:]
    return rows


@pytest.fixture(scope="module")
def created(world: World) -> Zoo:
    assert main(["zoo", "create", str(world.spec), "--store", str(world.store), "--quiet"]) == 0
    return Zoo.load(world.store / "zoos" / "products")


def test_zoo_create_reads_checkpoints_classes_preprocessing_and_data(world, created, capsys):
    zoo = created
    assert zoo.tasks == ["glyphs", "photos"] and zoo.base == "base"
    assert (
        zoo.metas["glyphs"].class_names == GLYPHS and zoo.metas["photos"].class_names == PHOTOS
    )  # spec, then id2label
    prep = zoo.metas["glyphs"].preprocessing
    assert (
        (prep.size, prep.channels, prep.interpolation) == (32, 3, "bicubic")
        and prep.mean == pytest.approx(MEAN)
        and prep.std == pytest.approx(STD)
    )
    data = zoo.task_data("glyphs")
    assert data.calibration.kind == "folder" and data.test.kind == "imagefolder"  # type: ignore[union-attr]
    assert zoo.task_data("photos").calibration.kind == "csv"  # type: ignore[union-attr]
    cal = open_source(data.calibration, "calibration")  # type: ignore[arg-type]
    assert len(cal) == 100  # notes.txt and the hidden file skipped, the sub-folder read
    test = open_source(data.test, "test", GLYPHS)  # type: ignore[arg-type]
    assert sorted(GLYPHS[int(c)] for c in test.labels) == sorted(p.parent.name for p in test.paths)  # type: ignore[union-attr]
    assert not [p for p in (world.store / "zoos").iterdir() if p.name.startswith(".")]
    # the same spec again is refused unless --force (nothing changes)
    assert main(["zoo", "create", str(world.spec), "--store", str(world.store), "--quiet"]) == 2
    assert "already exists" in capsys.readouterr().err


@pytest.fixture(scope="module")
def bundles(world: World, created: Zoo) -> dict[str, str]:
    out = {}
    for method in ("emr_routed", "regmean"):  # the default gate (EfficientNet-Lite0, 64 px, 10 epochs): ~8 s here
        assert (
            main(["merge", "--zoo", str(world.spec), "--store", str(world.store), "--method", method, "--quiet"]) == 0
        )
        out[method] = BundleStore(StoreLayout(world.store)).current_version()  # type: ignore[assignment]
    return out


def test_bundle_manifest_records_data_and_gate_routing(world, bundles):
    bundle = BundleStore(StoreLayout(world.store)).load(bundles["emr_routed"])
    data = bundle.manifest.extra.data
    assert data is not None
    glyphs, photos = data["glyphs"], data["photos"]
    assert glyphs.calibration is not None and glyphs.test is not None and photos.test is not None
    assert glyphs.calibration.images == 100 and glyphs.test.images == 60
    assert glyphs.calibration.source.location == str((world.root / "data" / "glyphs" / "unlabeled").resolve())
    assert photos.test.source.kind == "csv" and re.fullmatch(r"[0-9a-f]{64}", photos.test.sha256)
    gate = bundle.manifest.extra.gate_test_accuracy
    assert gate is not None
    # gray digits vs colour photos, the default gate trained on 100 + 19 calibration images (~20 steps):
    # measured glyphs 1.0, photos 0.864 (19 of 22); a gate that always answers one task scores 0 on the other
    assert set(gate) == {"glyphs", "photos"} and min(gate.values()) >= 0.75, gate
    # the hash follows the file list: adding a calibration image changes it
    cal = open_source(glyphs.calibration.source, "calibration")
    assert cal.fingerprint() == glyphs.calibration.sha256


def test_eval_compares_like_with_like_on_the_users_test_images(world, bundles, created, capsys):
    store = ["--store", str(world.store), "--quiet"]
    assert main(["eval", "--bundle", bundles["emr_routed"], *store]) == 0
    rows = _table(capsys.readouterr().out)
    prep = created.metas["glyphs"].preprocessing
    for i, task in enumerate(("glyphs", "photos")):
        want = _hf_accuracy(world.hf[task], _test_images(world, task), prep)
        assert rows["individual"][i] == f"{100 * want:.1f}", (task, rows)
    glyphs_ind = float(rows["individual"][0])
    assert glyphs_ind >= 80.0  # the fine-tuned model learnt its task: label mapping errors would show
    emr = rows[f"emr_routed ({bundles['emr_routed']})"]
    # EMR of two models fine-tuned from a RANDOM base swings with the fine-tuning's float details: measured
    # 78.3 (individual 95.0) on an AMD EPYC, >= individual - 15 on the CPU before, 61.7 (individual 91.7) once
    # training inputs were resized like Pillow (uint8); a label-mapping error gives ~33 (chance): floor 50
    assert float(emr[0]) >= 50.0, rows
    # --limit: the individual models run on the same first images as the merged one
    assert main(["eval", "--bundle", bundles["emr_routed"], "--limit", "7", *store]) == 0
    rows7 = _table(capsys.readouterr().out)
    first7 = open_source(created.task_data("glyphs").test, "test", GLYPHS).paths[:7]  # type: ignore[arg-type,index]
    want7 = _hf_accuracy(world.hf["glyphs"], [(p, GLYPHS.index(p.parent.name)) for p in first7], prep)
    assert rows7["individual"][0] == f"{100 * want7:.1f}"
    # routed: the gate picks among the user's task names
    assert main(["eval", "--bundle", bundles["emr_routed"], "--routed", *store]) == 0
    routed = _table(capsys.readouterr().out)
    assert min(float(v) for v in routed["gate (task id)"][:2]) >= 75.0, routed  # measured 100.0 / 86.4
    assert main(["eval", "--bundle", bundles["regmean"], *store]) == 0
    reg = _table(capsys.readouterr().out)[f"regmean ({bundles['regmean']})"]
    assert all(re.fullmatch(r"\d+\.\d", c) for c in reg[:2]), (
        reg
    )  # both tasks evaluated (a static merge of a random base: low)
    manifest = BundleStore(StoreLayout(world.store)).load(bundles["regmean"]).manifest
    rows_in_csv = len((world.root / "data" / "photos" / "calib.csv").read_text().splitlines()) - 1
    data = manifest.extra.data
    assert data is not None
    calibration = data["photos"].calibration
    assert calibration is not None and calibration.images == rows_in_csv  # RegMean read the CSV's calibration images


def test_serve_a_spec_creates_merges_and_routes_by_the_users_task_names(world):
    store = world.root / "fresh-store"
    store.mkdir()
    server = LiveServer(store, world.spec, ["--watch-interval", "0"])  # default method and parameters
    try:
        server.wait_ready(timeout=300)
        import httpx

        assert (store / "zoos" / "products" / "zoo.json").exists()
        tasks = httpx.get(f"{server.url}/v1/tasks").json()
        assert [t["name"] for t in tasks["tasks"]] == ["glyphs", "photos"] and tasks["tasks"][0]["classes"] == GLYPHS
        hits = []
        for task in ("glyphs", "photos"):
            for path, _ in _test_images(world, task)[:6]:
                r = httpx.post(f"{server.url}/v1/classify", files={"image": (path.name, path.read_bytes())}, timeout=30)
                assert r.status_code == 200, r.text
                hits.append(r.json()["predictions"][0]["task"]["name"] == task)
        # the default gate on 100 + 19 calibration images: 10 of 12 measured on an AMD EPYC (>= 11 on the previous
        # CPU); a gate that always answers one task gets 6 (the same bar as gate_test_accuracy >= 0.75)
        assert sum(hits) >= 9, hits
    finally:
        server.terminate()


# -- bad data: a clear error naming the problem, nothing half-written ------------------------------
def _create_fails(world: World, spec: dict, tmp_path: Path, capsys, *needles: str) -> None:
    shutil.copytree(world.root / "ckpt", tmp_path / "ckpt", dirs_exist_ok=True)
    path = _write_spec(tmp_path, "bad.yaml", spec)
    store = tmp_path / "store"
    return_code = main(["zoo", "create", str(path), "--store", str(store), "--quiet"])
    err = capsys.readouterr().err
    assert return_code == 2, err
    for needle in needles:
        assert needle in err, err
    assert not (store / "zoos").exists() or not list((store / "zoos").iterdir())  # no partial zoo, no temp folder


@pytest.mark.parametrize(
    "case",
    [
        "missing folder",
        "empty calibration",
        "unknown class folder",
        "empty class folder",
        "corrupt image",
        "csv label",
        "architecture",
    ],
)
def test_bad_data_is_refused_before_anything_is_written(world, tmp_path, capsys, case):
    shutil.copytree(world.root / "data", tmp_path / "data")
    data = tmp_path / "data"
    spec = _spec(tmp_path)
    if case == "missing folder":
        spec = _spec(tmp_path, glyphs={"calibration": "data/nowhere"})
        needles: tuple[str, ...] = ("glyphs", "nowhere", "does not exist")
    elif case == "empty calibration":
        (data / "empty").mkdir()
        (data / "empty" / "readme.md").write_text("no images here")
        spec = _spec(tmp_path, glyphs={"calibration": "data/empty"})
        needles = ("glyphs", "has no images")
    elif case == "unknown class folder":
        (data / "glyphs" / "test" / "three").mkdir()
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(data / "glyphs" / "test" / "three" / "x.png")
        needles = ("glyphs", "three", "not classes of the task", "zero, one, two")
    elif case == "empty class folder":
        for p in (data / "glyphs" / "test" / "two").iterdir():
            p.unlink()
        needles = ("class folder 'two' has no images",)
    elif case == "corrupt image":
        (data / "glyphs" / "unlabeled" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
        needles = ("broken.png", "glyphs")
    elif case == "csv label":
        text = (data / "photos" / "test.csv").read_text().replace(",cifar\n", ",cifar-100\n", 1)
        (data / "photos" / "test.csv").write_text(text)
        needles = ("photos", "cifar-100", "not one of the task's classes")
    else:
        torch.manual_seed(3)
        _save(
            transformers.ViTForImageClassification(_hf_config(2, dict(enumerate(PHOTOS)), hidden=48)),
            tmp_path / "ckpt" / "wide",
        )
        spec["tasks"][1]["path"] = "ckpt/wide"
        needles = ("architecture", "photos", "embed_dim")
    _create_fails(world, spec, tmp_path, capsys, *needles)


def test_methods_that_need_data_refuse_a_task_without_it_before_any_work(world, created, tmp_path, capsys):
    spec = _write_spec(
        world.root, "nodata.yaml", {**_spec(world.root, photos={"calibration": None, "test": None}), "name": "nodata"}
    )
    store = tmp_path / "store"
    assert main(["zoo", "create", str(spec), "--store", str(store), "--quiet"]) == 0
    for method in ("regmean", "fisher", "emr_routed", "gating_avg"):
        assert main(["merge", "--zoo", "nodata", "--store", str(store), "--method", method, "--quiet"]) == 2
        err = capsys.readouterr().err
        assert "task 'photos'" in err and "calibration" in err and "vitmerge zoo data" in err, err
        assert not (store / "bundles").exists() or not list((store / "bundles").iterdir())
    # data-free methods still merge; eval says which task has no test data
    assert main(["merge", "--zoo", "nodata", "--store", str(store), "--method", "emr", "--quiet"]) == 0
    assert main(["eval", "--store", str(store), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "no test data for: photos" in out and "n/a" in _table(out)["individual"][1]
    # the admin API refuses the same request with 422 at submit time
    from server.http.settings import ServerSettings

    h = AsgiHarness(
        ServerSettings(
            store=store, zoo=str(store / "zoos" / "nodata"), admin_token="s3cret", watch_interval_s=0, device="cpu"
        )
    )
    try:
        r = h.request("POST", "/v1/merge", json={"method": "regmean"}, headers={"authorization": "Bearer s3cret"})
        assert r.status_code == 422 and "task 'photos'" in r.json()["error"]["message"], r.text
    finally:
        h.close()
    # `zoo data` attaches it (validated), and the method then runs
    assert (
        main(
            [
                "zoo",
                "data",
                "--zoo",
                "nodata",
                "--store",
                str(store),
                "--task",
                "photos",
                "--calibration",
                str(world.root / "nope"),
            ]
        )
        == 2
    )
    assert "does not exist" in capsys.readouterr().err
    assert (
        main(
            [
                "zoo",
                "data",
                "--zoo",
                "nodata",
                "--store",
                str(store),
                "--task",
                "photos",
                "--calibration",
                str(world.root / "data" / "photos" / "calib.csv"),
                "--test",
                str(world.root / "data" / "photos" / "test.csv"),
            ]
        )
        == 0
    )
    assert main(["merge", "--zoo", "nodata", "--store", str(store), "--method", "regmean", "--quiet"]) == 0


def test_import_flags_attach_data(world, tmp_path, capsys):
    zoo = str(tmp_path / "z")
    assert (
        main(["import", "hf", "--zoo", zoo, "--name", "base", "--role", "base", "--checkpoint", str(world.hf["base"])])
        == 0
    )
    assert (
        main(
            [
                "import",
                "hf",
                "--zoo",
                zoo,
                "--name",
                "glyphs",
                "--checkpoint",
                str(world.hf["glyphs"]),
                "--classes",
                ",".join(GLYPHS),
                "--calibration",
                str(world.root / "data" / "glyphs" / "unlabeled"),
                "--test",
                str(world.root / "data" / "glyphs" / "test"),
            ]
        )
        == 0
    )
    data = Zoo.load(zoo).task_data("glyphs")
    assert data.calibration.kind == "folder" and data.test.kind == "imagefolder"  # type: ignore[union-attr]
    # a test folder whose classes do not match: refused, nothing imported
    assert (
        main(
            [
                "import",
                "hf",
                "--zoo",
                zoo,
                "--name",
                "photos",
                "--checkpoint",
                str(world.hf["photos"]),
                "--test",
                str(world.root / "data" / "glyphs" / "test"),
            ]
        )
        == 2
    )
    assert "not classes of the task" in capsys.readouterr().err and Zoo.load(zoo).tasks == ["glyphs"]


# -- data sources -------------------------------------------------------------------------------------
def test_only_the_requested_images_are_decoded_and_bad_files_are_named(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(5):
        Image.fromarray(np.full((10, 12, 3), 40 * i, np.uint8)).save(folder / f"{i}.png")
    images = open_source(DataSource(kind="folder", location=str(folder)), "calibration")
    prep = Preprocessing(size=4, channels=1, mean=[0.0], std=[1.0])
    bad = images.paths[-1]  # type: ignore[index]
    bad.write_bytes(b"GIF89a truncated")
    assert images.tensors(prep, limit=4).shape == (4, 1, 4, 4)  # the bad file is never read
    with pytest.raises(DataSourceError, match=re.escape(str(bad))):
        images.tensors(prep)
    # the same seed gives the same order; another seed another order
    again = open_source(DataSource(kind="folder", location=str(folder)), "calibration")
    other = open_source(DataSource(kind="folder", location=str(folder), seed=7), "calibration")
    assert again.paths == images.paths and sorted(other.paths) == sorted(images.paths)  # type: ignore[type-var]


def test_csv_labels_by_name_or_index_and_required_columns(tmp_path):
    Image.fromarray(np.zeros((9, 9), np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(np.full((9, 9), 255, np.uint8)).save(tmp_path / "b.jpg")
    (tmp_path / "ok.csv").write_text("path,label\na.png,dark\nb.jpg,1\nnotes.txt,\n")
    s = open_source(DataSource(kind="csv", location=str(tmp_path / "ok.csv")), "test", ["dark", "light"])
    assert {p.name: int(c) for p, c in zip(s.paths, s.labels)} == {"a.png": 0, "b.jpg": 1}  # type: ignore[union-attr,arg-type]
    (tmp_path / "nolabel.csv").write_text("path\na.png\n")
    with pytest.raises(DataSourceError, match="line 2: test images need a label"):
        open_source(DataSource(kind="csv", location=str(tmp_path / "nolabel.csv")), "test", ["dark", "light"])
    assert len(open_source(DataSource(kind="csv", location=str(tmp_path / "nolabel.csv")), "calibration")) == 1
    (tmp_path / "cols.csv").write_text("file,label\na.png,dark\n")
    with pytest.raises(DataSourceError, match="no 'path' column"):
        open_source(DataSource(kind="csv", location=str(tmp_path / "cols.csv")), "calibration")
    (tmp_path / "gone.csv").write_text("path,label\nmissing.png,dark\n")
    with pytest.raises(DataSourceError, match="missing.png does not exist"):
        open_source(DataSource(kind="csv", location=str(tmp_path / "gone.csv")), "test", ["dark", "light"])


def test_regmean_grams_are_per_row_means_so_a_larger_set_does_not_dominate():
    from merging.methods.regmean import collect_grams
    from model_store.architecture import build_model
    from model_store.schema import Architecture

    model = build_model(
        Architecture(
            timm_name="vit_tiny_patch16_224",
            kwargs={"img_size": 8, "patch_size": 4, "embed_dim": 16, "depth": 1, "num_heads": 2},
        ),
        2,
    )
    x = torch.randn(6, 3, 8, 8)
    once, twice = collect_grams(model, x), collect_grams(model, torch.cat([x, x, x]))
    assert once.keys() == twice.keys() and all(torch.allclose(once[k], twice[k], rtol=1e-10, atol=1e-12) for k in once)
    sums = collect_grams(model, x[:3])
    assert not all(torch.allclose(once[k], sums[k]) for k in once)  # a different sample gives another mean


def test_gate_init_from_torchvision_naming_is_exact(tmp_path):
    import timm
    import torchvision

    from model_store.importers.gate_weights import load_gate_weights

    torch.manual_seed(0)
    tv = torchvision.models.mobilenet_v2(weights=None).eval()
    for m in tv.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
    torch.save(tv.state_dict(), tmp_path / "mv2.pth")
    model = timm.create_model("mobilenetv2_100").eval()
    model.load_state_dict(load_gate_weights(tmp_path / "mv2.pth", "mobilenetv2_100"), strict=True)
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        assert torch.equal(model(x), tv(x))


def test_spec_gate_init_is_the_default_gate_of_the_zoo(world, created, tmp_path):
    import torchvision

    from merging.pipeline import gate_init, with_zoo_defaults

    torch.save(torchvision.models.mobilenet_v2(weights=None).state_dict(), world.root / "mv2.pth")
    spec = {**_spec(world.root), "name": "gated", "gate": {"arch": "mobilenetv2_100", "init": "mv2.pth"}}
    path = _write_spec(world.root, "gated.yaml", spec)
    assert main(["zoo", "create", str(path), "--store", str(tmp_path / "s"), "--quiet"]) == 0
    zoo = Zoo.load(tmp_path / "s" / "zoos" / "gated")
    assert zoo.manifest.gate is not None and zoo.manifest.gate.file == "gate/init.safetensors"
    assert with_zoo_defaults(zoo, "emr_routed", {})["gate_arch"] == "mobilenetv2_100"
    assert (
        with_zoo_defaults(zoo, "emr_routed", {"gate_arch": "efficientnet_lite0"})["gate_arch"] == "efficientnet_lite0"
    )
    init = gate_init("mobilenetv2_100", zoo)
    saved = torch.load(world.root / "mv2.pth", weights_only=True)
    assert (
        init is not None
        and torch.equal(init["conv_stem.weight"], saved["features.0.0.weight"])
        and torch.equal(init["bn2.running_var"], saved["features.18.1.running_var"])
    )
    assert gate_init("mobilenetv2_100", created) is None  # no init: scratch, as measured


def test_bench_accuracy_runs_on_the_users_zoo_and_test_images(world, created, tmp_path):
    out = tmp_path / "results"
    args = [
        "bench",
        "accuracy",
        "--zoo",
        str(world.spec),
        "--store",
        str(world.store),
        "--out",
        str(out),
        "--benchmarks-md",
        "",
        "--m",
        "0",
        "--gate-archs",
        "efficientnet_lite0",
        "--no-scaling",
        "--quiet",
    ]
    assert main(args) == 0
    result = json.loads((out / "accuracy-products.json").read_text())
    assert result["tasks"] == ["glyphs", "photos"] and result["test_images"] == {
        "glyphs": 60,
        "photos": len(_test_images(world, "photos")),
    }
    individual = next(r for r in result["rows"] if r["name"] == "Individual")["accuracy"]
    prep = created.metas["glyphs"].preprocessing
    for task in (
        "glyphs",
        "photos",
    ):  # the benchmark's individual row = transformers' own models on the user's test images
        assert individual[task] == pytest.approx(
            _hf_accuracy(world.hf[task], _test_images(world, task), prep), abs=1e-9
        )


def _fast_params(method: str) -> dict:
    from merging.method_index import REGISTRY

    fields = REGISTRY[method].params.model_fields
    # max_fraction 1: the exact low-rank (LoRA) methods take these fully fine-tuned models at full rank
    fast = {"gate_epochs": 1, "gate_size": 32, "epochs": 1, "augment": 1, "max_sweeps": 2, "max_fraction": 1.0}
    return {k: v for k, v in fast.items() if k in fields}


def test_every_registered_method_merges_and_serves_the_users_zoo(world, created, tmp_path):
    from merging.method_index import REGISTRY
    from merging.pipeline import merge_and_publish
    from server.runtime.engine import Engine

    store = BundleStore(StoreLayout(tmp_path / "store"))
    image = np.asarray(_pil(_test_images(world, "glyphs")[0][0]))
    for method in sorted(REGISTRY):
        outcome = merge_and_publish(created, store, method, _fast_params(method), progress=False)
        engine = Engine(store.load(outcome.version), "cpu")
        given = None if engine.has_gate else engine.task_index("glyphs")  # routed by the gate when there is one
        x, g = engine.preprocess(image, given)
        out = engine.predict(x[None], [given], None if g is None else g[None])[0]
        assert (
            engine.tasks == ["glyphs", "photos"]
            and out.task in (0, 1)
            and len(out.probabilities) == len(engine.class_names[engine.tasks[out.task]])
        ), method
        data = store.load(outcome.version).manifest.extra.data
        assert data is not None
        assert (data["glyphs"].calibration is not None) == REGISTRY[method].needs_calibration, method
