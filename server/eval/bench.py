"""`vitmerge bench accuracy`: every merge method on one zoo, Ye et al. / EMR style tables.

Rows: Individual, AvgMean, Task Arithmetic (several lambda, best marked), TIES,
DARE+TA, RegMean, Fisher, EMR (task given), routed EMR (gate), gating+AvgMean and
gating+RegMean for several ``m`` with each gate architecture; columns: per-task
accuracy, average, normalised average (merged / individual per task, averaged),
parameters stored (M) and FLOPs per image (G). Plus accuracy vs. the number of
tasks N (EMR, TIES, AvgMean, gating+RegMean).

Evaluation runs on MIXED-task batches of every task's TEST split (shuffled by
``seed``) with per-image routing: with the task given every image uses its own
task's head (and EMR modulators); routed rows use the gate's ``p(x)`` per image
and count an image as correct only when the gate picks its task AND that head
picks its class. Deterministic on CPU: the same seed gives the same numbers.

Not on any serving path (it trains gates and runs every merge method).
"""

from __future__ import annotations

import itertools
import json
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from tqdm.auto import tqdm

from merging import collect_grams, emr_merge, regmean, weight_average
from merging.gating.plan import expert_stacks, gating_plan
from merging.gating.router import GateParams, gate_probabilities, train_gate_for
from merging.method_index import run_merge
from merging.methods.tsv import tsv_compress, tsv_merge
from merging.pipeline import merge_context
from merging.registry import MergeContext, MergeResult
from merging.types import StateDict
from model_store.architecture import GATE_ARCHS, build_gate, load_into, pre_logits
from model_store.data.attach import require_test_set
from model_store.data.sources import ImageSet
from model_store.zoo import Zoo
from server.runtime.gated_vit import GatedViT
from server.runtime.groups import task_groups

GATE_INIT = {"efficientnet_lite0": "ImageNet", "mobilenetv2_100": "scratch"}
#: rows (name, registry method, params) of the static (task-vector and data) merges
STATIC_METHODS: tuple[tuple[str, str, dict], ...] = (
    ("AvgMean", "avg", {}),
    ("Task Arithmetic (λ=0.25)", "task_arithmetic", {"lam": 0.25}),
    ("Task Arithmetic (λ=0.5)", "task_arithmetic", {"lam": 0.5}),
    ("Task Arithmetic (λ=0.75)", "task_arithmetic", {"lam": 0.75}),
    ("Task Arithmetic (λ=1.0)", "task_arithmetic", {"lam": 1.0}),
    ("TIES (k=0.2, λ=1.0)", "ties", {"k": 0.2, "lam": 1.0}),
    ("DARE+TA (p=0.5, λ=0.5)", "dare_ta", {"p": 0.5, "lam": 0.5}),
    ("RegMean (α=0.9)", "regmean", {"alpha": 0.9}),
    ("Fisher", "fisher", {}),
)

#: Groups of rows ``--sections`` chooses from: the static merges, EMR (task given and routed), TSV-C / TSV
#: routed / TSV-M, and the gated rows on AvgMean and on RegMean.
SECTIONS: tuple[str, ...] = ("static", "emr", "tsv", "gating_avg", "gating_regmean")

FeatureFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class AccuracyBenchConfig:
    """What the accuracy benchmark runs (defaults: the issue's full grid)."""

    m_values: tuple[int, ...] = (0, 1, 3, 5)
    gate_archs: tuple[str, ...] = GATE_ARCHS
    gate_epochs: int = 10
    gate_size: int = 64
    gate_max_images: int = 1000  # calibration images per task for each gate (the method default)
    limit: int | None = None  # test images per task (None: the whole test split)
    batch_size: int = 64
    seed: int = 0
    scaling: bool = True  # accuracy vs N for N = 2..len(tasks)
    scaling_m: int = 3
    static_methods: tuple[tuple[str, str, dict], ...] = STATIC_METHODS
    tsv_fractions: tuple[float, ...] = (0.05, 0.1)  # TSV-C rank fractions besides 1/N (the default)
    sections: tuple[str, ...] = SECTIONS  # which groups of rows run (Individual always does)
    tsv_conv: bool = False  # TSV-C also compresses the patch-embedding conv (tsv_c's `conv` parameter)


@dataclass
class Pool:
    """Every task's test images, shuffled into one mixed-task stream."""

    tasks: list[str]
    x: torch.Tensor
    task: torch.Tensor
    y: torch.Tensor
    raw: list[ImageSet]  # per task test images of the full pool (re-read with the gate's own preprocessing)
    order: torch.Tensor  # full pool position -> index into the concatenated raw images
    keep: torch.Tensor | None = None  # mask over the full pool (subsets)
    limit: int | None = None

    def gate_input(self, prep) -> torch.Tensor:
        g = torch.cat([r.tensors(prep, self.limit) for r in self.raw])[self.order]
        return g if self.keep is None else g[self.keep]

    def subset(self, n: int) -> Pool:
        """The images of the first ``n`` tasks (same order)."""
        assert self.keep is None, "subset of a subset"
        keep = self.task < n
        return Pool(self.tasks[:n], self.x[keep], self.task[keep], self.y[keep], self.raw, self.order, keep, self.limit)


