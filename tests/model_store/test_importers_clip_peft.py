"""CLIP image towers (transformers, open_clip) and PEFT LoRA adapters, checked against the reference libraries.

Every model is built here by the library itself at a tiny size (width 32-64, depth 2,
32 px); nothing is downloaded.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from server_helpers import require

from model_store.architecture import PROJECTION_KEY, build_model, load_into, pre_logits
from model_store.data.preprocessing import to_model_input
from model_store.errors import CheckpointImportError
from model_store.importers.clip import CLIP_MEAN, import_clip, load_clip_tower
from model_store.importers.common import ImportTarget
from model_store.importers.hf_vit import import_hf_vit
from model_store.importers.peft_lora import import_peft
from model_store.zoo import Zoo
from server.cli import main

transformers = require("transformers", "pip install -e '.[test]'")
TOL = 1e-4


def _clip_vision_config(patch: int = 8, projection_dim: int = 16, **kw):
    return transformers.CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=32,
        patch_size=patch,
        projection_dim=projection_dim,
        **kw,
    )


def _jitter(model: torch.nn.Module, seed: int, scale: float = 0.05, skip: str = "visual_projection") -> None:
    """Non-trivial weights (norms, biases), the same way for every test."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if skip not in name:
            p.data.add_(scale * torch.randn(p.shape, generator=gen))


