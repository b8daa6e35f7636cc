"""Merge methods: pure functions over state dicts (tensors in, tensors out).

Every function accepts any ``Mapping[str, Tensor]``; passing lazy mappings (e.g.
``model_store.lazy_tensors.LazySafetensors``) makes the data-free merges stream
tensor by tensor. The methods and their parameters are described in README.md ("Merging library");
the package imports only ``model_store``.
"""

from __future__ import annotations

import importlib
from typing import Any

from merging.methods.averaging import task_arithmetic, weight_average
from merging.methods.dare import dare, dare_views
from merging.methods.emr import EMRMerged, emr_merge, pack_mask, unpack_mask
from merging.methods.fisher import estimate_fisher, fisher_merge
from merging.methods.regmean import collect_grams, regmean
from merging.methods.similarity import layer_similarity, rank_blocks
from merging.methods.ties import ties_merge

# The method index (and through it gate training) loads on first use (PEP 562).
_LAZY = {
    "REGISTRY": "merging.method_index",
    "get_method": "merging.method_index",
    "parse_params": "merging.method_index",
    "run_merge": "merging.method_index",
    "MergeContext": "merging.registry",
    "MergeResult": "merging.registry",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'merging' has no attribute '{name}'")


__all__ = [
    "REGISTRY",
    "EMRMerged",
    "MergeContext",
    "MergeResult",
    "collect_grams",
    "dare",
    "dare_views",
    "emr_merge",
    "estimate_fisher",
    "fisher_merge",
    "get_method",
    "layer_similarity",
    "pack_mask",
    "parse_params",
    "rank_blocks",
    "regmean",
    "run_merge",
    "task_arithmetic",
    "ties_merge",
    "unpack_mask",
    "weight_average",
]
