"""The inference engine on real bundles: routing, grouping, caching, strategies."""

import numpy as np
import pytest
import torch
from routed_oracle import RoutedModel

from merging.pipeline import merge_and_publish
from model_store.bundle import BundleStore
from model_store.data.builtin import load_split
from model_store.data.preprocessing import to_model_input
from model_store.devices import resolve_device
from model_store.settings import StoreLayout
from server.runtime.bundle_reader import BundleReader
from server.runtime.engine import Engine, EngineOptions
from server.runtime.weight_cache import WeightCache


def _mixed_batch(engine: Engine, per_task: int = 6):
    xs, gs, truth = [], [], []
    for i, task in enumerate(engine.tasks):
        data = load_split(task, "test", limit=per_task)
        xs.append(to_model_input(data.images, engine.preprocessing))
        if engine.gate_preprocessing is not None:
            gs.append(to_model_input(data.images, engine.gate_preprocessing))
        truth += [i] * per_task
    perm = torch.randperm(len(truth), generator=torch.Generator().manual_seed(0))
    x = torch.cat(xs)[perm]
    g = torch.cat(gs)[perm] if gs else None
    return x, g, [truth[j] for j in perm.tolist()]


@pytest.fixture(scope="module")
def emr_engine(server_store_template):
    store = BundleStore(StoreLayout(server_store_template))
    return Engine(store.load(), EngineOptions(cache_bytes=2**30))


def test_engine_matches_routed_model_gate_and_given(emr_engine):
    x, g, truth = _mixed_batch(emr_engine)
    routed = RoutedModel(BundleReader(emr_engine.bundle))
    out = emr_engine.predict(x, [None] * len(x), g)
    ref = routed.classify(x, g)
    assert [o.task for o in out] == ref.tasks.tolist()
    assert all(o.source == "gate" for o in out)
    for o, logits in zip(out, ref.logits):
        torch.testing.assert_close(o.probabilities, logits.softmax(-1), atol=1e-5, rtol=1e-4)
    # the router's whole p(x) row per image, on the CPU: its argmax is the task, its max the task probability
    p = torch.stack([o.task_probabilities for o in out])
    assert p.device.type == "cpu" and p.shape == (len(x), len(emr_engine.tasks))
    torch.testing.assert_close(p, routed.route(g), atol=1e-5, rtol=1e-4)
    assert p.argmax(1).tolist() == [o.task for o in out] and p.max(1).values.tolist() == [
        o.task_probability for o in out
    ]
    given = emr_engine.predict(x, truth)
    for o, t, xi in zip(given, truth, x):
        assert o.task == t and o.source == "given" and o.task_probability == 1.0
        assert o.task_probabilities.tolist() == [float(i == t) for i in range(len(emr_engine.tasks))]  # one-hot
        alone = routed.classify(xi[None], task=emr_engine.tasks[t]).logits[0].softmax(-1)
        torch.testing.assert_close(o.probabilities, alone, atol=1e-5, rtol=1e-4)


def test_mixed_batch_equals_one_image_batches(emr_engine):
    x, g, truth = _mixed_batch(emr_engine, per_task=3)
    given = [t if i % 2 else None for i, t in enumerate(truth)]
    gate_rows = torch.stack([g[i] for i, t in enumerate(given) if t is None])
    batch = emr_engine.predict(x, given, gate_rows)
    for i, t in enumerate(given):
        alone = emr_engine.predict(x[i : i + 1], [t], None if t is not None else g[i : i + 1])[0]
        assert alone.task == batch[i].task and alone.source == batch[i].source
        torch.testing.assert_close(alone.probabilities, batch[i].probabilities, atol=1e-5, rtol=1e-4)


def test_flat_bit_packing_matches_numpy():
    from model_store.bitpack import pack_mask, unpack_mask

    for n in (1, 7, 8, 9, 1000):
        bits = torch.rand(n) > 0.5
        assert np.array_equal(pack_mask(bits).numpy(), np.packbits(bits.numpy()))
        assert torch.equal(unpack_mask(pack_mask(bits), (n,), torch.float32), bits.float())


def test_weight_cache_budget_and_lru():
    w = {"a": torch.zeros(250)}  # 1000 bytes
    built = []

    def build(k):
        return lambda: (built.append(k), dict(w))[1]

    cache = WeightCache(2500)
    cache.get("x", build("x"))
    cache.get("y", build("y"))
    cache.get("x", build("x"))  # hit, x becomes most recent
    cache.get("z", build("z"))  # evicts y (least recently used)
    assert cache.keys() == ["x", "z"] and cache.nbytes == 2000
    assert built == ["x", "y", "z"] and (cache.hits, cache.misses) == (1, 3)
    zero = WeightCache(0)
    zero.get("x", build("x"))
    zero.get("x", build("x"))
    assert zero.keys() == [] and zero.misses == 2


