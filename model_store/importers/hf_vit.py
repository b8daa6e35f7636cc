"""Import a Hugging Face ``transformers`` ViT checkpoint into timm naming.

Reads ``config.json`` and ``model.safetensors`` (or ``pytorch_model.bin``) with no
dependency on ``transformers``. Works for ``ViTForImageClassification`` (keys under
``vit.`` plus ``classifier``) and bare ``ViTModel`` checkpoints (pooler ignored).
Query/key/value projections are concatenated into timm's fused ``qkv``. Both the
classic names (``encoder.layer.N.attention.attention.query``) and transformers 5
in-memory names (``layers.N.attention.q_proj``) are understood.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from model_store.architecture import StateDict
from model_store.errors import CheckpointImportError
from model_store.importers.common import (
    ImportTarget,
    hf_weights,
    id2label_classes,
    read_hf_config,
    read_state_dict,
    save_imported,
)
from model_store.importers.hf_processor import processor_preprocessing
from model_store.schema import Architecture, Preprocessing
from model_store.zoo import Zoo

_LAYER_MAP = {
    "layernorm_before": "norm1",
    "attention.output.dense": "attn.proj",
    "layernorm_after": "norm2",
    "intermediate.dense": "mlp.fc1",
    "output.dense": "mlp.fc2",
}
_LAYER_RE = re.compile(r"^encoder\.layer\.(\d+)\.(.+)\.(weight|bias)$")
# transformers >= 5 names tensors differently in memory (save_pretrained still writes
# the names above); checkpoints saved from a raw state_dict() use these.
_V5_RE = re.compile(r"^layers\.(\d+)\.(.+)\.(weight|bias)$")
_V5_MAP = {
    "attention.q_proj": "attention.attention.query",
    "attention.k_proj": "attention.attention.key",
    "attention.v_proj": "attention.attention.value",
    "attention.o_proj": "attention.output.dense",
    "mlp.fc1": "intermediate.dense",
    "mlp.fc2": "output.dense",
    "layernorm_before": "layernorm_before",
    "layernorm_after": "layernorm_after",
}


def classic_name(k: str) -> str:
    """Map a transformers-5 layer tensor name (``vit.`` prefix removed) onto the classic ``encoder.layer`` name."""
    m = _V5_RE.match(k)
    if m and m.group(2) in _V5_MAP:
        return f"encoder.layer.{m.group(1)}.{_V5_MAP[m.group(2)]}.{m.group(3)}"
    return k


def timm_key(classic: str) -> str | None:
    """The timm tensor a classic HF ViT layer tensor becomes (query/key/value: the fused ``qkv``); None if none."""
    m = _LAYER_RE.match(classic)
    if not m:
        return None
    i, inner, kind = m.groups()
    if inner.startswith("attention.attention."):
        return f"blocks.{i}.attn.qkv.{kind}"
    return f"blocks.{i}.{_LAYER_MAP[inner]}.{kind}" if inner in _LAYER_MAP else None


def hf_vit_architecture(config: dict) -> Architecture:
    """timm architecture equivalent to an HF ``ViTConfig`` dict."""
    if config.get("model_type", "vit") != "vit":
        raise CheckpointImportError(f"model_type '{config.get('model_type')}' is not a ViT")
    if config.get("hidden_act", "gelu") != "gelu":
        raise CheckpointImportError(
            f"hidden_act '{config.get('hidden_act')}' has no timm equivalent (only exact 'gelu')"
        )
    hidden = int(config.get("hidden_size", 768))
    kwargs = {
        "img_size": int(config.get("image_size", 224)),
        "patch_size": int(config.get("patch_size", 16)),
        "in_chans": int(config.get("num_channels", 3)),
        "embed_dim": hidden,
        "depth": int(config.get("num_hidden_layers", 12)),
        "num_heads": int(config.get("num_attention_heads", 12)),
        "mlp_ratio": int(config.get("intermediate_size", 4 * hidden)) / hidden,
        "qkv_bias": bool(config.get("qkv_bias", True)),
    }
    return Architecture(
        timm_name="vit_base_patch16_224", kwargs=kwargs, layer_norm_eps=float(config.get("layer_norm_eps", 1e-12))
    )


def convert_hf_vit_state(hf: StateDict) -> StateDict:
    """HF ViT tensor names -> timm VisionTransformer names."""
    state: StateDict = {}
    qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, value in hf.items():
        k = classic_name(key[len("vit.") :] if key.startswith("vit.") else key)
        if k.startswith("pooler."):
            continue
        if k.startswith("classifier."):
            state["head." + k.split(".", 1)[1]] = value
        elif k == "embeddings.cls_token":
            state["cls_token"] = value
        elif k == "embeddings.position_embeddings":
            state["pos_embed"] = value
        elif k.startswith("embeddings.patch_embeddings.projection."):
            state["patch_embed.proj." + k.rsplit(".", 1)[1]] = value
        elif k.startswith("layernorm."):
            state["norm." + k.rsplit(".", 1)[1]] = value
        elif m := _LAYER_RE.match(k):
            i, inner, kind = int(m.group(1)), m.group(2), m.group(3)
            if inner.startswith("attention.attention."):
                qkv.setdefault((i, kind), {})[inner.rsplit(".", 1)[1]] = value
            elif inner in _LAYER_MAP:
                state[f"blocks.{i}.{_LAYER_MAP[inner]}.{kind}"] = value
            else:
                raise CheckpointImportError(f"unrecognised HF ViT tensor '{key}'")
        elif k == "embeddings.mask_token":
            continue
        else:
            raise CheckpointImportError(f"unrecognised HF ViT tensor '{key}'")
    for (i, kind), parts in qkv.items():
        if set(parts) != {"query", "key", "value"}:
            raise CheckpointImportError(f"layer {i}: incomplete query/key/value {kind}")
        state[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat([parts["query"], parts["key"], parts["value"]], dim=0)
    return state


def hf_preprocessing(ckpt_dir: Path, arch: Architecture) -> Preprocessing:
    """The checkpoint's ``preprocessor_config.json`` read completely (ViT/DeiT/BEiT processors;
    :mod:`model_store.importers.hf_processor`); the input size is the model's (``image_size``)."""
    return processor_preprocessing(ckpt_dir, int(arch.kwargs["img_size"]), int(arch.kwargs["in_chans"]))


def hf_checkpoint_preprocessing(ckpt_dir: str | Path) -> Preprocessing:
    """The preprocessing an HF ViT checkpoint directory describes."""
    ckpt_dir = Path(ckpt_dir)
    return hf_preprocessing(ckpt_dir, hf_vit_architecture(read_hf_config(ckpt_dir)))


def import_hf_vit(ckpt_dir: str | Path, target: ImportTarget) -> Zoo:
    """Add an HF ViT checkpoint directory to ``target``'s zoo (classes from ``id2label`` unless given)."""
    ckpt_dir = Path(ckpt_dir)
    config = read_hf_config(ckpt_dir)
    weights = hf_weights(ckpt_dir)
    arch = hf_vit_architecture(config)
    state = convert_hf_vit_state(read_state_dict(weights))
    classes = id2label_classes(config, state)
    prep = hf_preprocessing(ckpt_dir, arch)
    return save_imported(target, state, arch, prep, f"import:hf:{ckpt_dir.name}", classes)
