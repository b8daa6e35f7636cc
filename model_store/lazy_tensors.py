"""A read-only, lazy ``Mapping[str, Tensor]`` over one safetensors file.

Each access memory-maps the file, copies out one tensor and unmaps it again, so a
merge that walks N of these key by key holds about one tensor per model at a time
(instead of N whole models) -- the basis of the streaming data-free merges.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from safetensors import safe_open


class LazySafetensors(Mapping[str, torch.Tensor]):
    """Tensors of ``path`` read on access; keys and shapes come from the header."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        with safe_open(self.path, framework="pt") as f:
            self._shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._shapes:
            raise KeyError(key)
        with safe_open(self.path, framework="pt") as f:
            return f.get_tensor(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._shapes)

    def __len__(self) -> int:
        return len(self._shapes)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._shapes[key]

    def numel(self) -> int:
        """Total number of elements (from the header; no data read)."""
        total = 0
        for shape in self._shapes.values():
            n = 1
            for d in shape:
                n *= d
            total += n
        return total