def build_pool(zoo: Zoo, tasks: Sequence[str], limit: int | None, seed: int) -> Pool:
    """Every task's test images (the zoo's test sources) shuffled into one stream; refuses tasks without test data."""
    prep = zoo.metas[zoo.base].preprocessing
    xs, raw, tids, ys = [], [], [], []
    for i, t in enumerate(tasks):
        images = require_test_set(zoo, t, "the accuracy benchmark")
        xs.append(images.tensors(prep, limit))
        raw.append(images)
        tids.append(torch.full((len(xs[-1]),), i))
        ys.append(images.label_tensor(limit))
    order = torch.randperm(sum(len(x) for x in xs), generator=torch.Generator().manual_seed(seed))
    return Pool(
        list(tasks), torch.cat(xs)[order], torch.cat(tids)[order], torch.cat(ys)[order], raw, order, limit=limit
    )


@torch.inference_mode()
def evaluate(
    pool: Pool, heads: Sequence[dict[str, torch.Tensor]], features: FeatureFn, p: torch.Tensor, batch_size: int
) -> dict[str, float]:
    """Per-task accuracy on mixed batches; image correct iff argmax p is its task and that head is right."""
    chosen = p.argmax(1)
    correct = torch.zeros(len(pool.x), dtype=torch.bool)
    for s in range(0, len(pool.x), batch_size):
        sl = slice(s, s + batch_size)
        feats = features(pool.x[sl], p[sl], chosen[sl])
        for t, idx in task_groups(chosen[sl]):
            pred = F.linear(feats[idx], heads[t]["head.weight"], heads[t]["head.bias"]).argmax(1)
            correct[s + idx] = (chosen[s + idx] == pool.task[s + idx]) & (pred == pool.y[s + idx])
    return {t: float(correct[pool.task == i].float().mean()) for i, t in enumerate(pool.tasks)}


def static_features(model: nn.Module) -> FeatureFn:
    """One merged backbone for every image."""
    return lambda x, p, chosen: pre_logits(model, x)


def gated_features(model: GatedViT) -> FeatureFn:
    """Every image through the gated ViT with its own routing ``p`` (exact mixing)."""
    return lambda x, p, chosen: model.features(x, p, "exact")


def vit_depth(model: nn.Module) -> int:
    """Number of transformer blocks of a timm ViT."""
    return len(cast(nn.Sequential, model.blocks))


def _backbone(result: MergeResult) -> StateDict:
    assert result.backbone is not None, "a static merge returns a backbone"
    return result.backbone


