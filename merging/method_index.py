"""The index of every merge method: the catalogs, one registry, and lookups over it.

``REGISTRY`` maps names to :class:`~merging.registry.MethodSpec`; the functions below are
its methods, for callers that only need one.
"""

from __future__ import annotations

from merging.different_init.different_init_methods import CATALOG as DIFFERENT_INIT
from merging.gating.gated_methods import CATALOG as GATED
from merging.methods.shared_base_methods import CATALOG as SHARED_BASE
from merging.registry import Registry

REGISTRY = Registry(SHARED_BASE, GATED, DIFFERENT_INIT)
get_method = REGISTRY.get_method
parse_params = REGISTRY.parse_params
run_merge = REGISTRY.run_merge
refusal = REGISTRY.refusal
