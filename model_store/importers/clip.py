"""Import CLIP image towers onto timm's CLIP ViTs (pre-norm, no patch bias, ``quick_gelu`` when the checkpoint says so).

Sources:

* a Hugging Face directory (``config.json`` + weights) of a ``CLIPVisionModel``,
  ``CLIPVisionModelWithProjection`` or a full ``CLIPModel`` (its vision tower is taken);
* an OpenAI / open_clip checkpoint file with ``visual.*`` tensors (any prefix before
  ``visual.``, e.g. ``module.`` or ``model.``), optionally with open_clip's model config
  (``open_clip_config.json`` next to it, or ``--open-clip-config``).

HF names are first mapped onto OpenAI's ``visual.*`` names; both then go through timm's own
OpenAI/open_clip converter (``timm.models.vision_transformer.checkpoint_filter_fn``). The
visual projection, when there is one, becomes the backbone tensor
:data:`~model_store.architecture.PROJECTION_KEY` (``Architecture.projection_dim``): the
model's pre-logits are ``normalize(P f)`` and its head is a linear layer on them. No
``transformers``/``open_clip`` needed at run time.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path

import timm
import torch
from timm.models.vision_transformer import checkpoint_filter_fn

from model_store.architecture import PROJECTION_KEY, StateDict, build_model
from model_store.errors import CheckpointImportError
from model_store.importers.common import (
    ImportTarget,
    check_fits_zoo,
    read_head,
    read_hf_config,
    read_json,
    read_state_dict,
    save_imported,
)
from model_store.importers.hf_processor import CLIP_MEAN, CLIP_STD, processor_preprocessing
from model_store.schema import Architecture, Preprocessing
from model_store.zoo import Zoo

_SIZES = {384: "small", 512: "medium", 768: "base", 1024: "large", 1280: "huge"}
_OPEN_CLIP_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
_HF_WEIGHTS = ("model.safetensors", "pytorch_model.bin")


@dataclass(frozen=True)
class ClipTower:
    """A CLIP image tower in timm naming (projection at ``PROJECTION_KEY`` if any)."""

    state: StateDict
    arch: Architecture
    prep: Preprocessing
    source: str

    @property
    def embed_dim(self) -> int:
        """Width of the head's input: the projection's, or the tower's when it has none."""
        return self.arch.projection_dim or int(self.arch.kwargs["embed_dim"])


def clip_architecture(
    width: int,
    depth: int,
    heads: int,
    patch: int,
    img_size: int,
    mlp_dim: int,
    quick_gelu: bool,
    eps: float = 1e-5,
    channels: int = 3,
    projection_dim: int | None = None,
) -> Architecture:
    """timm CLIP ViT architecture (token pooling, final norm = CLIP's ``ln_post``)."""
    name = f"vit_{_SIZES.get(width, 'base')}_patch{patch}_clip{'_quickgelu' if quick_gelu else ''}_{img_size}"
    kwargs = {
        "img_size": img_size,
        "patch_size": patch,
        "in_chans": channels,
        "embed_dim": width,
        "depth": depth,
        "num_heads": heads,
        "mlp_ratio": mlp_dim / width,
        "pre_norm": True,
        "act_layer": "quick_gelu" if quick_gelu else "gelu",
    }
    return Architecture(
        timm_name=name if timm.is_model(name) else "vit_base_patch16_clip_224",
        kwargs=kwargs,
        layer_norm_eps=eps,
        projection_dim=projection_dim,
    )


def openai_visual_to_timm(visual: StateDict, arch: Architecture) -> StateDict:
    """OpenAI/open_clip ``visual.*`` tensors -> timm names by timm's converter; the projection -> ``PROJECTION_KEY``."""
    model = build_model(arch.model_copy(update={"projection_dim": None}), 0)  # the converter reads its geometry
    state = checkpoint_filter_fn(visual, model)  # type: ignore[arg-type]
    if "head.weight" in state:  # timm puts `proj` (transposed) in its head, with a zero bias
        state[PROJECTION_KEY] = state.pop("head.weight")
        state.pop("head.bias", None)
    return state


# -- Hugging Face ---------------------------------------------------------------------------------
# names inside the vision tower: transformers 4 saved them under ``vision_model.``, 5 saves a
# CLIPVisionModel without that prefix (CLIPModel and ...WithProjection keep it)
_HF_TOP = {
    "embeddings.class_embedding": "class_embedding",
    "embeddings.patch_embedding.weight": "conv1.weight",
    "embeddings.position_embedding.weight": "positional_embedding",
    "pre_layrnorm.weight": "ln_pre.weight",
    "pre_layrnorm.bias": "ln_pre.bias",
    "post_layernorm.weight": "ln_post.weight",
    "post_layernorm.bias": "ln_post.bias",
}
_HF_LAYER_RE = re.compile(r"^encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$")
_HF_LAYER_MAP = {
    "self_attn.out_proj": "attn.out_proj",
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}
_HF_QKV = {"self_attn.q_proj": "q", "self_attn.k_proj": "k", "self_attn.v_proj": "v"}
_HF_SKIP_RE = re.compile(r"^(text_model\.|text_projection\.|logit_scale$|embeddings\.position_ids$)")
_VISION = "vision_model."


