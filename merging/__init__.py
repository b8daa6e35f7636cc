"""Merge methods: pure functions over state dicts (tensors in, tensors out).

Every function accepts any ``Mapping[str, Tensor]``; passing lazy mappings (e.g.
``model_store.lazy_tensors.LazySafetensors``) makes the data-free merges stream
tensor by tensor. Definitions follow shared/SPEC.md sections 1-3.
"""
from __future__ import annotations

import importlib
from typing import Any

# Lazy re-exports (PEP 562): ``import merging.emr`` from the server must not pull in
# the registry, gate training or calibration code.
_EXPORTS = {
    "task_arithmetic": "averaging", "weight_average": "averaging", "dare": "dare", "dare_views": "dare",
    "EMRMerged": "emr", "emr_merge": "emr", "pack_mask": "emr", "unpack_mask": "emr",
    "estimate_fisher": "fisher", "fisher_merge": "fisher", "REGISTRY": "registry", "MergeContext": "registry",
    "MergeResult": "registry", "get_method": "registry", "parse_params": "registry", "register": "registry",
    "run_merge": "registry", "collect_grams": "regmean", "regmean": "regmean", "layer_similarity": "similarity",
    "rank_blocks": "similarity", "ties_merge": "ties",
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"merging.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'merging' has no attribute '{name}'")


__all__ = [
    "REGISTRY", "EMRMerged", "MergeContext", "MergeResult", "collect_grams", "dare", "dare_views", "emr_merge",
    "estimate_fisher", "fisher_merge", "get_method", "layer_similarity", "pack_mask", "parse_params", "rank_blocks",
    "register", "regmean", "run_merge", "task_arithmetic", "ties_merge", "unpack_mask", "weight_average",
]
