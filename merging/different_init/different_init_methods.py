"""Registry entries for models WITHOUT a shared base (issue 8; SPEC section 5).

``mudsc_align`` / ``mudsc_zip`` (training-free unit matching), ``fs_merge`` /
``fs_merge_seq`` (Foldable SuperNet) and ``distill`` (the knowledge-distillation
baseline on the same data and budget as FS-Merge). Each returns ONE backbone of
the original width plus every task's classifier adapted to the merged features,
and (``gate=true``, the default) a task gate, so the bundle is an ordinary static
bundle the server routes with the gate.
"""

from __future__ import annotations

import time

import torch
from pydantic import Field

from merging.different_init.feature_data import FeatureSet, FitConfig, build_feature_set
from merging.different_init.fs_merge import FoldedMerge, distill, fold_head, fs_merge, fs_merge_seq
from merging.different_init.mudsc import Mode, collect_activations, mudsc_merge
from merging.different_init.permutation import ViTShape
from merging.gating.router import GateParams, train_gate_for
from merging.registry import Catalog, MergeContext, MergeResult
from merging.types import StateDict
from model_store.architecture import PROJECTION_KEY
from model_store.schema import MergeInfo

CATALOG = Catalog()


class GatedParams(GateParams):
    gate: bool = Field(True, description="also train the task gate (routing without a given task)")


class MuDSCParams(GatedParams):
    alpha: float = Field(
        0.5, ge=0.0, le=1.0, description="weight of the weight-space similarity (1 - alpha: activations)"
    )
    max_sweeps: int = Field(
        10, ge=0, le=100, description="Alg. 1 sweeps over all groups at most (stops when no matching changes)"
    )
    max_images: int = Field(64, gt=0, description="calibration images per task for the activations")
    seed: int = Field(0, description="order of the groups in every sweep")


class TrainedParams(GatedParams):
    images: int = Field(16, gt=0, description="original (unlabeled calibration) images per task")
    augment: int = Field(50, ge=0, description="augmented copies of every original image")
    epochs: int = Field(20, gt=0, description="passes over originals + augmentations")
    lr: float = Field(1e-3, gt=0.0)
    batch_size: int = Field(64, gt=0)
    weight_decay: float = Field(1e-3, ge=0.0)
    seed: int = 0


class FSMergeParams(TrainedParams):
    rank: int = Field(8, ge=0, description="rank of the low-rank term of every merge/unmerge matrix")


class DistillParams(TrainedParams):
    lr: float = Field(1e-4, gt=0.0)


def check_plain_vit(ctx: MergeContext, method: str, plain: bool = True) -> None:
    """ValueError naming what ``method`` cannot merge, before any work.

    Every method here maps each model's features (its pre-logits) onto the residual stream, so a
    CLIP tower's projection is refused; ``plain`` (unit matching, the FS-Merge fold) also refuses a
    pre-norm (``norm_pre``) and a patch embedding without bias, which they do not match or fold.
    """
    keys = set(ctx.finetuned[0])  # names only: no tensor is read
    found = [f"'{PROJECTION_KEY}'"] if PROJECTION_KEY in keys else []
    if plain and "norm_pre.weight" in keys:
        found.append("'norm_pre.weight'")
    if plain and "patch_embed.proj.weight" in keys and "patch_embed.proj.bias" not in keys:
        found.append("no 'patch_embed.proj.bias'")
    if found:
        raise ValueError(
            f"{method} merges plain timm ViTs; these models have {', '.join(found)} (as CLIP towers do): "
            "fine-tunes of one pretrained CLIP tower share a base, merge them with a task-vector method "
            "(e.g. emr, tsv_c, ties)"
        )


def _states(ctx: MergeContext) -> list[StateDict]:
    return [{k: v.float() for k, v in m.items()} for m in ctx.finetuned]


def _heads(ctx: MergeContext, states: list[StateDict]) -> list[StateDict]:
    """Every task's classifier (from the context, else from the built models)."""
    if ctx.heads is not None:
        return [dict(h) for h in ctx.heads]
    assert ctx.build_model is not None
    return [
        {k: v for k, v in ctx.build_model(i, s).state_dict().items() if k.startswith("head.")}
        for i, s in enumerate(states)
    ]