def _head(path: Path, classes: int, dim: int, seed: int, **extra: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    w, b = torch.randn(classes, dim, generator=gen), torch.randn(classes, generator=gen)
    save_file({"weight": w, "bias": b, **extra}, path)
    return w, b


def _x(n: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def with_projection(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    """An HF CLIPVisionModelWithProjection (quick_gelu, OpenAI's) with a preprocessor config."""
    root = tmp_path_factory.mktemp("clipproj")
    torch.manual_seed(0)
    model = transformers.CLIPVisionModelWithProjection(_clip_vision_config()).eval()
    _jitter(model, 0, skip="none")
    model.save_pretrained(root / "hf")
    transformers.CLIPImageProcessor(
        image_mean=[0.4, 0.5, 0.6],
        image_std=[0.2, 0.3, 0.4],
        resample=3,
        size={"shortest_edge": 32},
        crop_size={"height": 32, "width": 32},
    ).save_pretrained(root / "hf")
    return root / "hf", model


def test_hf_clip_with_projection_matches_transformers(with_projection, tmp_path):
    ckpt, ref = with_projection
    w, b = _head(tmp_path / "head.safetensors", 3, 16, 1, logit_scale=torch.tensor(np.log(20.0)))
    zoo = import_clip(
        ckpt, ImportTarget(tmp_path / "zoo", "pets", class_names=["a", "b", "c"]), head=tmp_path / "head.safetensors"
    )
    meta = zoo.metas["pets"]
    arch = meta.architecture
    assert arch.projection_dim == 16 and arch.kwargs["act_layer"] == "quick_gelu" and arch.kwargs["pre_norm"]
    assert (meta.preprocessing.mean, meta.preprocessing.interpolation) == ([0.4, 0.5, 0.6], "bicubic")
    assert PROJECTION_KEY in zoo.backbone("pets") and set(zoo.head("pets")) == {"head.weight", "head.bias"}
    x = _x()
    with torch.no_grad():
        want = 20.0 * (torch.nn.functional.normalize(ref(pixel_values=x).image_embeds, dim=-1) @ w.T + b)
        got = zoo.build_model("pets")(x)
    assert (want - got).abs().max().item() < TOL


def test_hf_clip_vision_model_without_projection_heads_the_pooled_features(tmp_path):
    torch.manual_seed(1)
    ref = transformers.CLIPVisionModel(_clip_vision_config(hidden_act="gelu")).eval()
    _jitter(ref, 1)
    ref.save_pretrained(tmp_path / "hf")
    w, b = _head(tmp_path / "head.pt", 2, 32, 2)
    torch.save({"weight": w, "bias": b}, tmp_path / "head.pt")
    zoo = import_clip(tmp_path / "hf", ImportTarget(tmp_path / "zoo", "t"), head=tmp_path / "head.pt", logit_scale=3.0)
    meta = zoo.metas["t"]
    assert meta.architecture.projection_dim is None and meta.architecture.kwargs["act_layer"] == "gelu"
    assert meta.preprocessing.mean == pytest.approx(CLIP_MEAN) and meta.class_names == ["0", "1"]
    x = _x()
    with torch.no_grad():
        want = 3.0 * (ref(pixel_values=x).pooler_output @ w.T + b)
        got = zoo.build_model("t")(x)
    assert (want - got).abs().max().item() < TOL


@pytest.fixture(scope="module")
def full_clip(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    root = tmp_path_factory.mktemp("clipfull")
    cfg = transformers.CLIPConfig(
        vision_config=_clip_vision_config().to_dict(),
        text_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2},
        projection_dim=16,
    )
    torch.manual_seed(2)
    model = transformers.CLIPModel(cfg).eval()
    _jitter(model, 2, skip="none")
    model.save_pretrained(root / "full")
    return root / "full", model


def _clip_embeds(model, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.nn.functional.normalize(model.visual_projection(model.vision_model(pixel_values=x).pooler_output))


def test_full_clip_model_gives_its_vision_tower_and_projection(full_clip, tmp_path):
    ckpt, ref = full_clip
    tower = load_clip_tower(ckpt)
    model = load_into(build_model(tower.arch, 0), tower.state)
    x = _x()
    assert (pre_logits(model, x) - _clip_embeds(ref, x)).abs().max().item() < TOL
    # a fine-tuned CLIPVisionModel saved without projection takes the pretrained CLIPModel's (--projection)
    vision = transformers.CLIPVisionModel(_clip_vision_config()).eval()
    vision.load_state_dict(ref.vision_model.state_dict())  # transformers 5: the tower itself
    vision.save_pretrained(tmp_path / "vision")
    w, b = _head(tmp_path / "head.safetensors", 2, 16, 3)
    zoo = import_clip(
        tmp_path / "vision",
        ImportTarget(tmp_path / "zoo", "t"),
        head=tmp_path / "head.safetensors",
        projection=ckpt,
        logit_scale=10,
    )
    with torch.no_grad():
        got = zoo.build_model("t")(x)
    assert (got - 10 * (_clip_embeds(ref, x) @ w.T + b)).abs().max().item() < TOL


def _open_clip_model(quick_gelu: bool, width: int, head_width: int):
    open_clip = require("open_clip", "pip install -e '.[test]'")
    cfg = {
        "embed_dim": 16,
        "quick_gelu": quick_gelu,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": width, "head_width": head_width, "patch_size": 8},
        "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1},
    }
    torch.manual_seed(3)
    model = open_clip.model.CLIP(cfg["embed_dim"], cfg["vision_cfg"], cfg["text_cfg"], quick_gelu=quick_gelu).eval()
    _jitter(model, 3, scale=0.02, skip="none")
    return model, cfg


@pytest.mark.parametrize("case", ["open_clip_config.json", "openai defaults"])
def test_open_clip_image_features_match(tmp_path, case):
    """A tiny custom open_clip config (gelu, head width 32, its preprocessing) and an OpenAI-style file (no config)."""
    if case == "openai defaults":  # quick_gelu, 64-wide heads: what OpenAI's weights need
        model, _ = _open_clip_model(True, 64, 64)
        torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, tmp_path / "oc.pt")
    else:
        model, cfg = _open_clip_model(False, 64, 32)
        torch.save(model.state_dict(), tmp_path / "oc.pt")
        pre = {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "interpolation": "bilinear"}
        (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": pre}))
    w, b = _head(tmp_path / "head.safetensors", 3, 16, 4)
    zoo = import_clip(tmp_path / "oc.pt", ImportTarget(tmp_path / "zoo", "t"), head=tmp_path / "head.safetensors")
    meta = zoo.metas["t"]
    quick = case == "openai defaults"
    assert meta.architecture.kwargs["act_layer"] == ("quick_gelu" if quick else "gelu")
    assert meta.preprocessing.interpolation == ("bicubic" if quick else "bilinear")
    x = _x()
    with torch.no_grad():
        want = model.encode_image(x, normalize=True)
        full = zoo.build_model("t")
        assert (pre_logits(full, x) - want).abs().max().item() < TOL
        assert (full(x) - (want @ w.T + b)).abs().max().item() < TOL


def _vit(num_labels: int = 3, hidden: int = 32, seed: int = 0):
    cfg = transformers.ViTConfig(
        hidden_size=hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=2 * hidden,
        image_size=32,
        patch_size=8,
        num_labels=num_labels,
        id2label={i: f"c{i}" for i in range(num_labels)},
        label2id={f"c{i}": i for i in range(num_labels)},
    )
    torch.manual_seed(seed)
    return transformers.ViTForImageClassification(cfg).eval()


def _to_classic(key: str) -> str:
    """What transformers 4 + PEFT wrote for the same adapter tensor (classic ViT module names)."""
    key = re.sub(
        r"\.layers\.(\d+)\.attention\.([qkv])_proj\.",
        lambda m: f".encoder.layer.{m.group(1)}.attention.attention.{dict(q='query', k='key', v='value')[m.group(2)]}.",
        key,
    )
    key = re.sub(r"\.layers\.(\d+)\.attention\.o_proj\.", r".encoder.layer.\1.attention.output.dense.", key)
    key = re.sub(r"\.layers\.(\d+)\.mlp\.fc1\.", r".encoder.layer.\1.intermediate.dense.", key)
    return re.sub(r"\.layers\.(\d+)\.mlp\.fc2\.", r".encoder.layer.\1.output.dense.", key)


@pytest.mark.parametrize("naming", ["transformers-5", "classic"])
def test_peft_lora_matches_peft_merge_and_unload(tmp_path, naming):
    peft = require("peft", "pip install -e '.[test]'")
    base = _vit()
    base.save_pretrained(tmp_path / "base")
    rslora = naming == "classic"
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2"] if rslora else ["q_proj", "v_proj", "fc1"]
    cfg = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=targets, modules_to_save=["classifier"], use_rslora=rslora, bias="none"
    )
    tuned = peft.get_peft_model(copy.deepcopy(base), cfg)
    gen = torch.Generator().manual_seed(5)
    for name, p in tuned.named_parameters():
        if "lora_" in name or "modules_to_save" in name:
            p.data.add_(0.1 * torch.randn(p.shape, generator=gen))
    tuned.save_pretrained(tmp_path / "adapter")
    want_model = tuned.merge_and_unload().eval()
    adapter = tmp_path / "adapter"
    conf = json.loads((adapter / "adapter_config.json").read_text())
    conf["base_model_name_or_path"] = str(tmp_path / "base")
    if naming == "classic":
        tensors = load_file(adapter / "adapter_model.safetensors")
        save_file({_to_classic(k): v for k, v in tensors.items()}, adapter / "adapter_model.safetensors")
        classic = {"q_proj": "query", "k_proj": "key", "v_proj": "value", "o_proj": "output.dense"}
        classic |= {"fc1": "intermediate.dense", "fc2": "output.dense"}
        conf["target_modules"] = sorted({classic[t] for t in conf["target_modules"]})
    (adapter / "adapter_config.json").write_text(json.dumps(conf))
    assert main(["import", "peft", "--zoo", str(tmp_path / "zoo"), "--name", "lora", "--adapter", str(adapter)]) == 0
    zoo = Zoo.load(tmp_path / "zoo", require_base=False)
    meta = zoo.metas["lora"]
    assert meta.class_names == ["c0", "c1", "c2"] and meta.provenance.lora is not None
    assert (meta.provenance.lora.rank, meta.provenance.lora.rslora) == (4, rslora)
    assert "blocks.1.attn.qkv.weight" in meta.provenance.lora.layers
    x = _x()
    with torch.no_grad():
        want = want_model(pixel_values=x).logits
        got = zoo.build_model("lora")(x)
    assert (want - got).abs().max().item() < TOL


def test_import_errors_name_the_missing_file_or_mismatching_tensor(with_projection, tmp_path):
    ckpt, _ = with_projection
    zoo = tmp_path / "zoo"
    import_clip(ckpt, ImportTarget(zoo, "base", role="base"))
    with pytest.raises(CheckpointImportError, match="needs --head FILE"):
        import_clip(ckpt, ImportTarget(zoo, "t"))
    with pytest.raises(CheckpointImportError, match="does not exist"):
        import_clip(ckpt, ImportTarget(zoo, "t"), head=tmp_path / "nowhere.safetensors")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointImportError, match="neither config.json .* nor open_clip_config.json"):
        import_clip(tmp_path / "empty", ImportTarget(zoo, "t"), head=tmp_path / "h.safetensors")
    (tmp_path / "empty" / "config.json").write_text('{"model_type": "clip_vision_model"}')
    with pytest.raises(CheckpointImportError, match="none of model.safetensors, pytorch_model.bin found"):
        import_clip(tmp_path / "empty", ImportTarget(zoo, "t"), head=tmp_path / "h.safetensors")
    save_file({"weight": torch.zeros(16, 3)}, tmp_path / "h.safetensors")
    with pytest.raises(CheckpointImportError, match=r"'weight' is 16x3.*transposed"):
        import_clip(ckpt, ImportTarget(zoo, "t"), head=tmp_path / "h.safetensors")
    # a B/16-style tower (patch 16) into a B/32-style zoo (patch 8 here): the tensor is named
    other = transformers.CLIPVisionModelWithProjection(_clip_vision_config(patch=16))
    other.save_pretrained(tmp_path / "p16")
    _head(tmp_path / "h.safetensors", 2, 16, 0)
    with pytest.raises(CheckpointImportError, match=r"'patch_embed.proj.weight' is 32x3x16x16 .* 32x3x8x8 in 'base'"):
        import_clip(tmp_path / "p16", ImportTarget(zoo, "t"), head=tmp_path / "h.safetensors")
    # a projection of another size (8 dimensions, the zoo's 16) or none at all: the tensor is named
    transformers.CLIPVisionModelWithProjection(_clip_vision_config(projection_dim=8)).save_pretrained(tmp_path / "p8")
    _head(tmp_path / "h8.safetensors", 2, 8, 0)
    with pytest.raises(CheckpointImportError, match=re.escape(f"'{PROJECTION_KEY}' is 8x32") + ".* 16x32 in 'base'"):
        import_clip(tmp_path / "p8", ImportTarget(zoo, "t"), head=tmp_path / "h8.safetensors")
    transformers.CLIPVisionModel(_clip_vision_config()).save_pretrained(tmp_path / "bare")
    _head(tmp_path / "h32.safetensors", 2, 32, 0)
    with pytest.raises(CheckpointImportError, match=re.escape(f"'{PROJECTION_KEY}' is absent") + ".* 16x32 in 'base'"):
        import_clip(tmp_path / "bare", ImportTarget(zoo, "t"), head=tmp_path / "h32.safetensors")
    with pytest.raises(CheckpointImportError, match="no 'visual.class_embedding'"):
        save_file({"conv1.weight": torch.zeros(1)}, tmp_path / "bad.safetensors")
        import_clip(tmp_path / "bad.safetensors", ImportTarget(zoo, "t"), head=tmp_path / "h.safetensors")
    assert Zoo.load(zoo, require_base=False).tasks == []  # nothing half-written
    # a fine-tuned projection (same size, other values): the task's own, imported as it is
    tuned = copy.deepcopy(with_projection[1])
    tuned.visual_projection.weight.data.add_(0.01)
    tuned.save_pretrained(tmp_path / "tuned")
    imported = import_clip(tmp_path / "tuned", ImportTarget(zoo, "t"), head=tmp_path / "h.safetensors").backbone("t")
    assert torch.equal(imported[PROJECTION_KEY], tuned.visual_projection.weight.detach())


def test_peft_errors_name_the_missing_file_or_tensor(tmp_path):
    peft = require("peft", "pip install -e '.[test]'")
    with pytest.raises(CheckpointImportError, match="adapter_config.json is missing"):
        import_peft(tmp_path, ImportTarget(tmp_path / "zoo", "x"))
    small, wide = _vit(hidden=32), _vit(hidden=48, seed=1)
    small.save_pretrained(tmp_path / "small")
    wide.save_pretrained(tmp_path / "wide")
    tuned = peft.get_peft_model(copy.deepcopy(small), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"]))
    tuned.save_pretrained(tmp_path / "adapter")
    with pytest.raises(CheckpointImportError, match="names no base_model_name_or_path"):
        import_peft(tmp_path / "adapter", ImportTarget(tmp_path / "zoo", "x"))
    with pytest.raises(CheckpointImportError, match=r"encoder.layer.0.attention.attention.query.*\(48, 48\)"):
        import_peft(tmp_path / "adapter", ImportTarget(tmp_path / "zoo", "x"), base_checkpoint=tmp_path / "wide")
    # a LoRA task model into a zoo whose base is another width: the first differing tensor is named
    import_hf_vit(tmp_path / "wide", ImportTarget(tmp_path / "zoo", "base", role="base"))
    with pytest.raises(CheckpointImportError, match=r"backbone tensor '\w[\w.]*' is .* in 'base'"):
        import_peft(tmp_path / "adapter", ImportTarget(tmp_path / "zoo", "x"), base_checkpoint=tmp_path / "small")
    (tmp_path / "adapter" / "adapter_model.safetensors").unlink()
    with pytest.raises(CheckpointImportError, match="neither adapter_model.safetensors nor adapter_model.bin"):
        import_peft(tmp_path / "adapter", ImportTarget(tmp_path / "zoo", "x"), base_checkpoint=tmp_path / "small")


def test_clip_zoo_end_to_end_emr_merge_and_serve(with_projection, tmp_path, capsys):
    """A base and two CLIP task models imported by the CLI, merged with EMR, served; task given -> the task's class."""
    from server_helpers import AsgiHarness, png_bytes

    from server.http.settings import ServerSettings

    ckpt, base = with_projection
    zoo_dir, store = tmp_path / "zoo", tmp_path / "store"
    rng = np.random.default_rng(0)  # distinct images: a colour each, plus texture
    colours = rng.integers(0, 256, (6, 1, 1, 3))
    images = np.clip(colours + rng.normal(0, 40, (6, 32, 32, 3)), 0, 255).astype(np.uint8)
    assert (
        main(["import", "clip", "--zoo", str(zoo_dir), "--name", "base", "--checkpoint", str(ckpt), "--role", "base"])
        == 0
    )
    prep = Zoo.load(zoo_dir, require_base=False).metas["base"].preprocessing
    x = to_model_input(images, prep)
    want: dict[str, list[str]] = {}
    for seed, (task, classes) in enumerate({"birds": ["owl", "jay", "tit"], "cars": ["van", "bus"]}.items()):
        tuned = copy.deepcopy(base)
        _jitter(tuned, 10 + seed, scale=0.03)  # fine-tuned tower, the shared projection untouched
        tuned.save_pretrained(tmp_path / task)
        shutil.copy(ckpt / "preprocessor_config.json", tmp_path / task)  # fine-tuned with the base's processor
        with torch.no_grad():
            emb = torch.nn.functional.normalize(tuned(pixel_values=x).image_embeds, dim=-1)
        # a zero-shot-like head: each class is one image's (centred) embedding; logit scale 100 folded in
        protos = torch.nn.functional.normalize(emb[: len(classes)] - emb.mean(0), dim=-1)
        save_file({"weight": protos, "logit_scale": torch.tensor(np.log(100.0))}, tmp_path / f"{task}.safetensors")
        logits = 100 * emb @ protos.T
        # top-1 minus top-2 logit of the individual model: measured 4.1 to 102 here
        want[task] = [classes[i] for i in logits.argmax(-1).tolist()]
        args = ["--checkpoint", str(tmp_path / task), "--head", str(tmp_path / f"{task}.safetensors")]
        assert (
            main(["import", "clip", "--zoo", str(zoo_dir), "--name", task, *args, "--classes", ",".join(classes)]) == 0
        )
    capsys.readouterr()
    assert main(["zoo", "show", str(zoo_dir)]) == 0
    assert json.loads(capsys.readouterr().out)["projection"] == (
        f"in each model's backbone ('{PROJECTION_KEY}', 16 x 32), then L2-normalised; the same in every model"
    )
    assert main(["merge", "--zoo", str(zoo_dir), "--store", str(store), "--method", "emr", "--quiet"]) == 0
    settings = ServerSettings(store=store, zoo=str(zoo_dir), watch_interval_s=0, device="cpu", default_method="emr")
    h = AsgiHarness(settings)
    try:
        assert h.state.manager.engine.method == "emr"
        for task, labels in want.items():
            for img, label in zip(images, labels, strict=True):
                r = h.request("POST", "/v1/classify", files={"image": ("x.png", png_bytes(img))}, data={"task": task})
                assert r.status_code == 200, r.text
                assert r.json()["predictions"][0]["class"]["label"] == label, (task, want)
    finally:
        h.close()
    # the one-pass low-rank engine on a CLIP zoo (the projection is a matrix layer with a zero delta there):
    # TSV-C at full rank is every individual model, so every answer is the CLIP model's own
    args = ["--zoo", str(zoo_dir), "--store", str(store), "--method", "tsv_c", "--param", "f=1.0", "--quiet"]
    assert main(["merge", *args]) == 0
    h = AsgiHarness(ServerSettings(store=store, watch_interval_s=0, device="cpu", default_method="tsv_c"))
    try:
        assert h.state.manager.engine.method == "tsv_c"
        for task, labels in want.items():
            for img, label in zip(images, labels, strict=True):
                r = h.request("POST", "/v1/classify", files={"image": ("x.png", png_bytes(img))}, data={"task": task})
                assert r.status_code == 200 and r.json()["predictions"][0]["class"]["label"] == label, r.text
    finally:
        h.close()


def test_zoo_spec_files_take_clip_towers_and_peft_adapters(with_projection, tmp_path):
    """`format: clip` (+ head) and `format: peft` (+ base_checkpoint) in a zoo spec give the importers' models."""
    import yaml

    from model_store.errors import ZooFormatError
    from model_store.zoo_spec import create_zoo

    peft = require("peft", "pip install -e '.[test]'")
    ckpt, ref = with_projection
    w, b = _head(tmp_path / "head.safetensors", 2, 16, 6)
    clip_spec = {
        "name": "clipzoo",
        "base": {"format": "clip", "path": str(ckpt)},
        "tasks": [
            {
                "name": "pets",
                "format": "clip",
                "path": str(ckpt),
                "head": "head.safetensors",
                "logit_scale": 50.0,
                "classes": ["cat", "dog"],
                "preprocessing": {"interpolation": "bilinear"},
            }
        ],
    }
    (tmp_path / "clip.yaml").write_text(yaml.safe_dump(clip_spec))
    zoo = create_zoo(tmp_path / "clip.yaml", tmp_path / "zoos", progress=False)
    prep = zoo.metas["pets"].preprocessing
    assert (prep.mean, prep.interpolation) == ([0.4, 0.5, 0.6], "bilinear")  # the checkpoint's, then the override
    x = _x()
    with torch.no_grad():
        want = 50.0 * (torch.nn.functional.normalize(ref(pixel_values=x).image_embeds, dim=-1) @ w.T + b)
        assert (zoo.build_model("pets")(x) - want).abs().max().item() < TOL
    base = _vit()
    base.save_pretrained(tmp_path / "vit")
    tuned = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"]))
    for name, p in tuned.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.1)
    tuned.save_pretrained(tmp_path / "adapter")
    want_model = tuned.merge_and_unload().eval()
    peft_spec = {
        "name": "lorazoo",
        "base": {"format": "hf", "path": "vit"},
        "tasks": [{"name": "t", "format": "peft", "path": "adapter", "base_checkpoint": "vit"}],
    }
    (tmp_path / "peft.yaml").write_text(yaml.safe_dump(peft_spec))
    zoo = create_zoo(tmp_path / "peft.yaml", tmp_path / "zoos", progress=False)
    assert zoo.metas["t"].provenance.lora is not None and zoo.metas["t"].provenance.lora.rank == 2
    with torch.no_grad():
        assert (zoo.build_model("t")(x) - want_model(pixel_values=x).logits).abs().max().item() < TOL
    # misplaced fields are named before anything is read
    for task, needle in [
        ({"format": "clip", "path": str(ckpt)}, "a format clip task needs head"),
        ({"format": "hf", "path": "vit", "head": "head.safetensors"}, "head and logit_scale are for format clip"),
        ({"format": "hf", "path": "vit", "base_checkpoint": "vit"}, "base_checkpoint is for format peft"),
    ]:
        (tmp_path / "bad.yaml").write_text(yaml.safe_dump({**peft_spec, "tasks": [{"name": "t", **task}]}))
        with pytest.raises(ZooFormatError, match=needle):
            create_zoo(tmp_path / "bad.yaml", tmp_path / "zoos", name="bad", progress=False)
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump({**peft_spec, "base": {"format": "peft", "path": "adapter"}}))
    with pytest.raises(CheckpointImportError, match="the base must be its HF ViT"):
        create_zoo(tmp_path / "bad.yaml", tmp_path / "zoos", name="bad", progress=False)
    assert not (tmp_path / "zoos" / "bad").exists()


def test_lora_zoo_is_served_exactly_from_its_low_rank_deltas(tmp_path, capsys):
    """Two PEFT adapters (q/v rank 2; fc1 rank 4) on one HF ViT -> `merge --method lora` -> one-pass serving.

    The low-rank bundle keeps each layer's exact rank (fused qkv: 2 + 2), and every image classified with
    its task given gets the class and probability of PEFT's own merged model."""
    from server_helpers import AsgiHarness, png_bytes

    from model_store.bundle import BundleStore
    from model_store.settings import StoreLayout
    from server.http.settings import ServerSettings
    from server.runtime.bundle_reader import BundleReader

    peft = require("peft", "pip install -e '.[test]'")
    base = _vit(num_labels=3)
    base.save_pretrained(tmp_path / "base")
    zoo_dir, store = tmp_path / "zoo", tmp_path / "store"
    import_hf_vit(tmp_path / "base", ImportTarget(zoo_dir, "base", role="base"))
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    prep = Zoo.load(zoo_dir, require_base=False).metas["base"].preprocessing
    x = to_model_input(images, prep)
    want = {}
    for seed, (task, targets, r) in enumerate([("q_and_v", ["q_proj", "v_proj"], 2), ("mlp", ["fc1"], 4)]):
        cfg = peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, modules_to_save=["classifier"])
        tuned = peft.get_peft_model(copy.deepcopy(base), cfg)
        gen = torch.Generator().manual_seed(20 + seed)
        for name, p in tuned.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                p.data.add_(0.2 * torch.randn(p.shape, generator=gen))
        tuned.save_pretrained(tmp_path / task)
        with torch.no_grad():
            want[task] = tuned.merge_and_unload().eval()(pixel_values=x).logits.softmax(-1)
        import_peft(tmp_path / task, ImportTarget(zoo_dir, task), base_checkpoint=tmp_path / "base")
    assert main(["merge", "--zoo", str(zoo_dir), "--store", str(store), "--method", "lora", "--quiet"]) == 0
    spec = BundleReader(BundleStore(StoreLayout(store)).load()).spec.lowrank
    assert spec is not None and spec.source == "lora" and spec.rank_fraction is None
    assert spec.ranks["blocks.0.attn.qkv.weight"] == 4 and spec.ranks["blocks.1.mlp.fc1.weight"] == 4
    assert spec.ranks["blocks.0.attn.proj.weight"] == 1  # no adapter there: a zero delta, rank 1
    h = AsgiHarness(ServerSettings(store=store, watch_interval_s=0, device="cpu", default_method="lora"))
    try:
        for task, probs in want.items():
            for img, p in zip(images, probs, strict=True):
                r = h.request("POST", "/v1/classify", files={"image": ("x.png", png_bytes(img))}, data={"task": task})
                assert r.status_code == 200, r.text
                got = r.json()["predictions"][0]["class"]
                assert got["label"] == f"c{int(p.argmax())}" and abs(got["probability"] - float(p.max())) < 1e-4
    finally:
        h.close()
    # a fully fine-tuned model in the zoo: refused, naming the task and the layer
    full = _vit(num_labels=3)
    full.load_state_dict({k: v + 0.01 * torch.randn_like(v) for k, v in base.state_dict().items()})
    full.save_pretrained(tmp_path / "full")
    import_hf_vit(tmp_path / "full", ImportTarget(zoo_dir, "full"))
    capsys.readouterr()
    assert main(["merge", "--zoo", str(zoo_dir), "--store", str(store), "--method", "lora", "--quiet"]) != 0
    assert re.search(r"task 'full': '[\w.]+' has rank \d+ of \d+", capsys.readouterr().err)