def per_task_features(models: Sequence[nn.Module]) -> FeatureFn:
    """Each image through the model of its chosen task (individual models, EMR)."""

    def fn(x: torch.Tensor, p: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
        out = torch.empty(len(x), cast(int, models[0].num_features))
        for t, idx in task_groups(chosen):
            out[idx] = pre_logits(models[t], x[idx])
        return out

    return fn


def flops(fn: Callable, *args) -> float:
    """FLOPs of one call (torch's counter: 2 per multiply-add)."""
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        fn(*args)
    return float(counter.get_total_flops())


def numel(state: dict[str, torch.Tensor]) -> int:
    return sum(v.numel() for v in state.values())


def normalised(accs: dict[str, float], individual: dict[str, float]) -> float:
    """Mean over tasks of merged / individual accuracy."""
    return sum(accs[t] / individual[t] for t in accs) / len(accs)


@dataclass
class MergeInputs:
    zoo: Zoo
    tasks: list[str]
    ctx: MergeContext
    base: dict[str, torch.Tensor]
    finetuned: list[dict[str, torch.Tensor]]
    heads: list[dict[str, torch.Tensor]]
    grams: list = field(default_factory=list)


def _setup(zoo: Zoo, tasks: list[str], grams: list | None = None) -> MergeInputs:
    ctx = merge_context(zoo, tasks)
    assert ctx.build_model is not None and ctx.calibration is not None
    build, calibration = ctx.build_model, ctx.calibration
    finetuned = [zoo.backbone(t) for t in tasks]
    s = MergeInputs(zoo, tasks, ctx, zoo.backbone(zoo.base), finetuned, [zoo.head(t) for t in tasks])
    s.grams = (
        grams
        if grams is not None
        else [collect_grams(build(i, finetuned[i]), calibration(i, None, 256)) for i in range(len(tasks))]
    )
    return s


def _model(s: MergeInputs, backbone: dict[str, torch.Tensor]) -> nn.Module:
    return load_into(s.zoo.build_model(s.tasks[0]), backbone, s.heads[0]).eval()


def _gates(s: MergeInputs, pool: Pool, cfg: AccuracyBenchConfig, archs: Sequence[str]) -> dict[str, dict]:
    out = {}
    for arch in archs:
        t0 = time.perf_counter()
        art = train_gate_for(
            s.ctx,
            GateParams(
                gate_arch=arch,
                gate_epochs=cfg.gate_epochs,
                gate_size=cfg.gate_size,
                gate_seed=cfg.seed,
                gate_max_images=cfg.gate_max_images,
            ),
        )
        secs = time.perf_counter() - t0
        model = build_gate(arch, len(s.tasks))
        model.load_state_dict(art.state)
        g = pool.gate_input(art.preprocessing)
        p = gate_probabilities(model, g)
        out[arch] = {
            "p": p,
            "params": sum(v.numel() for v in model.parameters()),
            "flops": flops(model, g[:1]),
            "train_s": secs,
            "accuracy": {t: float((p[pool.task == i].argmax(1) == i).float().mean()) for i, t in enumerate(s.tasks)},
        }
    return out


def _gated(s: MergeInputs, static: dict[str, torch.Tensor], m: int) -> tuple[GatedViT, int]:
    plan = gating_plan(s.finetuned, m)
    experts = expert_stacks(s.finetuned, plan.gated_keys)
    model = GatedViT(
        s.zoo.metas[s.zoo.base].architecture, {k: v for k, v in static.items() if k not in experts}, experts, s.heads
    )
    return model, numel({k: v[0] for k, v in experts.items()})


def _row(name: str, kind: str, accs: dict[str, float], stored: float, gflops: float, **extra) -> dict:
    return {"name": name, "kind": kind, "accuracy": accs, "stored_M": stored / 1e6, "gflops": gflops / 1e9, **extra}


def tsv_fractions(cfg: AccuracyBenchConfig, n: int) -> list[float]:
    """TSV-C rank fractions of the benchmark: the configured ones and the default ``1/N``."""
    return sorted({*cfg.tsv_fractions, 1.0 / n})


def _static_rows(
    s: MergeInputs, pool: Pool, cfg: AccuracyBenchConfig, vit_flops: float, stored: int, bar: Any
) -> list[dict]:
    """One row per static merge method of ``cfg`` (one model, no routing)."""
    one_hot = F.one_hot(pool.task, len(s.tasks)).float()
    rows = []
    for name, method, params in cfg.static_methods:
        t0 = time.perf_counter()
        merged = run_merge(method, s.ctx, params).backbone
        assert merged is not None
        secs = time.perf_counter() - t0
        rows.append(
            _row(
                name,
                method,
                evaluate(pool, s.heads, static_features(_model(s, merged)), one_hot, cfg.batch_size),
                stored,
                vit_flops,
                merge_s=secs,
            )
        )
        bar.update(1)
    return rows


def _gating_rows(
    s: MergeInputs,
    pool: Pool,
    gates: dict,
    base_name: str,
    m_values: Sequence[int],
    vit_flops: float,
    backbone_n: int,
    head_n: int,
    bs: int,
    bar: Any,
) -> list[dict]:
    """Gated rows on one static merge (``avg`` or ``regmean``) for every ``m``: task given and per gate."""
    n = len(s.tasks)
    one_hot = F.one_hot(pool.task, n).float()
    static = weight_average(s.finetuned) if base_name == "avg" else regmean(s.base, s.finetuned, s.grams, 0.9)
    rows: list[dict] = []
    for m in m_values:
        gated, gated_n = _gated(s, static, m)
        stored = backbone_n - gated_n + n * gated_n + head_n
        mix = 2 * n * gated_n  # per-image weight mixing (exact routing)

        def feat(x: torch.Tensor, p: torch.Tensor, chosen: torch.Tensor, g: GatedViT = gated) -> torch.Tensor:
            return g.features(x, p, "exact")

        given = evaluate(pool, s.heads, feat, one_hot, bs)
        label = "AvgMean" if base_name == "avg" else "RegMean"
        rows.append(
            _row(
                f"gating+{label} m={m} (task given)",
                f"gating_{base_name}",
                given,
                stored,
                vit_flops + mix,
                m=m,
                base=base_name,
            )
        )
        for arch, g in gates.items():
            rows.append(
                _row(
                    f"gating+{label} m={m} ({arch} gate)",
                    f"gating_{base_name}",
                    evaluate(pool, s.heads, feat, g["p"], bs),
                    stored + g["params"],
                    vit_flops + mix + g["flops"],
                    m=m,
                    base=base_name,
                    gate=arch,
                )
            )
        bar.update(1)
    return rows


def _emr_rows(
    s: MergeInputs, pool: Pool, gates: dict, vit_flops: float, backbone_n: int, head_n: int, bs: int
) -> list[dict]:
    """EMR with the task given, and routed by every gate."""
    n = len(s.tasks)
    one_hot = F.one_hot(pool.task, n).float()
    emr = emr_merge(s.base, s.finetuned)
    models = [load_into(s.zoo.build_model(t), emr.task_state(i), s.heads[i]).eval() for i, t in enumerate(s.tasks)]
    stored = 2 * backbone_n + n * backbone_n / 32 + head_n  # theta_0 + tau_uni + 1-bit masks + heads
    fn = per_task_features(models)
    rows = [
        _row(
            "EMR (task given)",
            "emr",
            evaluate(pool, s.heads, fn, one_hot, bs),
            stored,
            vit_flops,
            rescalers=emr.rescalers,
        )
    ]
    for arch, g in gates.items():
        rows.append(
            _row(
                f"routed EMR ({arch} gate)",
                "emr_routed",
                evaluate(pool, s.heads, fn, g["p"], bs),
                stored + g["params"],
                vit_flops + g["flops"],
                gate=arch,
            )
        )
    return rows


def _tsv_rows(
    s: MergeInputs,
    pool: Pool,
    gates: dict,
    fractions: Sequence[float],
    vit_flops: float,
    head_n: int,
    bs: int,
    bar: Any,
    conv: bool = False,
) -> list[dict]:
    """TSV-C at every rank fraction (task given, and routed by the first gate) and TSV-M.

    Stored: ``W_0`` of the matrix layers + every task's factors and small tensors + heads (+ gate).
    FLOPs: the plain ViT + the one-pass engine's rank-r corrections, ``2 r (m + n)`` per token and layer.
    """
    n = len(s.tasks)
    one_hot = F.one_hot(pool.task, n).float()
    tokens = int(s.base["pos_embed"].shape[1]) + (0 if "cls_token" not in s.base else 1)
    arch, gate = next(iter(gates.items())) if gates else (None, None)
    rows = []
    for f in fractions:
        t0 = time.perf_counter()
        deltas = tsv_compress(s.base, s.finetuned, f, conv)
        secs = time.perf_counter() - t0
        stored = sum(s.base[k].numel() for k in deltas.ranks) + deltas.stored_numbers() + head_n
        # the conv's factors are served as per-task conv weights: no extra FLOPs
        extra = sum(2 * r * sum(s.base[k].shape) * tokens for k, r in deltas.ranks.items() if s.base[k].ndim == 2)
        models = [
            load_into(s.zoo.build_model(t), deltas.task_state(i), s.heads[i]).eval() for i, t in enumerate(s.tasks)
        ]
        fn = per_task_features(models)
        label = f"TSV-C f={f:.3g}" + (" (1/N)" if abs(f - 1.0 / n) < 1e-9 else "") + (" +conv" if conv else "")
        given = evaluate(pool, s.heads, fn, one_hot, bs)
        rows.append(_row(f"{label} (task given)", "tsv_c", given, stored, vit_flops + extra, f=f, merge_s=secs))
        if gate is not None:
            rows.append(
                _row(
                    f"TSV routed f={f:.3g}{' +conv' if conv else ''} ({arch} gate)",
                    "tsv_routed",
                    evaluate(pool, s.heads, fn, gate["p"], bs),
                    stored + gate["params"],
                    vit_flops + extra + gate["flops"],
                    f=f,
                    gate=arch,
                )
            )
        bar.update(1)
    t0 = time.perf_counter()
    merged = tsv_merge(s.base, s.finetuned)
    secs = time.perf_counter() - t0
    tsv_m = evaluate(pool, s.heads, static_features(_model(s, merged)), one_hot, bs)
    rows.append(_row("TSV-M (α=1.0)", "tsv_m", tsv_m, numel(s.base) + head_n, vit_flops, merge_s=secs))
    bar.update(1)
    return rows


def run_accuracy_bench(zoo: Zoo, cfg: AccuracyBenchConfig = AccuracyBenchConfig(), progress: bool = True) -> dict:
    """Run every row on ``zoo``; returns a JSON-serialisable result (see :func:`render_markdown`)."""
    torch.manual_seed(cfg.seed)
    start = time.perf_counter()
    tasks = list(zoo.tasks)
    n = len(tasks)
    depth = vit_depth(zoo.build_model(tasks[0]))
    m_values = sorted({m for m in cfg.m_values if m <= depth})
    pool = build_pool(zoo, tasks, cfg.limit, cfg.seed)
    s = _setup(zoo, tasks)
    one_hot = F.one_hot(pool.task, n).float()
    bs = cfg.batch_size
    on = set(cfg.sections)
    unknown = on - set(SECTIONS)
    if unknown:
        raise ValueError(f"unknown sections {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
    statics_on = [b for b in ("avg", "regmean") if f"gating_{b}" in on]
    total = (
        1
        + (len(cfg.static_methods) if "static" in on else 0)
        + ("emr" in on)
        + ((len(tsv_fractions(cfg, n)) + 1) if "tsv" in on else 0)
        + len(m_values) * len(statics_on)
        + (3 * (n - 2) if cfg.scaling else 0)
    )
    bar = tqdm(total=total, desc=f"bench accuracy {zoo.name}", unit="row", disable=not progress)
    backbone_n, head_n = numel(s.base), sum(numel(h) for h in s.heads)
    plain = _model(s, s.base)
    vit_flops = flops(lambda x: pre_logits(plain, x), pool.x[:1])

    rows: list[dict] = []
    individual_models = [load_into(zoo.build_model(t), s.finetuned[i], s.heads[i]).eval() for i, t in enumerate(tasks)]
    individual = evaluate(pool, s.heads, per_task_features(individual_models), one_hot, bs)
    rows.append(_row("Individual", "individual", individual, n * backbone_n + head_n, vit_flops))
    del individual_models
    bar.update(1)

    if "static" in on:
        rows += _static_rows(s, pool, cfg, vit_flops, backbone_n + head_n, bar)

    gates = _gates(s, pool, cfg, cfg.gate_archs)
    if "emr" in on:
        rows += _emr_rows(s, pool, gates, vit_flops, backbone_n, head_n, bs)
        bar.update(1)
    if "tsv" in on:
        rows += _tsv_rows(s, pool, gates, tsv_fractions(cfg, n), vit_flops, head_n, bs, bar, cfg.tsv_conv)

    for base_name in statics_on:
        rows += _gating_rows(s, pool, gates, base_name, m_values, vit_flops, backbone_n, head_n, bs, bar)

    scaling = _scaling(s, pool, cfg, gates, bar) if cfg.scaling and n > 2 else []
    bar.close()
    return {
        "zoo": zoo.name,
        "preset": zoo.manifest.preset,
        "tasks": tasks,
        "config": asdict(cfg),
        "depth": depth,
        "m_values": m_values,
        "test_images": {t: int((pool.task == i).sum()) for i, t in enumerate(tasks)},
        "backbone_M": backbone_n / 1e6,
        "vit_gflops": vit_flops / 1e9,
        "gates": {
            a: {k: v for k, v in g.items() if k != "p"} | {"init": GATE_INIT.get(a, "?")} for a, g in gates.items()
        },
        "rows": rows,
        "scaling": scaling,
        "seconds": time.perf_counter() - start,
    }


def _scaling(s: MergeInputs, pool: Pool, cfg: AccuracyBenchConfig, gates_full: dict, bar: tqdm) -> list[dict]:
    """Normalised accuracy of EMR, TIES, AvgMean, gating+RegMean(m) for the first N tasks, N = 2..len(tasks)."""
    out = []
    arch = cfg.gate_archs[0]
    n_all = len(s.tasks)
    for n in range(2, n_all + 1):
        sub = pool.subset(n)
        ss = s if n == n_all else _setup(s.zoo, s.tasks[:n], s.grams[:n])
        one_hot = F.one_hot(sub.task, n).float()
        gate_p = gates_full[arch]["p"] if n == n_all else _gates(ss, sub, cfg, [arch])[arch]["p"]
        ind_models = [
            load_into(s.zoo.build_model(t), ss.finetuned[i], ss.heads[i]).eval() for i, t in enumerate(ss.tasks)
        ]
        individual = evaluate(sub, ss.heads, per_task_features(ind_models), one_hot, cfg.batch_size)
        emr = emr_merge(ss.base, ss.finetuned)
        emr_fn = per_task_features(
            [load_into(s.zoo.build_model(t), emr.task_state(i), ss.heads[i]).eval() for i, t in enumerate(ss.tasks)]
        )
        m = min(cfg.scaling_m, vit_depth(s.zoo.build_model(s.tasks[0])))
        gated, _ = _gated(ss, regmean(ss.base, ss.finetuned, ss.grams, 0.9), m)
        accs = {
            "EMR": evaluate(sub, ss.heads, emr_fn, one_hot, cfg.batch_size),
            "routed EMR": evaluate(sub, ss.heads, emr_fn, gate_p, cfg.batch_size),
            "TIES": evaluate(
                sub,
                ss.heads,
                static_features(_model(ss, _backbone(run_merge("ties", ss.ctx, {"k": 0.2, "lam": 1.0})))),
                one_hot,
                cfg.batch_size,
            ),
            "AvgMean": evaluate(
                sub, ss.heads, static_features(_model(ss, weight_average(ss.finetuned))), one_hot, cfg.batch_size
            ),
            f"gating+RegMean m={m}": evaluate(sub, ss.heads, gated_features(gated), gate_p, cfg.batch_size),
        }
        out.append(
            {
                "n": n,
                "tasks": ss.tasks,
                "individual": individual,
                "accuracy": accs,
                "normalised": {k: normalised(v, individual) for k, v in accs.items()},
            }
        )
        if n < n_all:
            bar.update(3)
    return out


# -- report ------------------------------------------------------------------------------
def _avg(accs: dict[str, float]) -> float:
    return 100 * sum(accs.values()) / len(accs)


def _find(rows: list[dict], name: str) -> dict:
    return next(r for r in rows if r["name"] == name)


def best_task_arithmetic(rows: list[dict]) -> str:
    """Name of the TA row with the best average accuracy."""
    return max((r for r in rows if r["kind"] == "task_arithmetic"), key=lambda r: _avg(r["accuracy"]))["name"]


def claims(result: dict) -> list[tuple[str, bool, str]]:
    """The papers' claims checked on our numbers: (claim, holds, evidence).

    Claims whose rows were not run are skipped."""
    avg = {r["name"]: _avg(r["accuracy"]) for r in result["rows"]}
    out: list[tuple[str, bool, str]] = []
    arch = result["config"]["gate_archs"][0]
    emr, reg, avgmean = avg.get("EMR (task given)"), avg.get("RegMean (α=0.9)"), avg.get("AvgMean")
    tas = [r for r in result["rows"] if r["kind"] == "task_arithmetic"]
    ta = avg[best_task_arithmetic(result["rows"])] if tas else None
    if emr is not None and ta is not None and avgmean is not None:
        out.append(
            (
                "EMR ≫ Task Arithmetic ≥ AvgMean (EMR Table 1)",
                emr > ta >= avgmean,
                f"EMR {emr:.1f} vs best TA {ta:.1f} vs AvgMean {avgmean:.1f}",
            )
        )
    if reg is not None and ta is not None:
        out.append(
            (
                "RegMean > Task Arithmetic (Ye Tables 3-4, EMR Table 1)",
                reg > ta,
                f"RegMean {reg:.1f} vs best TA {ta:.1f}",
            )
        )
    for label, static in (("AvgMean", avgmean), ("RegMean", reg)):
        found = [avg.get(f"gating+{label} m={m} ({arch} gate)") for m in result["m_values"]]
        seq = [v for v in found if v is not None]
        if static is None or not seq or len(seq) != len(found):
            continue
        out.append(
            (
                f"gating improves {label} (Ye Tables 3-4)",
                seq[0] > static,
                f"gating+{label} m={result['m_values'][0]} {seq[0]:.1f} vs {label} {static:.1f}",
            )
        )
        if len(seq) > 1:
            grows = all(b >= a - 0.05 for a, b in itertools.pairwise(seq)) and seq[-1] > seq[0]
            out.append(
                (
                    f"gating+{label} grows with m (Ye Tables 3-4)",
                    grows,
                    "m " + ", ".join(f"{m}: {v:.1f}" for m, v in zip(result["m_values"], seq)),
                )
            )
    inits = {v["init"]: (a, _avg(v["accuracy"])) for a, v in result["gates"].items()}
    if "scratch" in inits and len(inits) > 1:
        (pre_arch, pre), (scr_arch, scr) = next(v for k, v in inits.items() if k != "scratch"), inits["scratch"]
        out.append(
            (
                "pretrained gate init beats scratch (Ye Table 8)",
                pre > scr,
                f"{pre_arch} {pre:.2f}% vs {scr_arch} {scr:.2f}% task-id accuracy",
            )
        )
    routed = avg.get(f"routed EMR ({arch} gate)")
    if emr is not None and routed is not None:
        out.append(
            (
                "routed EMR within 1 point of EMR with the task given (our target)",
                emr - routed <= 1.0,
                f"{routed:.1f} vs {emr:.1f}",
            )
        )
    return out


def render_markdown(result: dict, command: str) -> str:
    """Markdown tables of one run (the section ``vitmerge bench accuracy`` writes)."""
    tasks, rows = result["tasks"], result["rows"]
    ind = _find(rows, "Individual")["accuracy"]
    ta = best_task_arithmetic(rows) if any(r["kind"] == "task_arithmetic" for r in rows) else None
    imgs = ", ".join(f"{t} {k}" for t, k in result["test_images"].items())
    lines = [
        (
            f"Command: `{command}` (seed {result['config']['seed']}, CPU, {result['seconds'] / 60:.1f} min). "
            f"Test images per task (never seen by training or merging): {imgs}. "
            f"Mixed-task batches of {result['config']['batch_size']}, "
            f"per-image routing. ViT forward {result['vit_gflops']:.3f} GFLOPs/img, "
            f"backbone {result['backbone_M']:.2f} M parameters. "
            "Stored parameters count heads and gates; EMR stores θ0 + τ_uni + one 1-bit mask per task "
            "(1/32 parameter per bit); "
            "gated rows store N copies of the gated tensors and their FLOPs include exact per-image weight mixing "
            "and the gate. "
            + ("**Bold**: best Task Arithmetic λ (chosen on the test split, as the papers do)." if ta else "")
        ),
        "",
        "| method | " + " | ".join(tasks) + " | avg | norm. avg | stored params (M) | GFLOPs/img |",
        "|---" * (len(tasks) + 5) + "|",
    ]
    for r in rows:
        name = f"**{r['name']}**" if r["name"] == ta else r["name"]
        accs = r["accuracy"]
        lines.append(
            f"| {name} | "
            + " | ".join(f"{100 * accs[t]:.1f}" for t in tasks)
            + f" | {_avg(accs):.1f} | {100 * normalised(accs, ind):.1f} | {r['stored_M']:.2f} | {r['gflops']:.3f} |"
        )
    lines += [
        "",
        "Gates (share of each task's test images routed to that task):",
        "",
        "| gate | init | params (M) | GFLOPs/img | train (s) | " + " | ".join(tasks) + " | avg |",
        "|---" * (len(tasks) + 6) + "|",
    ]
    for arch, g in result["gates"].items():
        lines.append(
            f"| {arch} | {g['init']} | {g['params'] / 1e6:.2f} | {g['flops'] / 1e9:.3f} | {g['train_s']:.0f} | "
            + " | ".join(f"{100 * g['accuracy'][t]:.1f}" for t in tasks)
            + f" | {_avg(g['accuracy']):.2f} |"
        )
    if result["scaling"]:
        methods = list(result["scaling"][0]["normalised"])
        lines += [
            "",
            "Normalised accuracy (%) vs number of tasks N "
            "(the first N tasks; routed rows use a gate trained on those N):",
            "",
            "| N | tasks | " + " | ".join(methods) + " |",
            "|---" * (len(methods) + 2) + "|",
        ]
        for sc in result["scaling"]:
            lines.append(
                f"| {sc['n']} | {', '.join(sc['tasks'])} | "
                + " | ".join(f"{100 * sc['normalised'][k]:.1f}" for k in methods)
                + " |"
            )
    lines += [
        "",
        "Claims of the papers, checked on these numbers:",
        "",
        "| claim | holds here | evidence |",
        "|---|---|---|",
    ]
    for claim, ok, evidence in claims(result):
        lines.append(f"| {claim} | {'yes' if ok else '**no**'} | {evidence} |")
    return "\n".join(lines) + "\n"


def _save(fig, ax, path: Path, legend: bool = True) -> Path:
    """Grid, legend, tight layout, PNG at 110 dpi; closes the figure."""
    import matplotlib.pyplot as plt

    if legend:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plot_vs_m(result: dict, ind: dict[str, float], path: Path) -> Path:
    """Average accuracy of the gated rows vs m (task given and per gate), individual and routed EMR as lines."""
    import matplotlib.pyplot as plt

    rows, arch = result["rows"], result["config"]["gate_archs"][0]
    kinds = {r["kind"] for r in rows}
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for _base, label, style in [
        b for b in (("avg", "AvgMean", "-"), ("regmean", "RegMean", "--")) if f"gating_{b[0]}" in kinds
    ]:
        for gate, marker in [(a, mk) for a, mk in zip(result["config"]["gate_archs"], "ox")] + [("task given", "s")]:
            suffix = "(task given)" if gate == "task given" else f"({gate} gate)"
            ys = [_avg(_find(rows, f"gating+{label} m={m} {suffix}")["accuracy"]) for m in result["m_values"]]
            ax.plot(result["m_values"], ys, style, marker=marker, label=f"gating+{label}, {gate}")
    ax.axhline(_avg(ind), color="black", lw=1, label="individual")
    routed_emr = next((r for r in rows if r["name"] == f"routed EMR ({arch} gate)"), None)
    if routed_emr is not None:
        ax.axhline(_avg(routed_emr["accuracy"]), color="green", ls=":", label="routed EMR")
    ax.set(
        xlabel="m (gated attention + MLP blocks)", ylabel="avg accuracy (%)", title=f"{result['zoo']}: accuracy vs m"
    )
    return _save(fig, ax, path)


def plot(result: dict, out_dir: Path, stem: str) -> list[Path]:
    """PNG plots: normalised accuracy per method, accuracy vs m, stored params vs accuracy, accuracy vs N."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, ind = result["rows"], _find(result["rows"], "Individual")["accuracy"]
    arch = result["config"]["gate_archs"][0]
    paths = []

    fig, ax = plt.subplots(figsize=(8, 0.28 * len(rows) + 1.2))
    names = [r["name"] for r in rows][::-1]
    ax.barh(names, [100 * normalised(r["accuracy"], ind) for r in rows][::-1], color="tab:blue")
    ax.axvline(100, color="black", lw=1)
    ax.set(xlabel="normalised accuracy (%)", title=f"{result['zoo']}: normalised accuracy per method")
    ax.tick_params(axis="y", labelsize=7)
    paths.append(_save(fig, ax, out_dir / f"{stem}-normalised.png", legend=False))

    paths.append(_plot_vs_m(result, ind, out_dir / f"{stem}-vs-m.png"))

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    colors = {
        "individual": "black",
        "emr": "green",
        "emr_routed": "limegreen",
        "gating_avg": "tab:orange",
        "gating_regmean": "tab:red",
    }
    for r in rows:
        ax.scatter(r["stored_M"], 100 * normalised(r["accuracy"], ind), color=colors.get(r["kind"], "tab:blue"), s=18)
    for kind, c in [("static merges", "tab:blue"), *colors.items()]:
        ax.scatter([], [], color=c, label=kind)
    ax.set(
        xlabel="parameters stored (M)",
        ylabel="normalised accuracy (%)",
        title=f"{result['zoo']}: stored parameters vs accuracy",
    )
    paths.append(_save(fig, ax, out_dir / f"{stem}-params.png"))

    tsv = [r for r in rows if r["kind"] in ("tsv_c", "tsv_routed")]
    if tsv:
        fig, ax = plt.subplots(figsize=(6.5, 4.2))
        for kind, label, marker in (
            ("tsv_c", "TSV-C, task given", "o"),
            ("tsv_routed", f"TSV routed ({arch} gate)", "x"),
        ):
            pts = sorted(
                (r["stored_M"], 100 * normalised(r["accuracy"], ind), r["f"]) for r in tsv if r["kind"] == kind
            )
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, label=label)
            for x, y, f in pts:
                ax.annotate(f"f={f:.2g}", (x, y), fontsize=6, xytext=(3, -8), textcoords="offset points")
        for name, c in (("EMR (task given)", "green"), (f"routed EMR ({arch} gate)", "limegreen")):
            r = next((r for r in rows if r["name"] == name), None)
            if r is not None:
                ax.scatter([r["stored_M"]], [100 * normalised(r["accuracy"], ind)], color=c, marker="s", label=name)
        for r in rows:
            if r["kind"] == "gating_regmean" and r.get("gate") == arch:
                ax.scatter([r["stored_M"]], [100 * normalised(r["accuracy"], ind)], color="tab:red", marker="^", s=14)
        ax.scatter([], [], color="tab:red", marker="^", label=f"gating+RegMean (m values, {arch} gate)")
        one = _find(rows, "Individual")["stored_M"] / max(1, len(result["tasks"]))
        ax.axvline(one, color="black", lw=0.8, ls=":", label="one model")
        ax.axvline(1.5 * one, color="gray", lw=0.8, ls="--", label="1.5 x one model")
        low, high = ax.get_ylim()
        ax.set_ylim(low - 0.6 * (high - low), high)  # room for the legend below the curves
        ax.set(
            xlabel="parameters stored (M)",
            ylabel="normalised accuracy (%)",
            title=f"{result['zoo']}: accuracy vs storage (TSV over f)",
        )
        paths.append(_save(fig, ax, out_dir / f"{stem}-tsv.png"))

    if result["scaling"]:
        fig, ax = plt.subplots(figsize=(6.5, 4.2))
        ns = [sc["n"] for sc in result["scaling"]]
        for k in result["scaling"][0]["normalised"]:
            ax.plot(ns, [100 * sc["normalised"][k] for sc in result["scaling"]], marker="o", label=k)
        ax.set(
            xlabel="number of tasks N",
            ylabel="normalised accuracy (%)",
            title=f"{result['zoo']}: scaling with N",
            xticks=ns,
        )
        paths.append(_save(fig, ax, out_dir / f"{stem}-vs-n.png"))
    return paths


def update_section(path: Path, key: str, body: str) -> None:
    """Replace (or append) the block between ``<!-- bench accuracy: key -->`` markers in ``path``."""
    start, end = f"<!-- bench accuracy: {key} -->", f"<!-- /bench accuracy: {key} -->"
    block = f"{start}\n{body.rstrip()}\n{end}"
    text = path.read_text() if path.exists() else ""
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.DOTALL)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)


def write_report(result: dict, out_dir: Path, command: str, benchmarks_md: Path | None) -> list[Path]:
    """JSON + markdown + PNGs into ``out_dir``; the markdown also into ``benchmarks_md``'s section."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"accuracy-{result['zoo']}"
    (out_dir / f"{stem}.json").write_text(json.dumps(result, indent=1))
    md = render_markdown(result, command)
    pngs = plot(result, out_dir, stem)
    rel = [
        p.relative_to(benchmarks_md.parent) if benchmarks_md and p.is_relative_to(benchmarks_md.parent) else p
        for p in pngs
    ]
    md_full = md + "\n" + "\n".join(f"![{p.stem}]({p})" for p in rel) + "\n"
    (out_dir / f"{stem}.md").write_text(md_full)
    if benchmarks_md is not None:
        update_section(benchmarks_md, result["zoo"], md_full)
    return [out_dir / f"{stem}.json", out_dir / f"{stem}.md", *pngs]
