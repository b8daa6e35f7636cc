"""A bundle's stored bytes as a multiple of one float32 model (SPEC section 9).

Counted from the safetensors headers (no tensor is read): every tensor's bytes as stored, so packed 4-bit
codes count half a byte per number, 1-bit EMR masks an eighth, scales, gate, heads and small tensors
their float32 bytes. The reference is one float32 backbone of the bundle's architecture (no head).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch

from model_store.architecture import build_model
from model_store.bundle import Bundle
from model_store.schema import Architecture, StoredBytes


def tensor_bytes_in_file(path: Path) -> int:
    """Bytes of every tensor in a safetensors file, from its header's data offsets."""
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    entries = [v for k, v in header.items() if k != "__metadata__"]
    return sum(e["data_offsets"][1] - e["data_offsets"][0] for e in entries)


def one_model_fp32_bytes(architecture: Architecture) -> int:
    """Bytes of one float32 backbone of ``architecture`` (parameters and buffers, no head)."""
    with torch.device("meta"):
        model = build_model(architecture, 0)
    return 4 * sum(t.numel() for t in model.state_dict().values())


def stored_bytes(bundle: Bundle) -> StoredBytes:
    """Every tensor file of ``bundle`` (published, or a draft's preview) as stored, and the total as x one model."""
    suffix = ".safetensors"
    files = {
        name.removesuffix(suffix): tensor_bytes_in_file(bundle.path / name)
        for name in sorted(bundle.manifest.files)
        if name.endswith(suffix)
    }
    total = sum(files.values())
    one = one_model_fp32_bytes(Architecture.model_validate(bundle.json("model")["architecture"]))
    return StoredBytes(total=total, files=files, one_model_fp32=one, x_one_model=round(total / one, 6))
