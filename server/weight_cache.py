"""An LRU cache of materialised per-task weights under a byte budget."""
from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable

import torch

Weights = dict[str, torch.Tensor]


def weights_nbytes(weights: Weights) -> int:
    return sum(t.numel() * t.element_size() for t in weights.values())


class WeightCache:
    """``get(key, build)`` returns cached weights or builds them; evicts least-recently used.

    An entry larger than the whole budget is built, returned and not kept, so a
    budget of 0 rebuilds every time.
    """

    def __init__(self, budget_bytes: int, on_lookup: Callable[[bool], None] | None = None):
        self.budget = budget_bytes
        self._items: OrderedDict[str, tuple[Weights, int]] = OrderedDict()
        self._lock = threading.Lock()
        self._on_lookup = on_lookup
        self.hits = self.misses = 0

    @property
    def nbytes(self) -> int:
        return sum(size for _, size in self._items.values())

    def keys(self) -> list[str]:
        return list(self._items)

    def get(self, key: str, build: Callable[[], Weights]) -> Weights:
        with self._lock:
            item = self._items.get(key)
            if item is not None:
                self._items.move_to_end(key)
                self.hits += 1
        if item is not None:
            self._notify(True)
            return item[0]
        weights = build()
        size = weights_nbytes(weights)
        with self._lock:
            self.misses += 1
            if size <= self.budget:
                self._items[key] = (weights, size)
                while self.nbytes > self.budget:
                    self._items.popitem(last=False)
        self._notify(False)
        return weights

    def clear(self) -> None:
        with self._lock:
            self._items.clear()

    def _notify(self, hit: bool) -> None:
        if self._on_lookup is not None:
            self._on_lookup(hit)
