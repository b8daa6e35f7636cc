"""Import a PEFT LoRA adapter on a Hugging Face ViT as a full task model (``W0 + scale * B @ A``).

Reads ``adapter_config.json`` and ``adapter_model.safetensors`` (or ``adapter_model.bin``)
with no dependency on ``peft``. Target modules may be named the classic way
(``attention.attention.query``, ``attention.output.dense``, ``intermediate.dense``,
``output.dense``) or the transformers-5 way (``attention.q_proj``, ``o_proj``, ``mlp.fc1``,
``mlp.fc2``); ``scale`` is ``lora_alpha / r`` (``/ sqrt(r)`` with rslora; per module with
``alpha_pattern``/``rank_pattern``). Full tensors the adapter saves (``modules_to_save``,
e.g. the classifier, and trained biases) replace the base's. The adapter's rank and layers
are kept in the model's provenance (``provenance.lora``).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from model_store.architecture import StateDict
from model_store.errors import CheckpointImportError
from model_store.importers.common import (
    ImportTarget,
    check_fits_zoo,
    hf_weights,
    id2label_classes,
    read_hf_config,
    read_json,
    read_state_dict,
    save_imported,
)
from model_store.importers.hf_vit import (
    classic_name,
    convert_hf_vit_state,
    hf_preprocessing,
    hf_vit_architecture,
    timm_key,
)
from model_store.schema import LoraAdapter
from model_store.zoo import Zoo

_LORA_RE = re.compile(r"^(.+)\.lora_([AB])(?:\.[A-Za-z0-9_-]+)?\.weight$")
_PREFIX = "base_model.model."
_REFUSED = ("use_dora", "fan_in_fan_out", "lora_bias", "layer_replication", "target_parameters")


@dataclass(frozen=True)
class LoraPair:
    """One adapted linear layer: ``B`` (out x r), ``A`` (r x in) and its scale."""

    module: str
    a: torch.Tensor
    b: torch.Tensor
    scale: float


def canonical(key: str) -> str:
    """An HF ViT tensor name without ``vit.``, in classic (``encoder.layer``) naming."""
    return classic_name(key[len("vit.") :] if key.startswith("vit.") else key)


def read_adapter_config(adapter_dir: Path) -> dict:
    """``adapter_config.json``, refusing what is not a plain LoRA on linear layers."""
    path = adapter_dir / "adapter_config.json"
    if not path.exists():
        raise CheckpointImportError(f"{adapter_dir}: adapter_config.json is missing (not a PEFT adapter directory)")
    cfg = read_json(path)
    if cfg.get("peft_type", "LORA") != "LORA":
        raise CheckpointImportError(f"{path}: peft_type '{cfg.get('peft_type')}' is not LORA")
    refused = [k for k in _REFUSED if cfg.get(k)]
    if refused:
        raise CheckpointImportError(f"{path}: not supported: {', '.join(refused)}")
    return cfg


def _alpha(module: str, cfg: dict) -> float:
    """``lora_alpha``, or the ``alpha_pattern`` entry matching the module (PEFT's suffix rule)."""
    for pattern, alpha in (cfg.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return float(alpha)
    return float(cfg.get("lora_alpha", 8))


def lora_pairs(adapter: StateDict, cfg: dict) -> tuple[list[LoraPair], StateDict]:
    """The adapter's (B, A) pairs by module (canonical names) and its full tensors."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    full: StateDict = {}
    for key, value in adapter.items():
        k = (key[len(_PREFIX) :] if key.startswith(_PREFIX) else key).replace(".modules_to_save.default", "")
        m = _LORA_RE.match(k)
        if m:
            parts.setdefault(m.group(1), {})[m.group(2)] = value
        elif "lora_" in k:
            raise CheckpointImportError(f"adapter tensor '{key}': only LoRA on linear layers is supported")
        else:
            full[canonical(k)] = value
    pairs = []
    for module, ab in sorted(parts.items()):
        if set(ab) != {"A", "B"}:
            raise CheckpointImportError(f"adapter module '{module}': lora_A or lora_B is missing")
        rank = ab["A"].shape[0]
        alpha = _alpha(module, cfg)
        scale = alpha / math.sqrt(rank) if cfg.get("use_rslora") else alpha / rank
        pairs.append(LoraPair(canonical(module + ".weight")[: -len(".weight")], ab["A"], ab["B"], scale))
    return pairs, full


def merge_lora(base: StateDict, pairs: list[LoraPair], full: StateDict, where: str) -> StateDict:
    """``W0 + scale * B @ A`` for every pair; full tensors replace the base's (canonical names)."""
    merged = {canonical(k): v for k, v in base.items()}
    for p in pairs:
        key = p.module + ".weight"
        if key not in merged:
            raise CheckpointImportError(f"adapter targets '{key}', which the base checkpoint {where} does not have")
        w = merged[key]
        if (p.b.shape[0], p.a.shape[1]) != tuple(w.shape) or p.b.shape[1] != p.a.shape[0]:
            raise CheckpointImportError(
                f"adapter '{p.module}': lora_B {tuple(p.b.shape)} @ lora_A {tuple(p.a.shape)} does not fit "
                f"'{key}' {tuple(w.shape)} of the base checkpoint {where}"
            )
        merged[key] = (w.double() + p.scale * (p.b.double() @ p.a.double())).to(w.dtype)
    for key, value in full.items():
        if key in merged and merged[key].shape != value.shape and not key.startswith("classifier."):
            raise CheckpointImportError(
                f"adapter tensor '{key}' is {tuple(value.shape)}, the base checkpoint's {tuple(merged[key].shape)}"
            )
        if key not in merged and not key.startswith("classifier."):
            raise CheckpointImportError(f"adapter tensor '{key}' is not in the base checkpoint {where}")
        merged[key] = value
    return merged


def resolve_base(adapter_dir: Path, cfg: dict, base_checkpoint: str | Path | None) -> Path:
    """``--base-checkpoint``, else the adapter's ``base_model_name_or_path`` when it is a local directory."""
    if base_checkpoint is not None:
        candidates = [Path(base_checkpoint)]
    else:
        name = cfg.get("base_model_name_or_path")
        if not name:
            raise CheckpointImportError(
                f"{adapter_dir}: the adapter names no base_model_name_or_path; pass --base-checkpoint DIR"
            )
        candidates = [Path(name), adapter_dir / name]
    found = next((c for c in candidates if c.is_dir()), None)
    if found is None:
        raise CheckpointImportError(
            f"base checkpoint '{candidates[0]}' is not a local directory (pass --base-checkpoint DIR: the HF ViT the "
            "adapter was trained on)"
        )
    return found


def _adapter_weights(adapter_dir: Path) -> Path:
    for name in ("adapter_model.safetensors", "adapter_model.bin"):
        if (adapter_dir / name).exists():
            return adapter_dir / name
    raise CheckpointImportError(f"{adapter_dir}: neither adapter_model.safetensors nor adapter_model.bin found")


def import_peft(adapter_dir: str | Path, target: ImportTarget, base_checkpoint: str | Path | None = None) -> Zoo:
    """Add the task model ``base + LoRA`` to ``target``'s zoo (the classifier from ``modules_to_save``, else the
    base's; ``target.role`` must be ``task``). Preprocessing: the base checkpoint's."""
    if target.role != "task":
        raise CheckpointImportError("a PEFT adapter is a task model: import the base with import_hf_vit")
    adapter_dir = Path(adapter_dir)
    cfg = read_adapter_config(adapter_dir)
    pairs, full = lora_pairs(read_state_dict(_adapter_weights(adapter_dir)), cfg)
    if not pairs:
        raise CheckpointImportError(f"{adapter_dir}: the adapter has no lora_A/lora_B tensors")
    base_dir = resolve_base(adapter_dir, cfg, base_checkpoint)
    config, base = read_hf_config(base_dir), read_state_dict(hf_weights(base_dir))
    arch = hf_vit_architecture(config)
    state = convert_hf_vit_state(merge_lora(base, pairs, full, str(base_dir)))
    layers = sorted({k for p in pairs if (k := timm_key(p.module + ".weight"))})
    lora = LoraAdapter(
        rank=max(int(p.a.shape[0]) for p in pairs),
        alpha=float(cfg.get("lora_alpha", 8)),
        rslora=bool(cfg.get("use_rslora")),
        layers=layers,
    )
    backbone = {k: v for k, v in state.items() if not k.startswith("head.")}
    check_fits_zoo(target.zoo_dir, target.name, backbone, arch)
    prep = hf_preprocessing(base_dir, arch)
    source = f"import:peft:{adapter_dir.name}"
    return save_imported(target, state, arch, prep, source, id2label_classes(config, state), lora=lora)
