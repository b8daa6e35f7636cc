"""Merge methods: pure functions over state dicts (tensors in, tensors out).

Every function accepts any ``Mapping[str, Tensor]``; passing lazy mappings (e.g.
``model_store.lazy_tensors.LazySafetensors``) makes the data-free merges stream
tensor by tensor. Definitions follow shared/SPEC.md sections 1-3.
"""
from __future__ import annotations

import importlib
from typing import Any

from merging.averaging import task_arithmetic, weight_average
from merging.dare import dare, dare_views
from merging.emr import EMRMerged, emr_merge, pack_mask, unpack_mask
from merging.fisher import estimate_fisher, fisher_merge
from merging.regmean import collect_grams, regmean
from merging.similarity import layer_similarity, rank_blocks
from merging.ties import ties_merge

# The registry (and through it gate training) loads lazily (PEP 562): the server
# imports merging.emr on its load path without pulling in training code.
_LAZY = {"REGISTRY", "MergeContext", "MergeResult", "get_method", "parse_params", "register", "run_merge"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module("merging.registry"), name)
    raise AttributeError(f"module 'merging' has no attribute '{name}'")


__all__ = [
    "REGISTRY", "EMRMerged", "MergeContext", "MergeResult", "collect_grams", "dare", "dare_views", "emr_merge",
    "estimate_fisher", "fisher_merge", "get_method", "layer_similarity", "pack_mask", "parse_params", "rank_blocks",
    "register", "regmean", "run_merge", "task_arithmetic", "ties_merge", "unpack_mask", "weight_average",
]
