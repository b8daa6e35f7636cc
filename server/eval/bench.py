"""`vitmerge bench accuracy`: every merge method on one zoo, Ye et al. / EMR style tables.

FusionBench's split, on our own abstractions:

* **task pool** -- every task's labeled TEST images from the zoo's data sources
  (:class:`~server.eval.taskpool.TaskPool`);
* **methods** -- each row's merge runs through the merge pipeline
  (:func:`merging.pipeline.merge_and_publish`) into a bundle in a store (``config.store``, else a temporary
  one deleted at the end); gates and Gram matrices are trained/collected once and shared between merges
  (:class:`merging.pipeline.MergeCache`);
* **evaluation** -- every bundle ONLY through the serving :class:`~server.runtime.engine.Engine` (mixing
  ``exact``): task given, each task's images with that task named (the pass ``vitmerge eval`` makes), and
  routed, every task's images shuffled (``seed``) into mixed batches the bundle's gate routes (``vitmerge
  eval --routed``'s): an image counts as correct only when the gate picks its task AND that head picks its
  class. A routed bundle's task-given pass gives the method's task-given row (the gate is not used when the
  task is named). Agreement: top-1 agreement with each task's own model in the same pass
  (:func:`server.runtime.agreement.summarise_agreement`);
* **report** -- :mod:`server.eval.report` (tables, claims, BENCHMARKS.md sections), :mod:`server.eval.plots`.

Rows: Individual, AvgMean, Task Arithmetic (several lambda), TIES, DARE+TA, RegMean, Fisher, EMR (task
given), routed EMR (per gate), TSV-C / TSV routed at several rank fractions, TSV-M, gating+AvgMean and
gating+RegMean for several ``m`` (task given and per gate). Plus accuracy vs the number of tasks N.
Deterministic on CPU: the same seed gives the same numbers. Not on any serving path.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode
from tqdm.auto import tqdm

from merging.pipeline import MergeCache, merge_and_publish
from model_store.bundle import BundleStore
from model_store.data.preprocessing import to_model_input
from model_store.settings import StoreLayout
from model_store.zoo import Zoo
from server.eval.records import (
    GATE_INIT,
    SECTIONS,
    STATIC_METHODS,
    AccuracyBenchConfig,
    BenchResult,
    BenchRow,
    GateRow,
    ScalingRow,
    normalised,
)
from server.eval.taskpool import Outputs, TaskPool
from server.runtime.agreement import summarise_agreement
from server.runtime.engine import Engine, EngineOptions

__all__ = ["SECTIONS", "STATIC_METHODS", "AccuracyBenchConfig", "run_accuracy_bench"]


def _addmm_inplace_flops(self_shape: Any, a_shape: Any, b_shape: Any, *args: Any, **kwargs: Any) -> int:
    """``y.addmm_(a, b)``: the low-rank layer's shared GEMM, which torch's counter does not know."""
    return 2 * a_shape[0] * a_shape[1] * b_shape[1]


def flops(fn: Callable[..., Any], *args: Any) -> float:
    """FLOPs of one call (torch's counter: 2 per multiply-add; in-place ``addmm_`` counted too)."""
    mapping = {torch.ops.aten.addmm_: _addmm_inplace_flops}
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter, torch.inference_mode():
        fn(*args)
    return float(counter.get_total_flops())


def numel(state: dict[str, torch.Tensor]) -> int:
    return sum(v.numel() for v in state.values())


#: batch-norm statistics: stored with a gate, but not parameters
_BN_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def stored_parameters(engine: Engine) -> tuple[float, int]:
    """Parameters a bundle stores: every tensor file but the gate (bit-packed EMR masks at 1/32 parameter per
    bit), and the gate's own (its batch-norm statistics not counted)."""
    total, gate = 0.0, 0
    for file in engine.bundle.manifest.files:
        name = file.removesuffix(".safetensors")
        if name == file:
            continue
        for k, v in engine.bundle.tensors(name).items():
            if name == "gate":
                gate += 0 if k.endswith(_BN_BUFFERS) else v.numel()
            else:
                total += v.numel() * (0.25 if v.dtype == torch.uint8 else 1.0)
    return total, gate


@dataclass
class Evaluation:
    """One bundle's passes: accuracy, agreement and FLOPs per image, task given and/or routed."""

    version: str
    merge_s: float
    stored: float
    given: dict[str, float] | None = None
    given_agreement: dict[str, float | None] | None = None
    given_flops: float = 0.0
    routed: dict[str, float] | None = None
    routed_agreement: dict[str, float | None] | None = None
    routed_flops: float = 0.0
    gate_params: int = 0
    rescalers: list[float] | None = None


def _gate_params(cfg: AccuracyBenchConfig, arch: str) -> dict[str, Any]:
    """A routed method's gate parameters (the gate is scored here, not after the merge)."""
    return {
        "gate_arch": arch,
        "gate_epochs": cfg.gate_epochs,
        "gate_size": cfg.gate_size,
        "gate_seed": cfg.seed,
        "gate_max_images": cfg.gate_max_images,
        "gate_test_images": 0,
    }


class BenchSession:
    """One zoo, one store, one task pool: merges through the pipeline, bundles evaluated through the Engine."""

    def __init__(self, zoo: Zoo, cfg: AccuracyBenchConfig, store: BundleStore, keep: bool, bar: tqdm):
        self.zoo, self.cfg, self.store, self.keep, self.bar = zoo, cfg, store, keep, bar
        self.cache = MergeCache()
        self.pool = TaskPool.of_zoo(zoo, zoo.tasks, cfg.limit, "the accuracy benchmark")
        self.reference = self.pool.reference(zoo)
        self.individual = {t: a for t, a in self.pool.reference_accuracy(self.reference).items() if a is not None}
        self.gates: dict[str, GateRow] = {}
        self._done: dict[tuple[str, str, tuple[str, ...]], Evaluation] = {}

    def evaluate(
        self,
        method: str,
        params: dict[str, Any],
        tasks: Sequence[str] | None = None,
        given: bool = True,
        routed: bool = False,
    ) -> Evaluation:
        """Merge ``method`` (once per method, params and tasks) and evaluate its bundle in the passes asked for."""
        chosen = tuple(tasks or self.zoo.tasks)
        key = (method, json.dumps(params, sort_keys=True), chosen)
        done = self._done.get(key)
        if done is not None and (done.given is not None or not given) and (done.routed is not None or not routed):
            return done
        outcome = merge_and_publish(
            self.zoo, self.store, method, params, list(chosen), progress=False, make_current=False, cache=self.cache
        )
        engine = Engine(self.store.load(outcome.version, verify=False), EngineOptions(mixing="exact"))
        pool = self.pool.subset(chosen)
        stored, gate_params = stored_parameters(engine)
        ev = Evaluation(outcome.version, outcome.merge_seconds, stored, gate_params=gate_params)
        if given:
            outs = pool.given(engine)
            ev.given = {t: a for t, a in pool.given_accuracy(outs).items() if a is not None}
            ev.given_agreement = self._agreement(engine, pool, outs, None)
            ev.given_flops = self._flops(engine, pool, routed=False)
        if routed:
            outs = pool.routed(engine, self.cfg.batch_size, self.cfg.seed)
            accs = pool.routed_accuracy(outs)
            ev.routed = {t: r["routed"] for t, r in accs.items() if r is not None}
            ev.routed_agreement = self._agreement(engine, pool, None, outs)
            ev.routed_flops = self._flops(engine, pool, routed=True)
            assert engine.gate is not None and outcome.result.gate is not None
            arch = outcome.result.gate.arch
            if chosen == tuple(self.zoo.tasks) and arch not in self.gates:
                _, g = self._first_image(engine, pool, routed=True)
                self.gates[arch] = GateRow(
                    init=GATE_INIT.get(arch, "?"),
                    params=ev.gate_params,
                    flops=flops(engine.gate, g),
                    train_s=outcome.result.gate.train_seconds,
                    accuracy={t: r["gate"] for t, r in accs.items() if r is not None},
                )
        if outcome.result.emr is not None:
            ev.rescalers = [float(r) for r in outcome.result.emr.rescalers]
        if not self.keep:
            self.store.remove(outcome.version)
        self._done[key] = ev
        self.bar.update(1)
        return ev

    def _agreement(
        self, engine: Engine, pool: TaskPool, given: Outputs | None, routed: Outputs | None
    ) -> dict[str, float | None]:
        """Per task: top-1 agreement with the task's own model in the pass made (``given`` or ``routed``)."""
        out: dict[str, float | None] = {}
        for t in pool.tasks:
            ref = self.reference[t]
            g, r = (given or {}).get(t), (routed or {}).get(t)
            if ref is None:
                out[t] = None
                continue
            row = summarise_agreement(t, "test", engine.task_index(t), ref, g, r)
            out[t] = row.top1_given if given is not None else row.top1_routed
        return out

    @staticmethod
    def _first_image(engine: Engine, pool: TaskPool, routed: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        images = pool.sets[pool.tasks[0]]
        assert images is not None
        return engine.prepare(next(images.chunks(1)), None if routed else 0)

    def _flops(self, engine: Engine, pool: TaskPool, routed: bool) -> float:
        """FLOPs of one image through ``engine.predict`` (after a first call: EMR's weights are cached)."""
        x, g = self._first_image(engine, pool, routed)
        given: list[int | None] = [None] if routed else [0]
        engine.predict(x, given, g)
        return flops(engine.predict, x, given, g)


# -- rows --------------------------------------------------------------------------------
def _row(name: str, kind: str, ev: Evaluation, routed: bool = False, **extra: Any) -> BenchRow:
    """A row from one pass of a bundle's evaluation (routed rows count the gate in storage and FLOPs)."""
    accs, agree = (ev.routed, ev.routed_agreement) if routed else (ev.given, ev.given_agreement)
    assert accs is not None and agree is not None
    return BenchRow(
        name=name,
        kind=kind,
        accuracy=accs,
        stored_M=(ev.stored + (ev.gate_params if routed else 0)) / 1e6,
        gflops=(ev.routed_flops if routed else ev.given_flops) / 1e9,
        agreement=agree,
        bundle=ev.version,
        merge_s=ev.merge_s,
        **extra,
    )


def individual_row(s: BenchSession) -> tuple[BenchRow, float, float]:
    """The zoo's own models (no bundle); also the backbone's parameters and one image's FLOPs."""
    zoo = s.zoo
    backbone_n = numel(dict(zoo.backbone(zoo.base)))
    stored = sum(numel(dict(zoo.backbone(t))) + numel(dict(zoo.head(t))) for t in zoo.tasks)
    images = s.pool.sets[zoo.tasks[0]]
    assert images is not None
    x = to_model_input(next(images.chunks(1)), zoo.metas[zoo.tasks[0]].preprocessing)
    vit_flops = flops(zoo.build_model(zoo.tasks[0]).eval(), x)
    row = BenchRow(
        name="Individual",
        kind="individual",
        accuracy=s.individual,
        stored_M=stored / 1e6,
        gflops=vit_flops / 1e9,
        agreement=dict.fromkeys(s.individual, 1.0),
    )
    return row, backbone_n, vit_flops


def static_rows(s: BenchSession) -> list[BenchRow]:
    """One row per static merge method of the config (one model, task given)."""
    return [_row(name, method, s.evaluate(method, params)) for name, method, params in s.cfg.static_methods]


def emr_rows(s: BenchSession) -> list[BenchRow]:
    """EMR with the task given, and routed by every gate (one ``emr_routed`` bundle per gate)."""
    rows: list[BenchRow] = []
    for i, arch in enumerate(s.cfg.gate_archs):
        ev = s.evaluate("emr_routed", _gate_params(s.cfg, arch), given=i == 0, routed=True)
        if i == 0:
            rows.append(_row("EMR (task given)", "emr", ev, rescalers=ev.rescalers))
        rows.append(_row(f"routed EMR ({arch} gate)", "emr_routed", ev, routed=True, gate=arch))
    return rows


def tsv_fractions(cfg: AccuracyBenchConfig, n: int) -> list[float]:
    """TSV-C rank fractions of the benchmark: the configured ones and the default ``1/N``."""
    return sorted({*cfg.tsv_fractions, 1.0 / n})


def tsv_rows(s: BenchSession) -> list[BenchRow]:
    """TSV-C at every rank fraction (task given, and routed by the first gate: one ``tsv_routed`` bundle) and TSV-M."""
    n, conv, arch = len(s.zoo.tasks), s.cfg.tsv_conv, s.cfg.gate_archs[0]
    rows: list[BenchRow] = []
    for f in tsv_fractions(s.cfg, n):
        ev = s.evaluate("tsv_routed", {"f": f, "conv": conv, **_gate_params(s.cfg, arch)}, routed=True)
        label = f"TSV-C f={f:.3g}" + (" (1/N)" if abs(f - 1.0 / n) < 1e-9 else "") + (" +conv" if conv else "")
        rows.append(_row(f"{label} (task given)", "tsv_c", ev, f=f))
        rows.append(
            _row(
                f"TSV routed f={f:.3g}{' +conv' if conv else ''} ({arch} gate)", "tsv_routed", ev, True, f=f, gate=arch
            )
        )
    rows.append(_row("TSV-M (α=1.0)", "tsv_m", s.evaluate("tsv_m", {})))
    return rows


def gating_rows(s: BenchSession, base: str, m_values: Sequence[int]) -> list[BenchRow]:
    """Gated rows on one static merge (``avg`` or ``regmean``) for every ``m``: task given and per gate."""
    label = "AvgMean" if base == "avg" else "RegMean"
    rows: list[BenchRow] = []
    for m in m_values:
        for i, arch in enumerate(s.cfg.gate_archs):
            ev = s.evaluate(f"gating_{base}", {"m": m, **_gate_params(s.cfg, arch)}, given=i == 0, routed=True)
            if i == 0:
                rows.append(_row(f"gating+{label} m={m} (task given)", f"gating_{base}", ev, m=m, base=base))
            rows.append(
                _row(f"gating+{label} m={m} ({arch} gate)", f"gating_{base}", ev, True, m=m, base=base, gate=arch)
            )
    return rows


def scaling_rows(s: BenchSession, depth: int) -> list[ScalingRow]:
    """Normalised accuracy of EMR, routed EMR, TIES, AvgMean, gating+RegMean(m) on the first N tasks, N = 2..all
    (each merged on those N tasks alone; routed rows use a gate trained on those N)."""
    gate, m = _gate_params(s.cfg, s.cfg.gate_archs[0]), min(s.cfg.scaling_m, depth)
    out = []
    for n in range(2, len(s.zoo.tasks) + 1):
        tasks = s.zoo.tasks[:n]
        emr = s.evaluate("emr_routed", gate, tasks, routed=True)
        gated = s.evaluate("gating_regmean", {"m": m, **gate}, tasks, given=False, routed=True)
        accs = {
            "EMR": emr.given,
            "routed EMR": emr.routed,
            "TIES": s.evaluate("ties", {"k": 0.2, "lam": 1.0}, tasks).given,
            "AvgMean": s.evaluate("avg", {}, tasks).given,
            f"gating+RegMean m={m}": gated.routed,
        }
        individual = {t: s.individual[t] for t in tasks}
        out.append(
            ScalingRow(
                n=n,
                tasks=list(tasks),
                individual=individual,
                accuracy={k: v for k, v in accs.items() if v is not None},
                normalised={k: normalised(v, individual) for k, v in accs.items() if v is not None},
            )
        )
    return out


def _merges(cfg: AccuracyBenchConfig, n: int, m_values: Sequence[int]) -> int:
    """Merges the run makes at most (the progress bar's length)."""
    on, archs = set(cfg.sections), len(cfg.gate_archs)
    return (
        (len(cfg.static_methods) if "static" in on else 0)
        + (archs if "emr" in on else 0)
        + ((len(tsv_fractions(cfg, n)) + 1) if "tsv" in on else 0)
        + len(m_values) * archs * sum(f"gating_{b}" in on for b in ("avg", "regmean"))
        + (4 * (n - 1) if cfg.scaling and n > 2 else 0)
    )


def run_accuracy_bench(zoo: Zoo, cfg: AccuracyBenchConfig | None = None, progress: bool = True) -> BenchResult:
    """Run every row on ``zoo`` (``cfg`` None: the full grid); returns the typed result (:mod:`server.eval.report`
    renders it)."""
    cfg = cfg or AccuracyBenchConfig()
    unknown = set(cfg.sections) - set(SECTIONS)
    if unknown:
        raise ValueError(f"unknown sections {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
    if not cfg.gate_archs:
        raise ValueError("the accuracy benchmark needs at least one gate architecture (--gate-archs)")
    torch.manual_seed(cfg.seed)
    start = time.perf_counter()
    tasks = list(zoo.tasks)
    depth = len(zoo.build_model(tasks[0]).blocks)  # type: ignore[arg-type]
    m_values = sorted({m for m in cfg.m_values if m <= depth})
    root = Path(cfg.store) if cfg.store else Path(tempfile.mkdtemp(prefix="vitmerge-bench-"))
    store = BundleStore(StoreLayout(root), keep=1_000_000)
    bar = tqdm(
        total=_merges(cfg, len(tasks), m_values), desc=f"bench accuracy {zoo.name}", unit="merge", disable=not progress
    )
    try:
        s = BenchSession(zoo, cfg, store, keep=cfg.store is not None, bar=bar)
        individual, backbone_n, vit_flops = individual_row(s)
        rows = [individual]
        on = set(cfg.sections)
        rows += static_rows(s) if "static" in on else []
        rows += emr_rows(s) if "emr" in on else []
        rows += tsv_rows(s) if "tsv" in on else []
        for base in ("avg", "regmean"):
            rows += gating_rows(s, base, m_values) if f"gating_{base}" in on else []
        scaling = scaling_rows(s, depth) if cfg.scaling and len(tasks) > 2 else []
    finally:
        bar.close()
        if cfg.store is None:
            shutil.rmtree(root, ignore_errors=True)
    return BenchResult(
        zoo=zoo.name,
        preset=zoo.manifest.preset,
        tasks=tasks,
        config=asdict(cfg),
        depth=depth,
        m_values=m_values,
        test_images={t: s.pool.count(t) for t in tasks},
        backbone_M=backbone_n / 1e6,
        vit_gflops=vit_flops / 1e9,
        gates=s.gates,
        rows=rows,
        scaling=scaling,
        seconds=time.perf_counter() - start,
    )