def test_engine_cache_zero_rebuilds_and_budget_caches(server_store_template):
    store = BundleStore(StoreLayout(server_store_template))
    x, _, truth = _mixed_batch(Engine(store.load(), "cpu"), per_task=2)
    lookups = []
    cold = Engine(store.load(), EngineOptions(cache_bytes=0), on_cache_lookup=lookups.append)
    a = cold.predict(x, truth)
    b = cold.predict(x, truth)
    assert (
        cold.cache.hits == 0 and cold.cache.misses == 2 * len(set(truth)) and cold.resident_bytes()["weight_cache"] == 0
    )
    warm = Engine(store.load(), EngineOptions(cache_bytes=2**30))
    warm.predict(x, truth)
    c = warm.predict(x, truth)
    assert warm.cache.misses == len(set(truth)) and warm.cache.hits == len(set(truth))
    assert lookups == [False] * (2 * len(set(truth)))
    for u, v, w in zip(a, b, c):
        torch.testing.assert_close(u.probabilities, v.probabilities)
        torch.testing.assert_close(u.probabilities, w.probabilities)
    # resident: base + tau + 1-bit masks (+ cache), never N full models when the cache is off
    parts = cold.resident_bytes()
    weights = cold.kind_strategy.tau_flat.numel()
    assert parts["masks"] == len(cold.tasks) * -(-weights // 8)  # 1 bit per weight per task, packed
    assert parts["base"] == parts["tau_unified"] == 4 * weights


@pytest.mark.parametrize("mixing", ["exact", "sparse"])
def test_gated_bundle_per_image_routing(gated_store, mixing):
    store = BundleStore(StoreLayout(gated_store))
    engine = Engine(store.load(), EngineOptions(mixing=mixing, threshold=0.0 if mixing == "sparse" else None))
    x, g, truth = _mixed_batch(engine, per_task=3)
    batch = engine.predict(x, [None] * len(x), g)
    for i in range(len(x)):
        alone = engine.predict(x[i : i + 1], [None], g[i : i + 1])[0]
        assert alone.task == batch[i].task
        torch.testing.assert_close(alone.probabilities, batch[i].probabilities, atol=1e-5, rtol=1e-4)
    routed = RoutedModel(BundleReader(engine.bundle), mixing="exact")
    ref = routed.classify(x, g)
    for o, logits in zip(batch, ref.logits):  # sparse with threshold 0 equals exact
        torch.testing.assert_close(o.probabilities, logits.softmax(-1), atol=1e-5, rtol=1e-4)


def test_static_bundle_needs_a_task(test_zoo_report, tmp_path):
    store = BundleStore(StoreLayout(tmp_path))
    merge_and_publish(test_zoo_report.zoo, store, "avg", progress=False)
    engine = Engine(store.load(), "cpu")
    x, _, truth = _mixed_batch(engine, per_task=2)
    out = engine.predict(x, truth)
    models = BundleReader(engine.bundle)
    for o, t, xi in zip(out, truth, x):
        ref = models.build(engine.tasks[t])(xi[None])[0].softmax(-1)
        torch.testing.assert_close(o.probabilities, ref, atol=1e-5, rtol=1e-4)
    assert not engine.has_gate
    with pytest.raises(ValueError, match="no gate"):
        engine.predict(x[:1], [None], None)


def test_resolve_device():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")


def test_a_format_1_bundle_written_before_the_typed_spec_loads_and_answers_the_same(emr_engine, tmp_path):
    """``model.json`` as the first format-1 bundles wrote it (no mask bit order, no per-task individual
    accuracy, no gate test accuracy) is read by the typed :class:`BundleSpec` and serves identically;
    a model.json of another format or kind is refused with a clear error."""
    import json

    from model_store.errors import BundleIntegrityError

    src = emr_engine.bundle
    old = json.loads((src.path / "model.json").read_text())
    old["bundle_format"] = 1  # a format-1 preprocessing: a square squash
    old["preprocessing"] = {k: old["preprocessing"][k] for k in ("size", "channels", "mean", "std", "interpolation")}
    old["tasks"] = [{"name": t["name"], "class_names": t["class_names"]} for t in old["tasks"]]
    old["emr"].pop("mask_bit_order")
    for key in ("test_accuracy", "holdout_accuracy", "epochs_run"):
        old["gate"].pop(key)
    store = BundleStore(StoreLayout(tmp_path / "old"))

    def publish(spec: dict) -> str:
        draft = store.draft()
        for name in ("base", "tau_unified", "masks", "heads", "gate"):
            draft.add_tensors(name, src.tensors(name))
        draft.add_json("model", spec)
        return store.publish(draft, "emr_routed", tasks=list(emr_engine.tasks))

    publish(old)
    engine = Engine(store.load(), "cpu")
    x, g, truth = _mixed_batch(engine)
    for a, b in zip(engine.predict(x, [None] * len(x), g), emr_engine.predict(x, [None] * len(x), g)):
        assert a.task == b.task
        torch.testing.assert_close(a.probabilities, b.probabilities)
    for bad in ({**old, "bundle_format": 99}, {**old, "kind": "moe"}, {k: v for k, v in old.items() if k != "emr"}):
        version = publish(bad)
        with pytest.raises(BundleIntegrityError, match="unsupported model.json"):
            Engine(store.load(version), "cpu")
