"""The merge-method mechanism: context, result, typed parameters, method specs and catalogs.

A method is one pure function ``(MergeContext, params) -> MergeResult`` registered in a
:class:`Catalog` with its pydantic parameter model and data needs. The catalog modules
``merging.methods.shared_base_methods``, ``merging.gating.gated_methods`` and
``merging.different_init.different_init_methods`` fill their catalogs; :mod:`merging.method_index`
is the one index callers look methods up in. This module holds no methods and no global state.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, ValidationError
from torch import nn

from merging.gating.plan import GatingPlan
from merging.methods.emr import EMRMerged
from merging.methods.tsv import LowRankDeltas
from merging.types import StateDict, Tensors
from model_store.schema import MergeInfo, Preprocessing


@dataclass
class GateArtifact:
    """A trained gate: weights, architecture and the preprocessing of its input."""

    state: StateDict
    arch: str
    preprocessing: Preprocessing
    holdout_accuracy: float
    epochs_run: int
    train_seconds: float = 0.0


@dataclass
class MergeCache:
    """Work that merges of one session on ONE zoo share (the accuracy benchmark runs dozens): trained gates
    and RegMean Gram matrices. Each is a deterministic function of its key (seeded training on the same
    images), so a cached value is what recomputing it would give."""

    #: ``(tasks, gate parameters)`` -> the gate trained on those tasks' calibration images
    gates: dict[tuple[Any, ...], GateArtifact] = field(default_factory=dict)
    #: ``(task, images)`` -> the task model's Gram matrices on its first ``images`` calibration images
    grams: dict[tuple[str, int], dict[str, torch.Tensor]] = field(default_factory=dict)


@dataclass
class MergeContext:
    """Everything a merge may use. Data-dependent methods need the two callables.

    ``build_model(i, backbone)`` returns task i's full model (its own head) with the
    given backbone tensors; ``calibration(i, prep, limit)`` returns the first ``limit``
    (None: all) of task i's UNLABELED calibration images, preprocessed with ``prep``
    (None: the task model's preprocessing); only those are decoded.

    ``memo``: work a method may reuse when the same context merges again with other parameters (a grid
    of candidates: the gate for the same gate parameters when no ``cache`` is shared, TSV's factors at the
    largest rank asked so far).
    """

    pretrained: Tensors
    finetuned: Sequence[Tensors]
    tasks: Sequence[str]
    build_model: Callable[[int, Tensors], nn.Module] | None = None
    calibration: Callable[[int, Preprocessing | None, int | None], torch.Tensor] | None = None
    gate_init: Callable[[str], StateDict | None] | None = None
    progress: bool = False
    heads: Sequence[Tensors] | None = None  # task i's classifier (methods that re-order features adapt it)
    shared_init: bool = True  # False: the models share no pretrained base (task vectors are meaningless)
    cache: MergeCache | None = None  # gates and Gram matrices shared with other merges of the same zoo
    memo: dict[Any, Any] = field(default_factory=dict)


@dataclass
class MergeResult:
    """What a merge produces (any combination the method needs).

    * ``backbone``: static weights (for gated merges: the non-gated tensors too);
    * ``emr``: EMR's unified task vector + per-task masks and rescalers;
    * ``lowrank``: per-task low-rank factors of every matrix layer + small tensors (TSV-C);
    * ``experts``: ``(N, ...)`` stacks of gated tensors, ``plan`` says which;
    * ``gate``: the trained gate network;
    * ``heads``: per task (``ctx.tasks`` order), classifiers adapted to the merged
      features (methods that permute or re-mix features); None: the original heads.
    """

    backbone: StateDict | None = None
    emr: EMRMerged | None = None
    lowrank: LowRankDeltas | None = None
    experts: StateDict | None = None
    plan: GatingPlan | None = None
    gate: GateArtifact | None = None
    heads: list[StateDict] | None = None
    info: MergeInfo = field(default_factory=MergeInfo)


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


MergeFn = Callable[[MergeContext, Any], MergeResult]


@dataclass(frozen=True)
class MethodSpec:
    name: str
    fn: MergeFn
    params: type[Params]
    needs_calibration: bool
    description: str
    needs_shared_base: bool = False


class NoParams(Params):
    pass


class Catalog:
    """A group of merge methods; ``@catalog.register(...)`` adds one."""

    def __init__(self) -> None:
        self.methods: dict[str, MethodSpec] = {}

    def register(
        self,
        name: str,
        params: type[Params],
        needs_calibration: bool,
        description: str,
        needs_shared_base: bool = False,
    ) -> Callable[[MergeFn], MergeFn]:
        """Decorator adding method ``name``.

        ``needs_shared_base``: the method uses task vectors (or per-task copies of blocks
        whose neighbours are averaged) and is refused for models without a common base.
        """

        def deco(fn: MergeFn) -> MergeFn:
            if name in self.methods:
                raise ValueError(f"merge method '{name}' registered twice")
            self.methods[name] = MethodSpec(name, fn, params, needs_calibration, description, needs_shared_base)
            return fn

        return deco


class Registry(Mapping[str, MethodSpec]):
    """Every method of some catalogs, by name: lookup, parameter validation and running."""

    def __init__(self, *catalogs: Catalog) -> None:
        self._methods: dict[str, MethodSpec] = {}
        for catalog in catalogs:
            for name, spec in catalog.methods.items():
                if name in self._methods:
                    raise ValueError(f"merge method '{name}' is in two catalogs")
                self._methods[name] = spec

    def __getitem__(self, name: str) -> MethodSpec:
        return self._methods[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._methods)

    def __len__(self) -> int:
        return len(self._methods)

    def get_method(self, name: str) -> MethodSpec:
        if name not in self._methods:
            raise KeyError(f"unknown merge method '{name}'; valid methods: {', '.join(sorted(self._methods))}")
        return self._methods[name]

    def parse_params(self, name: str, raw: dict[str, Any] | None) -> Params:
        """Validate user parameters; errors list the method's valid parameters."""
        spec = self.get_method(name)
        try:
            return spec.params.model_validate(raw or {})
        except ValidationError as e:
            valid = ", ".join(f"{k} (default {f.default!r})" for k, f in spec.params.model_fields.items()) or "none"
            problems = "; ".join(f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors())
            raise ValueError(f"invalid parameters for '{name}': {problems}. Valid parameters: {valid}") from e

    def run_merge(self, name: str, ctx: MergeContext, params: dict[str, Any] | Params | None = None) -> MergeResult:
        """Run method ``name`` on ``ctx`` with validated ``params``."""
        spec = self.get_method(name)
        parsed = params if isinstance(params, Params) else self.parse_params(name, params)
        if spec.needs_calibration and (ctx.build_model is None or ctx.calibration is None):
            raise ValueError(f"merge method '{name}' needs calibration data and model builders")
        if spec.needs_shared_base and not ctx.shared_init:
            raise ValueError(self.refusal(name))
        return spec.fn(ctx, parsed)

    def refusal(self, name: str) -> str:
        """Why ``name`` cannot merge models that share no pretrained base."""
        usable = ", ".join(sorted(n for n, s in self._methods.items() if not s.needs_shared_base))
        return (
            f"merge method '{name}' needs task models fine-tuned from one shared pretrained base, but this zoo's "
            f"models were initialised differently (shared_init=false / different init seeds), so task vectors are "
            f"meaningless; use a method for differently-initialised models: {usable}"
        )
