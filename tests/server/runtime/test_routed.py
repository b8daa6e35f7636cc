"""Routed EMR on the real tiny zoo through the serving Engine: the gate picks the task, EMR modulators do the rest."""

import pytest
import torch

from merging.pipeline import merge_and_publish
from model_store.bundle import BundleStore
from model_store.data.builtin import load_split
from model_store.data.preprocessing import to_model_input
from model_store.settings import StoreLayout
from server.eval.accuracy import evaluate_bundle, evaluate_routed
from server.runtime.bundle_reader import BundleReader
from server.runtime.engine import Engine

pytestmark = pytest.mark.slow  # the demo zoo and a real gate training (~35 s)


LIMIT = 500  # test images per task for the task-given vs routed comparison


@pytest.fixture(scope="module")
def routed_bundle(tiny_zoo_report, tmp_path_factory):
    store = BundleStore(StoreLayout(tmp_path_factory.mktemp("routed")))
    # the default gate (EfficientNet-Lite0, 64 px) for 4 epochs on up to 600 calibration images per task,
    # scored on the first 500 test images per task: measured min 0.978 / mean 0.992 routing accuracy on one CPU,
    # 0.984 / 0.993 on an AMD EPYC; 3 epochs on 500 were too close to the edge (0.932 / 0.977 on the first,
    # mnist 0.778 on the second)
    params = {"gate_epochs": 4, "gate_max_images": 600, "gate_test_images": LIMIT}
    outcome = merge_and_publish(tiny_zoo_report.zoo, store, "emr_routed", params, progress=False)
    return BundleReader(store.load(outcome.version))


def test_gate_accuracy_is_recorded_and_high(routed_bundle):
    acc = routed_bundle.bundle.manifest.extra.gate_test_accuracy
    assert acc is not None and set(acc) == set(routed_bundle.tasks)
    # measured: >= 0.975 per task with EfficientNet-Lite0 (ImageNet init), 64 px, 10 epochs (the default)
    print("gate test accuracy:", {k: round(v, 3) for k, v in acc.items()})
    assert sum(acc.values()) / len(acc) > 0.95 and min(acc.values()) > 0.9, acc
    assert routed_bundle.spec.gate is not None and routed_bundle.spec.gate.test_accuracy == acc


def test_routed_emr_is_close_to_task_given_emr(routed_bundle):
    engine = Engine(routed_bundle.bundle)
    given = evaluate_bundle(engine, limit=LIMIT)
    result = evaluate_routed(engine, limit=LIMIT, batch_size=64)
    print("\ntask-given EMR:", {k: round(v, 4) for k, v in given.items()})
    print(
        "routed EMR    :",
        {k: round(v["routed"], 4) for k, v in result.items()},
        "gate:",
        {k: round(v["gate"], 4) for k, v in result.items()},
    )
    for task in routed_bundle.tasks:
        # an image the gate routes right is scored by the same EMR model as with the task given:
        # routed loses at most the misrouted share, and gains nothing
        gate = result[task]["gate"]
        assert given[task] - (1 - gate) - 0.005 <= result[task]["routed"] <= given[task] + 1e-9, (
            task,
            result[task],
            given[task],
        )
    mean_given = sum(given.values()) / len(given)
    mean_routed = sum(v["routed"] for v in result.values()) / len(result)
    assert mean_routed > mean_given - 0.05, (mean_routed, mean_given)


def test_named_task_skips_the_gate_and_mixed_batches_route_per_image(routed_bundle):
    engine = Engine(routed_bundle.bundle)
    xs, gs = [], []
    for task in routed_bundle.tasks:
        data = load_split(task, "test", limit=4)
        xs.append(to_model_input(data.images, routed_bundle.preprocessing))
        gs.append(to_model_input(data.images, routed_bundle.gate_preprocessing))
    x, g = torch.cat(xs), torch.cat(gs)
    batch = engine.predict(x, [None] * len(x), g)
    for i in range(len(x)):
        alone = engine.predict(x[i : i + 1], [None], g[i : i + 1])[0]
        assert alone.task == batch[i].task
        assert torch.allclose(alone.probabilities, batch[i].probabilities, atol=1e-5)
    given = engine.predict(x[:4], [engine.task_index("animals")] * 4)
    assert [o.task for o in given] == [1, 1, 1, 1] and all(
        o.task_probability == 1 and o.source == "given" for o in given
    )
    assert given[0].probabilities.shape == (10,)
