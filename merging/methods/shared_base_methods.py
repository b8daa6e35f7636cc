"""Catalog of the merges of models that share a pretrained base, without a gate (SPEC sections 1-2, 7).

AvgMean, Task Arithmetic, TIES, DARE (+TA / +TIES), RegMean, Fisher, EMR, TSV-C and TSV-M.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from pydantic import Field

from merging.methods.averaging import task_arithmetic, weight_average
from merging.methods.dare import dare_views
from merging.methods.emr import emr_merge
from merging.methods.fisher import estimate_fisher, fisher_merge
from merging.methods.regmean import collect_grams, regmean
from merging.methods.ties import ties_merge
from merging.methods.tsv import LowRankDeltas, exact_lowrank, tsv_compress, tsv_merge
from merging.registry import Catalog, MergeContext, MergeResult, NoParams, Params
from model_store.quantize import Bits
from model_store.schema import MergeInfo

CATALOG = Catalog()


# -- parameter models ------------------------------------------------------------------
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


# -- methods -----------------------------------------------------------------------------
@CATALOG.register("avg", NoParams, False, "AvgMean: mean of the fine-tuned weights")
def _avg(ctx: MergeContext, p: NoParams) -> MergeResult:
    return MergeResult(backbone=weight_average(ctx.finetuned))


@CATALOG.register(
    "task_arithmetic", TaskArithmeticParams, False, "theta_0 + lam * sum of task vectors", needs_shared_base=True
)
def _ta(ctx: MergeContext, p: TaskArithmeticParams) -> MergeResult:
    return MergeResult(backbone=task_arithmetic(ctx.pretrained, ctx.finetuned, p.lam))


@CATALOG.register("ties", TiesParams, False, "TIES: trim top-k, elect sign, disjoint mean", needs_shared_base=True)
def _ties(ctx: MergeContext, p: TiesParams) -> MergeResult:
    return MergeResult(backbone=ties_merge(ctx.pretrained, ctx.finetuned, p.k, p.lam))


@CATALOG.register("dare_ta", DareTAParams, False, "DARE drop/rescale, then Task Arithmetic", needs_shared_base=True)
def _dare_ta(ctx: MergeContext, p: DareTAParams) -> MergeResult:
    views = dare_views(ctx.pretrained, ctx.finetuned, p.p, p.seed)
    return MergeResult(backbone=task_arithmetic(ctx.pretrained, views, p.lam))


@CATALOG.register("dare_ties", DareTiesParams, False, "DARE drop/rescale, then TIES", needs_shared_base=True)
def _dare_ties(ctx: MergeContext, p: DareTiesParams) -> MergeResult:
    views = dare_views(ctx.pretrained, ctx.finetuned, p.p, p.seed)
    return MergeResult(backbone=ties_merge(ctx.pretrained, views, p.k, p.lam))


def task_grams(ctx: MergeContext, max_images: int) -> list[dict[str, torch.Tensor]]:
    """Every task model's RegMean Gram matrices on its first ``max_images`` calibration images (``ctx.cache``
    keeps them: RegMean and gated RegMean at every ``m`` read the same ones)."""
    assert ctx.build_model and ctx.calibration
    out = []
    for i, (task, weights) in enumerate(zip(ctx.tasks, ctx.finetuned)):
        key = (task, max_images)
        if ctx.cache is not None and key in ctx.cache.grams:
            out.append(ctx.cache.grams[key])
            continue
        grams = collect_grams(ctx.build_model(i, weights), ctx.calibration(i, None, max_images))
        if ctx.cache is not None:
            ctx.cache.grams[key] = grams
        out.append(grams)
    return out


@CATALOG.register("regmean", RegMeanParams, True, "RegMean: closed-form least squares per linear layer")
def _regmean(ctx: MergeContext, p: RegMeanParams) -> MergeResult:
    return MergeResult(backbone=regmean(ctx.pretrained, ctx.finetuned, task_grams(ctx, p.max_images), p.alpha))


@CATALOG.register(
    "fisher", FisherParams, True, "Fisher merging with a diagonal Fisher from the models' own predictions"
)
def _fisher(ctx: MergeContext, p: FisherParams) -> MergeResult:
    assert ctx.build_model and ctx.calibration
    fishers = [
        estimate_fisher(ctx.build_model(i, m), ctx.calibration(i, None, p.max_images))
        for i, m in enumerate(ctx.finetuned)
    ]
    return MergeResult(backbone=fisher_merge(ctx.finetuned, fishers, p.floor))


@CATALOG.register(
    "emr", NoParams, False, "EMR-Merging: unified task vector + 1-bit masks + rescalers", needs_shared_base=True
)
def _emr(ctx: MergeContext, p: NoParams) -> MergeResult:
    merged = emr_merge(ctx.pretrained, ctx.finetuned)
    return MergeResult(emr=merged, info=MergeInfo(rescalers=dict(zip(ctx.tasks, merged.rescalers))))


class LowRankBitsParams(Params):
    bits: Bits = Field(
        32, description="stored width of the factors: 32 (float32), 8 or 4 (per-row symmetric, SPEC section 9)"
    )


class TSVCParams(LowRankBitsParams):
    f: float | None = Field(None, gt=0.0, le=1.0, description="rank fraction per layer (default 1/N, the paper's)")
    conv: bool = Field(
        False,
        description="also compress the patch-embedding conv as an out x (in k k) matrix (default: a per-task small "
        "tensor, as the paper)",
    )


class TSVMParams(Params):
    alpha: float = Field(1.0, gt=0.0, le=2.0, description="scale of the merged task matrices")


def tsv_c_result(ctx: MergeContext, f: float | None, conv: bool = False, bits: Bits = 32) -> MergeResult:
    """TSV-C's low-rank deltas at ``f`` (None: ``1/N``, the paper's choice); ``conv``: the patch conv too;
    stored at ``bits``. The SVDs run once per context: a smaller ``f`` truncates the factors of the largest
    ``f`` computed so far (``ctx.memo``; a grid visits its largest ``f`` first)."""
    f = f if f is not None else 1.0 / len(ctx.finetuned)
    key = ("tsv_c", conv)
    cached: LowRankDeltas | None = ctx.memo.get(key)
    if cached is not None and cached.rank_fraction is not None and f <= cached.rank_fraction:
        deltas = cached if f == cached.rank_fraction else cached.truncated(f)
    else:
        deltas = ctx.memo[key] = tsv_compress(ctx.pretrained, ctx.finetuned, f, conv)
    return MergeResult(lowrank=replace(deltas, bits=bits), info=MergeInfo(rank_fraction=deltas.rank_fraction))


@CATALOG.register(
    "tsv_c",
    TSVCParams,
    False,
    "TSV-C: per-task top-r SVD factors of every layer's task matrix (task id given; low-rank bundle)",
    needs_shared_base=True,
)
def _tsv_c(ctx: MergeContext, p: TSVCParams) -> MergeResult:
    return tsv_c_result(ctx, p.f, p.conv, p.bits)


class LoRAParams(LowRankBitsParams):
    max_fraction: float = Field(
        0.5, gt=0.0, le=1.0, description="refuse a layer whose task matrix has a higher rank than this x min(m, n)"
    )


def lora_result(ctx: MergeContext, max_fraction: float, bits: Bits = 32) -> MergeResult:
    """Exact low-rank deltas (each layer at its numerical rank), stored at ``bits``; a full-rank task matrix is
    a clear error. The SVDs run once per context (``ctx.memo``)."""
    key = ("lora", max_fraction)
    if key not in ctx.memo:
        ctx.memo[key] = exact_lowrank(ctx.pretrained, ctx.finetuned, max_fraction, names=ctx.tasks)
    deltas: LowRankDeltas = ctx.memo[key]
    return MergeResult(lowrank=replace(deltas, bits=bits), info=MergeInfo(ranks=sorted(set(deltas.ranks.values()))))


@CATALOG.register(
    "lora",
    LoRAParams,
    False,
    "LoRA-tuned zoos: every layer's exact low-rank task deltas (its numerical rank, no truncation; task id given; "
    "low-rank bundle)",
    needs_shared_base=True,
)
def _lora(ctx: MergeContext, p: LoRAParams) -> MergeResult:
    return lora_result(ctx, p.max_fraction, p.bits)


@CATALOG.register(
    "tsv_m",
    TSVMParams,
    False,
    "TSV-M: per-layer task singular vectors, orthogonalised and summed",
    needs_shared_base=True,
)
def _tsv_m(ctx: MergeContext, p: TSVMParams) -> MergeResult:
    return MergeResult(backbone=tsv_merge(ctx.pretrained, ctx.finetuned, p.alpha))
