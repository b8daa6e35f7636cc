"""An LRU cache of materialised per-task weights under a byte budget."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

Weights = dict[str, torch.Tensor]


def weights_nbytes(weights: Weights) -> int:
    return sum(t.numel() * t.element_size() for t in weights.values())


def nbytes(value: Any) -> int:
    """Bytes of a weights dict or of a module's parameters and buffers (shared storage counted once)."""
    tensors = value.state_dict().values() if isinstance(value, nn.Module) else value.values()
    seen, total = set(), 0
    for t in tensors:
        storage = t.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


class WeightCache:
    """``get(key, build)`` returns a cached value (weights or a module) or builds it; evicts least-recently used.

    An entry larger than the whole budget is built, returned and not kept, so a
    budget of 0 rebuilds every time.
    """

    def __init__(self, budget_bytes: int, on_lookup: Callable[[bool], None] | None = None):
        self.budget = budget_bytes
        self._items: OrderedDict[str, tuple[Any, int]] = OrderedDict()
        self._lock = threading.Lock()
        self._on_lookup = on_lookup
        self.hits = self.misses = 0

    @property
    def nbytes(self) -> int:
        return sum(size for _, size in self._items.values())

    def keys(self) -> list[str]:
        return list(self._items)

    def get(self, key: str, build: Callable[[], Any]) -> Any:
        with self._lock:
            item = self._items.get(key)
            if item is not None:
                self._items.move_to_end(key)
                self.hits += 1
        if item is not None:
            self._notify(True)
            return item[0]
        value = build()
        size = nbytes(value)
        with self._lock:
            self.misses += 1
            if size <= self.budget:
                self._items[key] = (value, size)
                while self.nbytes > self.budget:
                    self._items.popitem(last=False)
        self._notify(False)
        return value

    def record_miss(self) -> None:
        """Count a lookup the caller served without the cache (value larger than the budget)."""
        with self._lock:
            self.misses += 1
        self._notify(False)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()

    def _notify(self, hit: bool) -> None:
        if self._on_lookup is not None:
            self._on_lookup(hit)
