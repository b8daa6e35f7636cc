"""Catalog of the methods that route with a gate: routed EMR and gated whole-ViT merging (SPEC sections 3-4)."""

from __future__ import annotations

from pydantic import Field

from merging.gating.plan import expert_stacks, gating_plan
from merging.gating.router import GateParams, train_gate_for
from merging.methods.averaging import weight_average
from merging.methods.emr import emr_merge
from merging.methods.regmean import regmean
from merging.methods.shared_base_methods import LoRAParams, TSVCParams, lora_result, task_grams, tsv_c_result
from merging.registry import Catalog, MergeContext, MergeResult
from merging.types import StateDict
from model_store.schema import MergeInfo

CATALOG = Catalog()


class GatingAvgParams(GateParams):
    m: int = Field(1, ge=0, description="attention and MLP blocks gated (lowest similarity first)")


class GatingRegMeanParams(GatingAvgParams):
    alpha: float = Field(0.9, ge=0.0, le=1.0)
    max_images: int = Field(256, gt=0)


@CATALOG.register(
    "emr_routed",
    GateParams,
    True,
    "EMR + a gate that picks the task (routed EMR, the server default)",
    needs_shared_base=True,
)
def _emr_routed(ctx: MergeContext, p: GateParams) -> MergeResult:
    merged = emr_merge(ctx.pretrained, ctx.finetuned)
    gate = train_gate_for(ctx, p)
    return MergeResult(emr=merged, gate=gate, info=MergeInfo(rescalers=dict(zip(ctx.tasks, merged.rescalers))))


def _gated(ctx: MergeContext, p: GatingAvgParams, static: StateDict) -> MergeResult:
    plan = gating_plan(ctx.finetuned, p.m)
    experts = expert_stacks(ctx.finetuned, plan.gated_keys)
    backbone = {k: v for k, v in static.items() if k not in experts}
    gate = train_gate_for(ctx, p)
    info = MergeInfo(
        gated_attn_blocks=list(plan.attn_blocks), gated_mlp_blocks=list(plan.mlp_blocks), similarity=plan.similarity
    )
    return MergeResult(backbone=backbone, experts=experts, plan=plan, gate=gate, info=info)


@CATALOG.register(
    "gating_avg",
    GatingAvgParams,
    True,
    "Gated whole-ViT merging, AvgMean for the non-gated blocks",
    needs_shared_base=True,
)
def _gating_avg(ctx: MergeContext, p: GatingAvgParams) -> MergeResult:
    return _gated(ctx, p, weight_average(ctx.finetuned))


@CATALOG.register(
    "gating_regmean",
    GatingRegMeanParams,
    True,
    "Gated whole-ViT merging, RegMean for the non-gated blocks",
    needs_shared_base=True,
)
def _gating_regmean(ctx: MergeContext, p: GatingRegMeanParams) -> MergeResult:
    return _gated(ctx, p, regmean(ctx.pretrained, ctx.finetuned, task_grams(ctx, p.max_images), p.alpha))


class TSVRoutedParams(GateParams, TSVCParams):
    """TSV-C's rank fraction ``f`` and the gate's parameters."""


@CATALOG.register(
    "tsv_routed",
    TSVRoutedParams,
    True,
    "TSV-C low-rank task deltas + a gate that picks the task; served in one pass per mixed batch",
    needs_shared_base=True,
)
def _tsv_routed(ctx: MergeContext, p: TSVRoutedParams) -> MergeResult:
    result = tsv_c_result(ctx, p.f, p.conv, p.bits)
    result.gate = train_gate_for(ctx, p)
    return result


class LoRARoutedParams(GateParams, LoRAParams):
    """The exact low-rank deltas' rank limit and the gate's parameters."""


@CATALOG.register(
    "lora_routed",
    LoRARoutedParams,
    True,
    "LoRA-tuned zoos: exact low-rank task deltas + a gate that picks the task; served in one pass per mixed batch",
    needs_shared_base=True,
)
def _lora_routed(ctx: MergeContext, p: LoRARoutedParams) -> MergeResult:
    result = lora_result(ctx, p.max_fraction, p.bits)
    result.gate = train_gate_for(ctx, p)
    return result
