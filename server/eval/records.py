"""Typed records of the accuracy benchmark: its configuration, one row per method, the gates, accuracy vs N.

``result_format`` versions the JSON ``vitmerge bench accuracy`` writes (``benchmarks/results/accuracy-<zoo>.json``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from model_store.architecture import GATE_ARCHS

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

#: how each gate architecture starts training (shown in the gates table)
GATE_INIT = {"efficientnet_lite0": "ImageNet", "mobilenetv2_100": "scratch"}


@dataclass(frozen=True)
class AccuracyBenchConfig:
    """What the accuracy benchmark runs (defaults: the issue's full grid)."""

    m_values: tuple[int, ...] = (0, 1, 3, 5)
    gate_archs: tuple[str, ...] = GATE_ARCHS
    gate_epochs: int = 10
    gate_size: int = 64
    gate_max_images: int = 1000  # calibration images per task for each gate (the method default)
    limit: int | None = None  # test images per task (None: the whole test split)
    batch_size: int = 64  # routed evaluation: mixed-task batches of this many images
    seed: int = 0
    scaling: bool = True  # accuracy vs N for N = 2..len(tasks)
    scaling_m: int = 3
    static_methods: tuple[tuple[str, str, dict], ...] = STATIC_METHODS
    tsv_fractions: tuple[float, ...] = (0.05, 0.1)  # TSV-C rank fractions besides 1/N (the default)
    sections: tuple[str, ...] = SECTIONS  # which groups of rows run (Individual always does)
    tsv_conv: bool = False  # TSV-C also compresses the patch-embedding conv (tsv_c's `conv` parameter)
    store: str | None = None  # keep every row's bundle in this store (default: a temporary one, deleted)


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid")


class BenchRow(_Record):
    """One method's row: accuracy per task (its pass: task given, or routed by ``gate``), cost, agreement."""

    name: str
    kind: str  # the merge method (``individual`` for the zoo's own models)
    accuracy: dict[str, float]
    stored_M: float = Field(description="parameters stored, millions (EMR masks: 1/32 parameter per bit)")
    gflops: float = Field(description="GFLOPs of one image through Engine.predict (routed rows: the gate too)")
    agreement: dict[str, float | None] = Field(
        default_factory=dict, description="per task: top-1 agreement with the task's own model, same pass"
    )
    bundle: str | None = None  # the version the row's numbers come from (in ``config.store``)
    merge_s: float | None = None
    gate: str | None = None
    m: int | None = None
    base: str | None = None
    f: float | None = None
    rescalers: list[float] | None = None


class GateRow(_Record):
    """A gate of the run: cost, training time and the share of each task's test images routed to that task."""

    init: str
    params: int
    flops: float
    train_s: float
    accuracy: dict[str, float]


class ScalingRow(_Record):
    """Accuracy vs the number of tasks: the first ``n`` tasks merged on their own."""

    n: int
    tasks: list[str]
    individual: dict[str, float]
    accuracy: dict[str, dict[str, float]]
    normalised: dict[str, float]


class BenchResult(_Record):
    """Everything one run measured (the JSON file; the markdown and plots are rendered from it)."""

    result_format: Literal[2] = 2
    zoo: str
    preset: str | None
    tasks: list[str]
    config: dict
    depth: int
    m_values: list[int]
    test_images: dict[str, int]
    backbone_M: float
    vit_gflops: float
    gates: dict[str, GateRow]
    rows: list[BenchRow]
    scaling: list[ScalingRow]
    seconds: float

    def row(self, name: str) -> BenchRow:
        return next(r for r in self.rows if r.name == name)

    def find(self, name: str) -> BenchRow | None:
        return next((r for r in self.rows if r.name == name), None)


def average(accs: dict[str, float]) -> float:
    """Mean accuracy over tasks, in %."""
    return 100 * sum(accs.values()) / len(accs)


def normalised(accs: dict[str, float], individual: dict[str, float]) -> float:
    """Mean over tasks of merged / individual accuracy."""
    return sum(accs[t] / individual[t] for t in accs) / len(accs)