def _result(
    ctx: MergeContext, p: GatedParams, backbone: StateDict, heads: list[StateDict], info: MergeInfo
) -> MergeResult:
    gate = train_gate_for(ctx, p) if p.gate else None
    return MergeResult(backbone=backbone, heads=heads, gate=gate, info=info)


def _mudsc(ctx: MergeContext, p: MuDSCParams, mode: Mode) -> MergeResult:
    assert ctx.build_model and ctx.calibration
    check_plain_vit(ctx, f"mudsc_{mode}")
    start = time.perf_counter()
    states = _states(ctx)
    models = [ctx.build_model(i, s) for i, s in enumerate(states)]
    shape = ViTShape.from_state(states[0], models[0].blocks[0].attn.num_heads)  # type: ignore[index,union-attr]
    images = torch.cat([ctx.calibration(i, None, p.max_images) for i in range(len(states))])
    acts = [collect_activations(m, images, shape) for m in models]
    res = mudsc_merge(states, acts, shape, _heads(ctx, states), p.alpha, mode, p.max_sweeps, p.seed)
    info = MergeInfo(
        sweeps=res.sweeps,
        converged=res.converged,
        merge_seconds=round(time.perf_counter() - start, 3),
        optimised_parameters=0,
    )
    return _result(ctx, p, res.merged, res.heads, info)


@CATALOG.register(
    "mudsc_align",
    MuDSCParams,
    True,
    "MuDSC Align: dual-space unit matching onto the first model, then averaging (different inits)",
)
def _mudsc_align(ctx: MergeContext, p: MuDSCParams) -> MergeResult:
    return _mudsc(ctx, p, "align")


@CATALOG.register(
    "mudsc_zip",
    MuDSCParams,
    True,
    "MuDSC Zip: dual-space matching, models zipped pairwise with greedy matching (different inits)",
)
def _mudsc_zip(ctx: MergeContext, p: MuDSCParams) -> MergeResult:
    return _mudsc(ctx, p, "zip")


def _feature_data(ctx: MergeContext, p: TrainedParams, states: list[StateDict]) -> FeatureSet:
    assert ctx.build_model and ctx.calibration
    models = [ctx.build_model(i, s) for i, s in enumerate(states)]
    images = [ctx.calibration(i, None, p.images) for i in range(len(states))]
    return build_feature_set(models, images, p.augment, p.seed)


def _trained(ctx: MergeContext, p: TrainedParams, run, method: str) -> MergeResult:
    assert ctx.build_model
    check_plain_vit(ctx, method, plain=method != "distill")
    start = time.perf_counter()
    states = _states(ctx)
    data = _feature_data(ctx, p, states)
    cfg = FitConfig(epochs=p.epochs, lr=p.lr, batch_size=p.batch_size, weight_decay=p.weight_decay, seed=p.seed)
    out: FoldedMerge = run(states, ctx.build_model(0, states[0]), data, cfg)
    heads = [fold_head(h, a) for h, a in zip(_heads(ctx, states), out.adapters)]
    info = MergeInfo(
        merge_seconds=round(time.perf_counter() - start, 3),
        optimised_parameters=out.optimised_parameters,
        training_images=len(data),
        final_loss=out.history[-1] if out.history else None,
    )
    return _result(ctx, p, out.backbone, heads, info)


@CATALOG.register(
    "fs_merge",
    FSMergeParams,
    True,
    "FS-Merge: Foldable SuperNet trained on a few unlabeled images, folded (different inits)",
)
def _fs_merge(ctx: MergeContext, p: FSMergeParams) -> MergeResult:
    return _trained(ctx, p, lambda s, t, d, c: fs_merge(s, t, d, p.rank, c, ctx.progress), "fs_merge")


@CATALOG.register(
    "fs_merge_seq", FSMergeParams, True, "FS-Merge seq.: merges the models one at a time (less memory; different inits)"
)
def _fs_merge_seq(ctx: MergeContext, p: FSMergeParams) -> MergeResult:
    return _trained(ctx, p, lambda s, t, d, c: fs_merge_seq(s, t, d, p.rank, c, ctx.progress), "fs_merge_seq")


@CATALOG.register(
    "distill",
    DistillParams,
    True,
    "Distillation into the first model's weights, same data/budget as FS-Merge (baseline)",
)
def _distill(ctx: MergeContext, p: DistillParams) -> MergeResult:
    return _trained(ctx, p, lambda s, t, d, c: distill(s[0], t, d, len(s), c, ctx.progress), "distill")
