"""Registry of merge methods: name -> function, typed parameters, data needs.

Adding a method is one function ``(MergeContext, params) -> MergeResult`` decorated
with :func:`register`. Like mergekit, callers look methods up by name and validate
user parameters against the method's pydantic model.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import nn

from merging.averaging import task_arithmetic, weight_average
from merging.dare import dare_views
from merging.emr import EMRMerged, emr_merge
from merging.fisher import estimate_fisher, fisher_merge
from merging.gate import GateConfig, gate_state, train_gate
from merging.gating import GatingPlan, expert_stacks, gating_plan
from merging.regmean import collect_grams, regmean
from merging.ties import ties_merge
from merging.types import StateDict, Tensors
from model_store.schema import Preprocessing


@dataclass
class MergeContext:
    """Everything a merge may use. Data-dependent methods need the two callables.

    ``build_model(i, backbone)`` returns task i's full model (its own head) with the
    given backbone tensors; ``calibration(i, prep, limit)`` returns the first ``limit``
    (None: all) of task i's UNLABELED calibration images, preprocessed with ``prep``
    (None: the task model's preprocessing); only those are decoded.
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


@dataclass
class GateArtifact:
    """A trained gate: weights, architecture and the preprocessing of its input."""

    state: StateDict
    arch: str
    preprocessing: Preprocessing
    holdout_accuracy: float
    epochs_run: int


@dataclass
class MergeResult:
    """What a merge produces (any combination the method needs).

    * ``backbone``: static weights (for gated merges: the non-gated tensors too);
    * ``emr``: EMR's unified task vector + per-task masks and rescalers;
    * ``experts``: ``(N, ...)`` stacks of gated tensors, ``plan`` says which;
    * ``gate``: the trained gate network;
    * ``heads``: per task (``ctx.tasks`` order), classifiers adapted to the merged
      features (methods that permute or re-mix features); None: the original heads.
    """

    backbone: StateDict | None = None
    emr: EMRMerged | None = None
    experts: StateDict | None = None
    plan: GatingPlan | None = None
    gate: GateArtifact | None = None
    heads: list[StateDict] | None = None
    info: dict[str, Any] = field(default_factory=dict)


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


REGISTRY: dict[str, MethodSpec] = {}


def register(name: str, params: type[Params], needs_calibration: bool, description: str, needs_shared_base: bool = False) -> Callable[[MergeFn], MergeFn]:
    """Decorator adding a merge method to :data:`REGISTRY`.

    ``needs_shared_base``: the method uses task vectors (or per-task copies of blocks
    whose neighbours are averaged) and is refused for models without a common base.
    """

    def deco(fn: MergeFn) -> MergeFn:
        if name in REGISTRY:
            raise ValueError(f"merge method '{name}' registered twice")
        REGISTRY[name] = MethodSpec(name, fn, params, needs_calibration, description, needs_shared_base)
        return fn

    return deco


def get_method(name: str) -> MethodSpec:
    if name not in REGISTRY:
        raise KeyError(f"unknown merge method '{name}'; valid methods: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name]


def parse_params(name: str, raw: dict[str, Any] | None) -> Params:
    """Validate user parameters; errors list the method's valid parameters."""
    spec = get_method(name)
    try:
        return spec.params.model_validate(raw or {})
    except ValidationError as e:
        valid = ", ".join(f"{k} (default {f.default!r})" for k, f in spec.params.model_fields.items()) or "none"
        problems = "; ".join(f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors())
        raise ValueError(f"invalid parameters for '{name}': {problems}. Valid parameters: {valid}") from e


def run_merge(name: str, ctx: MergeContext, params: dict[str, Any] | Params | None = None) -> MergeResult:
    """Run method ``name`` on ``ctx`` with validated ``params``."""
    spec = get_method(name)
    parsed = params if isinstance(params, Params) else parse_params(name, params)
    if spec.needs_calibration and (ctx.build_model is None or ctx.calibration is None):
        raise ValueError(f"merge method '{name}' needs calibration data and model builders")
    if spec.needs_shared_base and not ctx.shared_init:
        raise ValueError(refusal(name))
    result = spec.fn(ctx, parsed)
    result.info.setdefault("params", parsed.model_dump())
    return result


def refusal(name: str) -> str:
    """Why ``name`` cannot merge models that share no pretrained base."""
    usable = ", ".join(sorted(n for n, s in REGISTRY.items() if not s.needs_shared_base))
    return (f"merge method '{name}' needs task models fine-tuned from one shared pretrained base, but this zoo's models "
            f"were initialised differently (shared_init=false / different init seeds), so task vectors are meaningless; "
            f"use a method for differently-initialised models: {usable}")


# -- parameter models ------------------------------------------------------------------
class NoParams(Params):
    pass


class TaskArithmeticParams(Params):
    lam: float = Field(0.3, gt=0.0, le=2.0, description="scale of the summed task vectors")


class TiesParams(Params):
    k: float = Field(0.2, gt=0.0, le=1.0, description="fraction of each task vector kept by magnitude")
    lam: float = Field(1.0, gt=0.0, le=2.0, description="scale of the disjoint mean")


class DareTAParams(TaskArithmeticParams):
    p: float = Field(0.5, ge=0.0, lt=1.0, description="drop probability")
    seed: int = 0


class DareTiesParams(TiesParams):
    p: float = Field(0.5, ge=0.0, lt=1.0, description="drop probability")
    seed: int = 0


class RegMeanParams(Params):
    alpha: float = Field(0.9, ge=0.0, le=1.0, description="scale of Gram off-diagonals")
    max_images: int = Field(256, gt=0, description="calibration images per task")


class FisherParams(Params):
    max_images: int = Field(128, gt=0, description="calibration images per task")
    floor: float = Field(1e-12, gt=0.0)


class GateParams(Params):
    """Gate defaults chosen by measurement on the tiny zoo (BENCHMARKS.md, "Gate"):
    ImageNet-initialised EfficientNet-Lite0 at 64 px routed 99.5% of test images
    correctly vs 93.4% for MobileNetV2 from scratch (whose best lr was 1e-2)."""

    gate_arch: Literal["mobilenetv2_100", "efficientnet_lite0"] = Field("efficientnet_lite0", description="gate network")
    gate_size: int = Field(64, ge=16, le=512, description="gate input size in pixels")
    gate_epochs: int = Field(10, gt=0)
    gate_lr: float | None = Field(None, gt=0.0, description="default: 2e-3 pretrained, 1e-2 from scratch")
    gate_seed: int = 0
    gate_max_images: int = Field(1000, gt=0, description="calibration images per task for the gate")
    gate_test_images: int = Field(1000, ge=0, description="test images per task the routing accuracy is measured on after the merge (0: not measured)")


class GatingAvgParams(GateParams):
    m: int = Field(1, ge=0, description="attention and MLP blocks gated (lowest similarity first)")


class GatingRegMeanParams(GatingAvgParams):
    alpha: float = Field(0.9, ge=0.0, le=1.0)
    max_images: int = Field(256, gt=0)


#: Gate input normalisation (the offline EfficientNet-Lite0 weights expect mean = std = 0.5;
#: the scratch MobileNetV2 uses the same).
GATE_MEAN_STD = [0.5, 0.5, 0.5]


def train_gate_for(ctx: MergeContext, p: GateParams) -> GateArtifact:
    """Train the gate on every task's calibration images (labels = task index)."""
    assert ctx.calibration is not None
    prep = Preprocessing(size=p.gate_size, channels=3, mean=GATE_MEAN_STD, std=GATE_MEAN_STD)
    images = [ctx.calibration(i, prep, p.gate_max_images) for i in range(len(ctx.finetuned))]
    init = ctx.gate_init(p.gate_arch) if ctx.gate_init is not None else None
    lr = p.gate_lr if p.gate_lr is not None else (2e-3 if init is not None else 1e-2)
    cfg = GateConfig(arch=p.gate_arch, epochs=p.gate_epochs, lr=lr, seed=p.gate_seed)
    trained = train_gate(images, cfg, init, progress=ctx.progress)
    return GateArtifact(gate_state(trained.model), p.gate_arch, prep, trained.holdout_accuracy, trained.epochs_run)


# -- methods -----------------------------------------------------------------------------
@register("avg", NoParams, False, "AvgMean: mean of the fine-tuned weights")
def _avg(ctx: MergeContext, p: NoParams) -> MergeResult:
    return MergeResult(backbone=weight_average(ctx.finetuned))


@register("task_arithmetic", TaskArithmeticParams, False, "theta_0 + lam * sum of task vectors", needs_shared_base=True)
def _ta(ctx: MergeContext, p: TaskArithmeticParams) -> MergeResult:
    return MergeResult(backbone=task_arithmetic(ctx.pretrained, ctx.finetuned, p.lam))


@register("ties", TiesParams, False, "TIES: trim top-k, elect sign, disjoint mean", needs_shared_base=True)
def _ties(ctx: MergeContext, p: TiesParams) -> MergeResult:
    return MergeResult(backbone=ties_merge(ctx.pretrained, ctx.finetuned, p.k, p.lam))


@register("dare_ta", DareTAParams, False, "DARE drop/rescale, then Task Arithmetic", needs_shared_base=True)
def _dare_ta(ctx: MergeContext, p: DareTAParams) -> MergeResult:
    views = dare_views(ctx.pretrained, ctx.finetuned, p.p, p.seed)
    return MergeResult(backbone=task_arithmetic(ctx.pretrained, views, p.lam))


@register("dare_ties", DareTiesParams, False, "DARE drop/rescale, then TIES", needs_shared_base=True)
def _dare_ties(ctx: MergeContext, p: DareTiesParams) -> MergeResult:
    views = dare_views(ctx.pretrained, ctx.finetuned, p.p, p.seed)
    return MergeResult(backbone=ties_merge(ctx.pretrained, views, p.k, p.lam))


@register("regmean", RegMeanParams, True, "RegMean: closed-form least squares per linear layer")
def _regmean(ctx: MergeContext, p: RegMeanParams) -> MergeResult:
    assert ctx.build_model and ctx.calibration
    grams = [collect_grams(ctx.build_model(i, m), ctx.calibration(i, None, p.max_images)) for i, m in enumerate(ctx.finetuned)]
    return MergeResult(backbone=regmean(ctx.pretrained, ctx.finetuned, grams, p.alpha))


@register("fisher", FisherParams, True, "Fisher merging with a diagonal Fisher from the models' own predictions")
def _fisher(ctx: MergeContext, p: FisherParams) -> MergeResult:
    assert ctx.build_model and ctx.calibration
    fishers = [estimate_fisher(ctx.build_model(i, m), ctx.calibration(i, None, p.max_images)) for i, m in enumerate(ctx.finetuned)]
    return MergeResult(backbone=fisher_merge(ctx.finetuned, fishers, p.floor))


@register("emr", NoParams, False, "EMR-Merging: unified task vector + 1-bit masks + rescalers", needs_shared_base=True)
def _emr(ctx: MergeContext, p: NoParams) -> MergeResult:
    merged = emr_merge(ctx.pretrained, ctx.finetuned)
    return MergeResult(emr=merged, info={"rescalers": dict(zip(ctx.tasks, merged.rescalers))})


@register("emr_routed", GateParams, True, "EMR + a gate that picks the task (routed EMR, the server default)", needs_shared_base=True)
def _emr_routed(ctx: MergeContext, p: GateParams) -> MergeResult:
    merged = emr_merge(ctx.pretrained, ctx.finetuned)
    gate = train_gate_for(ctx, p)
    return MergeResult(emr=merged, gate=gate, info={"rescalers": dict(zip(ctx.tasks, merged.rescalers))})


def _gated(ctx: MergeContext, p: GatingAvgParams, static: StateDict) -> MergeResult:
    plan = gating_plan(ctx.finetuned, p.m)
    experts = expert_stacks(ctx.finetuned, plan.gated_keys)
    backbone = {k: v for k, v in static.items() if k not in experts}
    gate = train_gate_for(ctx, p)
    info = {"gated_attn_blocks": list(plan.attn_blocks), "gated_mlp_blocks": list(plan.mlp_blocks), "similarity": plan.similarity}
    return MergeResult(backbone=backbone, experts=experts, plan=plan, gate=gate, info=info)


@register("gating_avg", GatingAvgParams, True, "Gated whole-ViT merging, AvgMean for the non-gated blocks", needs_shared_base=True)
def _gating_avg(ctx: MergeContext, p: GatingAvgParams) -> MergeResult:
    return _gated(ctx, p, weight_average(ctx.finetuned))


@register("gating_regmean", GatingRegMeanParams, True, "Gated whole-ViT merging, RegMean for the non-gated blocks", needs_shared_base=True)
def _gating_regmean(ctx: MergeContext, p: GatingRegMeanParams) -> MergeResult:
    assert ctx.build_model and ctx.calibration
    grams = [collect_grams(ctx.build_model(i, m), ctx.calibration(i, None, p.max_images)) for i, m in enumerate(ctx.finetuned)]
    return _gated(ctx, p, regmean(ctx.pretrained, ctx.finetuned, grams, p.alpha))


# Methods for differently-initialised models (MuDSC, FS-Merge, distillation) register themselves.
import merging.diffinit_methods  # noqa: F401, E402 -- an import cycle issue 16 removes
