"""Label-free agreement (issue 33) on the `test` zoo, checked against labels where they exist."""

from __future__ import annotations

import pytest
import torch

from merging.pipeline import merge_and_publish
from model_store.bundle import BundleStore
from model_store.data import attach
from model_store.settings import StoreLayout
from server.eval.accuracy import evaluate_bundle, evaluate_individual
from server.runtime.agreement import agreement_review, measure_agreement, recorded_agreement
from server.runtime.engine import Engine

LIMIT = 200


@pytest.fixture(scope="module")
def avg_engine(test_zoo_report, tmp_path_factory):
    store = BundleStore(StoreLayout(tmp_path_factory.mktemp("agreement")))
    review = agreement_review(test_zoo_report.zoo, LIMIT)
    out = merge_and_publish(test_zoo_report.zoo, store, "avg", {}, progress=False, review=review)
    return Engine(store.load(out.version), "cpu")


def test_agreement_bounds_the_accuracy_gap(avg_engine, test_zoo_report):
    """Two classifiers that agree on a share a of the images differ in accuracy by at most 1 - a."""
    zoo = test_zoo_report.zoo
    rows = {r.task: r for r in measure_agreement(avg_engine, zoo, LIMIT)}
    merged = evaluate_bundle(avg_engine, LIMIT)
    individual = evaluate_individual(avg_engine.models, zoo, LIMIT)
    for task, row in rows.items():
        assert row.split == "test" and row.images == min(LIMIT, len(attach.test_set(zoo, task)))  # type: ignore[arg-type]
        assert row.top1_given is not None and row.top1_routed is None  # a static bundle has no router
        assert abs(merged[task] - individual[task]) <= 1 - row.top1_given + 1e-9  # type: ignore[operator]
        assert row.kl_given is not None and row.kl_given > 0
    assert min(r.top1_given for r in rows.values()) < 1.0  # averaging changes some answers  # type: ignore[type-var]


def test_the_merge_records_what_eval_measures(avg_engine, test_zoo_report):
    recorded = recorded_agreement(avg_engine.bundle)
    assert recorded is not None
    assert recorded == measure_agreement(avg_engine, test_zoo_report.zoo, LIMIT)


def test_routed_agreement_counts_only_images_routed_to_their_task(server_store_template, test_zoo_report):
    engine = Engine(BundleStore(StoreLayout(server_store_template)).load(), "cpu")
    zoo = test_zoo_report.zoo
    for row in measure_agreement(engine, zoo, 64):
        assert row.top1_routed is not None and row.top1_given is not None
        i = engine.task_index(row.task)
        images = attach.test_set(zoo, row.task)
        assert images is not None
        chunk = next(images.chunks(64, 64))
        x, g = engine.prepare(chunk, None)
        routed_here = sum(o.task == i for o in engine.predict(x, [None] * len(x), g))
        assert row.top1_routed <= routed_here / len(x) + 1e-9
        assert torch.isfinite(torch.tensor(row.kl_given))
