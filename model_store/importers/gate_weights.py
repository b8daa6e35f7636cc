"""A user's ImageNet weights for the gate network (zoo spec ``gate.init``), in timm naming.

Accepts a timm state dict of the gate architecture as it is, or any checkpoint whose
tensors come in the same order and shapes as timm's -- torchvision's ``mobilenet_v2``
(``features.*`` / ``classifier.1``) and the ``efficientnet-lite0`` package's files are
of that kind -- paired key by key in order, every shape checked. The classifier is
kept when it fits timm's 1000-class head and dropped otherwise (the gate replaces it).
"""

from __future__ import annotations

from pathlib import Path

import timm

from model_store.architecture import GATE_ARCHS, StateDict, head_prefix, split_head
from model_store.errors import CheckpointImportError
from model_store.importers.common import read_state_dict


def load_gate_weights(path: str | Path, arch: str) -> StateDict:
    """The gate backbone (and 1000-class head when present) of ``path`` in timm ``arch`` naming."""
    if arch not in GATE_ARCHS:
        raise CheckpointImportError(f"unknown gate arch '{arch}'; valid: {', '.join(GATE_ARCHS)}")
    src = read_state_dict(path)
    model = timm.create_model(arch, pretrained=False)
    target = model.state_dict()
    prefix = head_prefix(model)
    body_t, head_t = split_head(target, prefix)
    if set(src) >= set(body_t):  # already timm naming
        out = {k: src[k] for k in target if k in src}
        mism = [k for k in out if tuple(out[k].shape) != tuple(target[k].shape)]
        if mism:
            raise CheckpointImportError(f"{path}: shapes do not fit timm {arch} for {mism[:3]}")
    else:
        out = _pair_in_order(src, target, body_t, head_t, str(path), arch)
    missing = set(body_t) - set(out)
    if missing:
        raise CheckpointImportError(
            f"{path}: no weights for {len(missing)} tensors of timm {arch} (e.g. {sorted(missing)[:3]})"
        )
    if set(head_t) - set(out):
        out = {k: v for k, v in out.items() if k not in head_t}
    return {k: v.to(target[k].dtype).contiguous() for k, v in out.items()}


def _pair_in_order(
    src: StateDict, target: StateDict, body_t: StateDict, head_t: StateDict, where: str, arch: str
) -> StateDict:
    """Pair ``src`` with timm's tensors in order; the trailing classifier may differ or be absent."""
    src_items = list(src.items())
    tgt_items = list(target.items())
    if len(src_items) not in (len(target), len(body_t)):
        raise CheckpointImportError(
            f"{where}: {len(src_items)} tensors, timm {arch} has {len(target)} ({len(body_t)} without its classifier): "
            "not a checkpoint of this architecture"
        )
    out: StateDict = {}
    for (skey, sval), (tkey, tval) in zip(src_items, tgt_items):
        if tuple(sval.shape) != tuple(tval.shape):
            if tkey in head_t:
                continue  # another number of classes: the gate replaces the classifier anyway
            raise CheckpointImportError(
                f"{where}: shape mismatch pairing {skey} {tuple(sval.shape)} with timm {arch} {tkey} "
                f"{tuple(tval.shape)}"
            )
        out[tkey] = sval
    return out