def hf_clip_to_openai(hf: StateDict) -> StateDict:
    """HF CLIP vision tensors -> OpenAI CLIP ``visual.*`` names (q/k/v fused into ``in_proj``); text tower dropped."""
    out: StateDict = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, value in hf.items():
        k = key[len(_VISION) :] if key.startswith(_VISION) else key
        m = _HF_LAYER_RE.match(k)
        if _HF_SKIP_RE.match(k):
            continue
        if k == "visual_projection.weight":
            out["visual.proj"] = value.t().contiguous()
        elif k in _HF_TOP:
            out["visual." + _HF_TOP[k]] = value
        elif m and m.group(2) in _HF_QKV:
            qkv.setdefault((m.group(1), m.group(3)), {})[_HF_QKV[m.group(2)]] = value
        elif m and m.group(2) in _HF_LAYER_MAP:
            out[f"visual.transformer.resblocks.{m.group(1)}.{_HF_LAYER_MAP[m.group(2)]}.{m.group(3)}"] = value
        else:
            raise CheckpointImportError(f"unrecognised HF CLIP tensor '{key}'")
    for (i, kind), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise CheckpointImportError(f"layer {i}: incomplete q/k/v_proj {kind} (found {sorted(parts)})")
        out[f"visual.transformer.resblocks.{i}.attn.in_proj_{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    if "visual.class_embedding" not in out:
        raise CheckpointImportError("no 'embeddings.class_embedding' tensor: not a CLIP vision checkpoint")
    return out


def _hf_vision_config(config: dict, where: Path) -> dict:
    kind = config.get("model_type")
    if kind == "clip":
        return config.get("vision_config") or {}
    if kind == "clip_vision_model":
        return config
    raise CheckpointImportError(
        f"{where}: model_type '{kind}' is not a CLIP vision model (clip_vision_model or clip); "
        "ViTs import with `vitmerge import hf`"
    )


def _weights(ckpt_dir: Path, names: tuple[str, ...]) -> Path:
    found = next((ckpt_dir / f for f in names if (ckpt_dir / f).exists()), None)
    if found is None:
        raise CheckpointImportError(f"{ckpt_dir}: none of {', '.join(names)} found")
    return found


def hf_clip_preprocessing(ckpt_dir: Path, arch: Architecture) -> Preprocessing:
    """The checkpoint's ``preprocessor_config.json`` read completely (CLIPImageProcessor's defaults without one)."""
    size, channels = int(arch.kwargs["img_size"]), int(arch.kwargs["in_chans"])
    return processor_preprocessing(ckpt_dir, size, channels, default_class="CLIPImageProcessor")


def open_clip_preprocessing(pre_cfg: dict, size: int, channels: int, where: str) -> Preprocessing:
    """open_clip's eval ``image_transform`` from its ``preprocess_cfg`` (size, mean, std, interpolation,
    resize_mode shortest | longest | squash, fill_color); OpenAI's defaults for what it leaves out.

    Pillow resizes an RGBA image with premultiplied alpha before open_clip drops the alpha (``alpha``);
    a palette image Pillow resizes nearest-neighbour, which vitmerge does not copy (README).
    """
    mode = pre_cfg.get("resize_mode", "shortest")
    interp = pre_cfg.get("interpolation", "bicubic")
    want = pre_cfg.get("size", size)
    want = want[-1] if isinstance(want, (list, tuple)) and len(set(want)) == 1 else want
    problems = {
        "resize_mode": mode not in ("shortest", "longest", "squash"),
        "interpolation": interp not in ("bicubic", "bilinear"),
        "size": want != size,
        "mode": pre_cfg.get("mode", "RGB") != "RGB",
    }
    bad = [k for k, v in problems.items() if v]
    if bad:
        raise CheckpointImportError(
            f"{where}: preprocess_cfg field '{bad[0]}' ({pre_cfg.get(bad[0])!r}) is not one vitmerge reproduces "
            f"(resize_mode shortest|longest|squash, interpolation bicubic|bilinear, size {size}, mode RGB)"
        )
    return Preprocessing(
        size=size,
        channels=channels,
        mean=[float(v) for v in pre_cfg.get("mean", CLIP_MEAN)],
        std=[float(v) for v in pre_cfg.get("std", CLIP_STD)],
        interpolation=interp,
        resize={"shortest": "shortest_edge", "longest": "longest_edge", "squash": "squash"}[mode],
        fill=[int(pre_cfg.get("fill_color", 0))],
        alpha="premultiplied",
        source=f"{where} (open_clip image_transform, resize_mode {mode})",
    )


def hf_clip_tower(ckpt_dir: str | Path) -> ClipTower:
    """The vision tower of an HF CLIP checkpoint directory."""
    ckpt_dir = Path(ckpt_dir)
    vc = _hf_vision_config(read_hf_config(ckpt_dir), ckpt_dir / "config.json")
    visual = hf_clip_to_openai(read_state_dict(_weights(ckpt_dir, _HF_WEIGHTS)))
    act = vc.get("hidden_act", "quick_gelu")
    if act not in ("quick_gelu", "gelu"):
        raise CheckpointImportError(f"hidden_act '{act}' has no timm equivalent (quick_gelu or gelu)")
    width = int(vc.get("hidden_size", 768))
    arch = clip_architecture(
        width=width,
        depth=int(vc.get("num_hidden_layers", 12)),
        heads=int(vc.get("num_attention_heads", 12)),
        patch=int(vc.get("patch_size", 32)),
        img_size=int(vc.get("image_size", 224)),
        mlp_dim=int(vc.get("intermediate_size", 4 * width)),
        quick_gelu=act == "quick_gelu",
        eps=float(vc.get("layer_norm_eps", 1e-5)),
        channels=int(vc.get("num_channels", 3)),
        projection_dim=int(visual["visual.proj"].shape[1]) if "visual.proj" in visual else None,
    )
    state = openai_visual_to_timm(visual, arch)
    return ClipTower(state, arch, hf_clip_preprocessing(ckpt_dir, arch), f"import:clip:hf:{ckpt_dir.name}")


# -- OpenAI / open_clip ---------------------------------------------------------------------------
_UNSUPPORTED_VISION_CFG = (
    "timm_model_name",
    "attentional_pool",
    "ls_init_value",
    "no_ln_pre",
    "final_ln_after_pool",
    "qk_norm",
    "scaled_cosine_attn",
    "scale_heads",
    "scale_attn_inner",
    "scale_attn",
    "scale_fc",
)


def _open_clip_cfg(path: Path | None) -> tuple[dict, dict]:
    """(model config, preprocess config) from an ``open_clip_config.json`` or a bare model config."""
    if path is None:
        return {}, {}
    if not path.exists():
        raise CheckpointImportError(f"open_clip config {path} does not exist")
    cfg = read_json(path)
    return cfg.get("model_cfg", cfg), cfg.get("preprocess_cfg", {})


def _visual_tensors(raw: StateDict, where: Path) -> StateDict:
    """``visual.*`` tensors with whatever wraps them (``module.``, ``model.``, ...) removed."""
    anchor = next((k for k in raw if k.endswith("visual.class_embedding")), None)
    if anchor is None:
        if any("visual.trunk." in k for k in raw):
            raise CheckpointImportError(
                f"{where}: an open_clip tower built on a timm model (visual.trunk.*): import it with "
                "`vitmerge import timm`"
            )
        raise CheckpointImportError(f"{where}: no 'visual.class_embedding' tensor: not an OpenAI/open_clip checkpoint")
    prefix = anchor[: -len("visual.class_embedding")]
    return {k[len(prefix) :]: v for k, v in raw.items() if k.startswith(prefix + "visual.")}


def _check_vision_cfg(vision: dict, where: Path) -> None:
    bad = [k for k in _UNSUPPORTED_VISION_CFG if vision.get(k)]
    if vision.get("pool_type", "tok") != "tok":
        bad.append(f"pool_type={vision['pool_type']}")
    if bad:
        raise CheckpointImportError(f"{where}: open_clip vision options not supported here: {', '.join(bad)}")


def open_clip_tower(path: str | Path, config: str | Path | None = None) -> ClipTower:
    """The image tower of an OpenAI/open_clip checkpoint file.

    The geometry is read from the tensors; heads (``width / head_width``, default 64),
    the activation and preprocessing from open_clip's config when given (else an
    ``open_clip_config.json`` beside the file); without any config OpenAI's defaults
    (``quick_gelu``, CLIP mean/std, bicubic) apply.
    """
    path = Path(path)
    sibling = path.parent / "open_clip_config.json"
    model_cfg, pre_cfg = _open_clip_cfg(Path(config) if config else (sibling if sibling.exists() else None))
    vision = model_cfg.get("vision_cfg", {})
    _check_vision_cfg(vision, path)
    visual = _visual_tensors(read_state_dict(path), path)
    missing = [k for k in ("visual.conv1.weight", "visual.positional_embedding") if k not in visual]
    if missing:
        raise CheckpointImportError(f"{path}: tensor '{missing[0]}' is missing")
    width, channels, patch, _ = visual["visual.conv1.weight"].shape
    depth = len({k.split(".")[3] for k in visual if k.startswith("visual.transformer.resblocks.")})
    grid = round((visual["visual.positional_embedding"].shape[0] - 1) ** 0.5)
    fc = visual.get("visual.transformer.resblocks.0.mlp.c_fc.weight")
    arch = clip_architecture(
        width=width,
        depth=depth,
        heads=width // int(vision.get("head_width", 64)),
        patch=patch,
        img_size=patch * grid,
        mlp_dim=int(fc.shape[0]) if fc is not None else 4 * width,
        quick_gelu=bool(model_cfg.get("quick_gelu", not model_cfg)),
        eps=float((vision.get("norm_kwargs") or {}).get("eps", 1e-5)),
        channels=channels,
        projection_dim=int(visual["visual.proj"].shape[1]) if "visual.proj" in visual else None,
    )
    where = f"{config or sibling} preprocess_cfg" if pre_cfg else f"{path} (OpenAI CLIP defaults)"
    prep = open_clip_preprocessing(pre_cfg, patch * grid, channels, where)
    return ClipTower(openai_visual_to_timm(visual, arch), arch, prep, f"import:clip:open_clip:{path.name}")


def load_clip_tower(src: str | Path, open_clip_config: str | Path | None = None) -> ClipTower:
    """An HF directory, an open_clip hub-style directory (``open_clip_config.json`` + weights) or a checkpoint file."""
    src = Path(src)
    if not src.exists():
        raise CheckpointImportError(f"checkpoint {src} does not exist")
    if src.is_dir() and (src / "config.json").exists():
        return hf_clip_tower(src)
    if src.is_dir():
        if not (src / "open_clip_config.json").exists() and open_clip_config is None:
            raise CheckpointImportError(f"{src}: neither config.json (Hugging Face) nor open_clip_config.json found")
        return open_clip_tower(_weights(src, _OPEN_CLIP_WEIGHTS), open_clip_config)
    return open_clip_tower(src, open_clip_config)


def with_projection(tower: ClipTower, source: ClipTower) -> ClipTower:
    """``tower`` (without a projection) given the projection of ``source`` (e.g. the pretrained CLIPModel)."""
    if tower.arch.projection_dim is not None:
        raise CheckpointImportError(f"{tower.source} has its own projection; --projection is for towers without one")
    proj = source.state.get(PROJECTION_KEY)
    if proj is None:
        raise CheckpointImportError(f"{source.source} has no visual projection to take")
    width = int(tower.arch.kwargs["embed_dim"])
    if proj.shape[1] != width:
        raise CheckpointImportError(
            f"'{PROJECTION_KEY}' of {source.source} is {proj.shape[0]}x{proj.shape[1]}, the tower is {width} wide"
        )
    arch = tower.arch.model_copy(update={"projection_dim": int(proj.shape[0])})
    return replace(tower, state={**tower.state, PROJECTION_KEY: proj}, arch=arch)


def import_clip(
    checkpoint: str | Path,
    target: ImportTarget,
    head: str | Path | None = None,
    logit_scale: float | None = None,
    projection: str | Path | None = None,
    open_clip_config: str | Path | None = None,
) -> Zoo:
    """Add a CLIP image tower (+ its linear head, for a task) to ``target``'s zoo.

    Task logits are ``logit_scale * (W normalize(P f)) + b`` with a projection ``P``
    (``W f + b`` on the pooled features without one); ``projection`` takes ``P`` from
    another checkpoint for a tower saved without it. Refused before anything is written
    when the tower does not fit the zoo's models (the first differing tensor named).
    """
    role, zoo_dir, name = target.role, target.zoo_dir, target.name
    tower = load_clip_tower(checkpoint, open_clip_config)
    if projection is not None:
        tower = with_projection(tower, load_clip_tower(projection))
    if role == "task" and head is None:
        raise CheckpointImportError(
            "a CLIP task model needs --head FILE (a linear head: 'weight' classes x "
            f"{tower.embed_dim}, optional 'bias'); import the pretrained tower with --role base"
        )
    if role == "base" and head is not None:
        raise CheckpointImportError("a base model has no head; drop --head")
    heads = read_head(head, tower.embed_dim, logit_scale) if head is not None else {}
    check_fits_zoo(zoo_dir, name, tower.state, tower.arch)
    return save_imported(target, {**tower.state, **heads}, tower.arch, tower.prep, tower.source)
