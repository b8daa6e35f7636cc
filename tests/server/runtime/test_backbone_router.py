"""The backbone router (SPEC section 8) on real bundles of the `test` zoo: merged by every routed method with
``router=backbone``, served by the Engine, the process worker and the HTTP API.

* ``p(x)`` is ``theta_0``'s patch embedding and blocks ``1..k`` (the zoo's base, run by timm), the CLS token
  and the mean of the patch tokens LayerNorm'd by hand, the stored head applied by hand -- per image, whatever
  else is in the batch;
* ``rerun``: a routed image gets exactly what its routed task's model gives it alone;
* ``shared_prefix``: task t runs ``theta_0`` in the embeddings and blocks ``1..k`` and TSV-C's
  ``W_0 + B_t A_t`` / ``theta_t`` elsewhere, computed here from the zoo.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from test_lowrank import _HostSyncs

from merging.method_index import run_merge
from merging.methods.tsv import is_matrix_key, tsv_compress
from merging.pipeline import merge_and_publish, merge_context, write_bundle
from model_store.architecture import build_model, load_into
from model_store.backbone_router import is_prefix_key
from model_store.bundle import BundleStore
from model_store.data.builtin import load_split
from model_store.data.preprocessing import to_model_input
from model_store.schema import BundleSpec
from model_store.settings import StoreLayout
from server.runtime.bundle_reader import BundleReader
from server.runtime.engine import Engine, EngineOptions
from server.runtime.gated_vit import GatedViT
from server.runtime.strategies import LowRankStrategy

#: the engine's devices under test: CUDA joins where one is present (a lent GPU machine), never in CI
DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]
#: a router that trains in a second on the `test` zoo, scored on 50 test images per task
ROUTER = {
    "router": "backbone",
    "router_k": 1,
    "router_hidden": 0,
    "gate_max_images": 200,
    "gate_test_images": 50,
    "router_epochs": 30,
}
METHODS = {
    "tsv_rerun": ("tsv_routed", {"f": 0.25, **ROUTER}),
    "tsv_shared": (
        "tsv_routed",
        {**ROUTER, "f": 0.25, "conv": True, "router_variant": "shared_prefix", "router_hidden": 16},
    ),
    "emr": ("emr_routed", ROUTER),
    "gating_avg": ("gating_avg", {"m": 1, **ROUTER}),
    "gating_regmean": ("gating_regmean", {"m": 0, "max_images": 32, **ROUTER}),
}


@pytest.fixture(scope="module")
def router_store(test_zoo_report, tmp_path_factory):
    store = BundleStore(StoreLayout(tmp_path_factory.mktemp("backbone-router")), keep=10)
    zoo = test_zoo_report.zoo
    versions = {name: merge_and_publish(zoo, store, m, p, progress=False).version for name, (m, p) in METHODS.items()}
    return store, versions


def _batch(zoo, per_task: int = 4) -> tuple[torch.Tensor, list[int]]:
    """Test images of every task, shuffled (one preprocessing for the whole `test` zoo), and their tasks."""
    prep = zoo.metas[zoo.base].preprocessing
    xs, truth = [], []
    for i, task in enumerate(zoo.tasks):
        assert zoo.metas[task].preprocessing.pixels_equal(prep)
        xs.append(to_model_input(load_split(task, "test", limit=per_task).images, prep))
        truth += [i] * per_task
    perm = torch.randperm(len(truth), generator=torch.Generator().manual_seed(0))
    return torch.cat(xs)[perm], [truth[j] for j in perm.tolist()]


@torch.inference_mode()
def _independent_p(zoo, reader: BundleReader, x: torch.Tensor) -> torch.Tensor:
    """``p(x)`` computed here: the zoo's base as a timm model to block k, pooling and head by hand."""
    spec = reader.router_spec
    base = build_model(zoo.metas[zoo.base].architecture, 0)
    base.load_state_dict(dict(zoo.backbone(zoo.base)))
    base.eval()
    tokens = base.norm_pre(base.patch_drop(base._pos_embed(base.patch_embed(x))))
    for block in base.blocks[: spec.k]:
        tokens = block(tokens)

    def layer_norm(v: torch.Tensor) -> torch.Tensor:
        mean = v.mean(-1, keepdim=True)
        return (v - mean) / torch.sqrt(((v - mean) ** 2).mean(-1, keepdim=True) + 1e-6)

    z = torch.cat([layer_norm(tokens[:, 0]), layer_norm(tokens[:, 1:].mean(1))], -1)
    head = {k.removeprefix("head/"): v for k, v in reader.bundle.tensors("router").items() if k.startswith("head/")}
    if spec.hidden == 0:
        logits = z @ head["net.weight"].T + head["net.bias"]
    else:
        hidden = torch.nn.functional.gelu(z @ head["net.0.weight"].T + head["net.0.bias"])
        logits = hidden @ head["net.2.weight"].T + head["net.2.bias"]
    return logits.softmax(-1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["tsv_rerun", "tsv_shared", "emr", "gating_avg"])
def test_p_is_the_base_prefix_pooled_and_the_head_per_image_whatever_the_batch(
    test_zoo_report, router_store, name, device
):
    store, versions = router_store
    zoo = test_zoo_report.zoo
    engine = Engine(store.load(versions[name]), device)
    assert engine.router_kind == "backbone" and engine.has_router and not engine.has_gate
    x, truth = _batch(zoo)
    x_in, x_gate = engine.prepare(load_split(zoo.tasks[0], "test", limit=2).images, None)
    assert x_gate is None and x_in.shape[0] == 2  # a backbone router reads x itself
    want = _independent_p(zoo, engine.models, x)
    routed = engine.predict(x, [None] * len(x))
    p = torch.stack([o.task_probabilities for o in routed])
    torch.testing.assert_close(p, want, atol=1e-5, rtol=1e-4)
    assert [o.task for o in routed] == p.argmax(1).tolist() and all(o.source == "gate" for o in routed)
    # another composition: reversed, every third image given -- a routed image's p does not change
    order = list(range(len(x)))[::-1]
    given = [truth[j] if i % 3 == 0 else None for i, j in enumerate(order)]
    mixed = engine.predict(x[order], given)
    for i, j in enumerate(order):
        if given[i] is None:
            torch.testing.assert_close(mixed[i].task_probabilities, want[j], atol=1e-5, rtol=1e-4)
            assert mixed[i].task == routed[j].task
            torch.testing.assert_close(mixed[i].probabilities, routed[j].probabilities, atol=1e-5, rtol=1e-4)
        else:
            assert mixed[i].source == "given" and mixed[i].task == given[i]
    alone = engine.predict(x[:1], [None])[0]
    torch.testing.assert_close(alone.task_probabilities, want[0], atol=1e-5, rtol=1e-4)
    spec = engine.models.router_spec
    assert spec.k == 1 and set(spec.test_accuracy) == set(zoo.tasks)
    assert engine.models.bundle.manifest.extra.router_test_accuracy == spec.test_accuracy


def _plain_lowrank(reader: BundleReader, task: int) -> torch.nn.Module:
    """Task ``task``'s plain timm model from the bundle's tensors: ``W_0 + B_t A_t`` where factors exist."""
    b = reader.bundle
    factors, small = b.tensors("factors"), b.tensors("experts")
    state = {
        k: w + (factors[f"{k}.B"][task] @ factors[f"{k}.A"][task]).reshape(w.shape) if f"{k}.B" in factors else w
        for k, w in b.tensors("backbone").items()
    }
    state |= {k: v[task] for k, v in small.items()}
    name = reader.tasks[task]
    return load_into(build_model(reader.architecture, len(reader.class_names[name])), state, reader.head(name)).eval()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["tsv_rerun", "emr", "gating_avg"])
def test_rerun_serves_a_routed_image_exactly_its_routed_task_model(test_zoo_report, router_store, name, device):
    """rerun: blocks 1..k run again with the task's weights -- the routed task's own model (for a gated bundle:
    the gated model mixing with the router's p, as with a gate)."""
    store, versions = router_store
    engine = Engine(store.load(versions[name]), EngineOptions(device, cache_bytes=2**30))
    reader = engine.models
    assert reader.router_spec.variant == "rerun"
    x, truth = _batch(test_zoo_report.zoo)
    routed = engine.predict(x, [None] * len(x))
    given = engine.predict(x, [o.task for o in routed])  # the bundle's answers with the routed task given
    gated = GatedViT.from_bundle(reader) if reader.kind == "gated" else None
    with torch.inference_mode():
        for i, out in enumerate(routed):
            if gated is not None:
                p = out.task_probabilities[None]
                want = gated.classify(x[i : i + 1], p, "sparse", engine.threshold).logits[0].softmax(-1)
            else:
                model = (
                    _plain_lowrank(reader, out.task)
                    if reader.kind == "lowrank"
                    else reader.build(reader.tasks[out.task])
                )
                want = model(x[i : i + 1])[0].softmax(-1)
                torch.testing.assert_close(out.probabilities, given[i].probabilities, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(out.probabilities, want, atol=1e-5, rtol=1e-4)
    assert sum(o.task == t for o, t in zip(routed, truth)) >= len(truth) // 2  # a router that routes, not noise
    parts = engine.resident_bytes()
    # the prefix shares theta_0's tensors the strategy holds (W_0 / EMR's base): only small tensors are its own
    own_limit = {"lowrank": 0.25, "emr": 0.05, "gated": 1.0}[reader.kind]
    model_bytes = sum(v.numel() * 4 for v in reader.task_backbone(reader.tasks[0]).values())
    assert 0 < parts["router"] <= own_limit * model_bytes, parts


@pytest.mark.parametrize("device", DEVICES)
def test_shared_prefix_serves_its_documented_weights(test_zoo_report, router_store, device):
    """shared_prefix: theta_0 in the embeddings and blocks 1..k, TSV-C (f, conv) of the zoo elsewhere; the
    bundle holds no factor or expert for the prefix and the engine runs the prefix once per batch."""
    store, versions = router_store
    zoo = test_zoo_report.zoo
    engine = Engine(store.load(versions["tsv_shared"]), device)
    reader = engine.models
    spec = reader.router_spec
    assert spec.variant == "shared_prefix" and spec.hidden == 16 and spec.theta0_file == "backbone"
    assert isinstance(engine.kind_strategy, LowRankStrategy) and engine.kind_strategy.prefix_blocks == 1
    base = zoo.backbone(zoo.base)
    ref = tsv_compress(base, [zoo.backbone(t) for t in zoo.tasks], 0.25, conv=True)
    prefix = {k for k in base if is_prefix_key(k, 1)}
    assert "patch_embed.proj.weight" in prefix and "blocks.0.attn.qkv.weight" in prefix
    assert reader.spec.lowrank is not None and set(reader.spec.lowrank.ranks) == set(ref.ranks) - prefix
    assert not prefix & {k.rsplit(".", 1)[0] for k in reader.bundle.tensors("factors")}
    assert not prefix & set(reader.bundle.tensors("experts")) and "router" in {
        f.split(".")[0] for f in reader.bundle.manifest.files
    }
    documented = []
    for i, task in enumerate(zoo.tasks):
        state = {k: (base[k] if k in prefix else v) for k, v in ref.task_state(i).items()}
        model = build_model(zoo.metas[task].architecture, len(zoo.metas[task].class_names))
        documented.append(load_into(model, state, zoo.head(task)).eval())
        torch.testing.assert_close(reader.task_backbone(task), state, atol=1e-6, rtol=0)
    x, truth = _batch(zoo)
    given, routed = engine.predict(x, truth), engine.predict(x, [None] * len(x))
    with torch.inference_mode():
        for i, t in enumerate(truth):
            torch.testing.assert_close(
                given[i].probabilities, documented[t](x[i : i + 1])[0].softmax(-1), atol=1e-5, rtol=1e-4
            )
            chosen = documented[routed[i].task](x[i : i + 1])[0].softmax(-1)
            torch.testing.assert_close(routed[i].probabilities, chosen, atol=1e-5, rtol=1e-4)
    assert engine.resident_bytes()["router"] == sum(t.numel() * 4 for t in reader.router_head().state_dict().values())


def _lora_zoo_context(zoo):
    """The `test` zoo's merge context with task models made LoRA-like: theta_0 + a rank-2 delta per matrix layer."""
    ctx = merge_context(zoo, zoo.tasks)
    base = dict(zoo.backbone(zoo.base))
    gen = torch.Generator().manual_seed(0)
    tuned = []
    for task in zoo.tasks:
        own = zoo.backbone(task)
        tuned.append(
            {
                k: w + 0.05 * torch.randn(w.shape[0], 2, generator=gen) @ torch.randn(2, w.shape[1], generator=gen)
                if is_matrix_key(k, w)
                else own[k]
                for k, w in base.items()
            }
        )
    return dataclasses.replace(ctx, finetuned=tuned), tuned


def test_lora_routed_and_gating_regmean_merge_and_serve_with_the_backbone_router(
    test_zoo_report, router_store, tmp_path
):
    store, versions = router_store
    zoo = test_zoo_report.zoo
    x, truth = _batch(zoo)
    regmean = Engine(store.load(versions["gating_regmean"]), "cpu")
    assert regmean.kind == "gated" and regmean.models.router_spec.theta0_file is None
    outs = regmean.predict(x, [None] * len(x))
    p = torch.stack([o.task_probabilities for o in outs])
    torch.testing.assert_close(p, _independent_p(zoo, regmean.models, x), atol=1e-5, rtol=1e-4)
    ctx, tuned = _lora_zoo_context(zoo)
    result = run_merge("lora_routed", ctx, {**ROUTER, "router_hidden": 8})
    assert result.router is not None and result.gate is None and result.lowrank is not None
    lora_store = BundleStore(StoreLayout(tmp_path / "lora"))
    draft = lora_store.draft()
    write_bundle(draft, zoo, zoo.tasks, result)
    engine = Engine(lora_store.load(lora_store.publish(draft, "lora_routed", tasks=zoo.tasks)), "cpu")
    routed = engine.predict(x, [None] * len(x))
    with torch.inference_mode():
        for i, out in enumerate(routed):  # the routed task's LoRA model itself (exact low-rank deltas)
            task = zoo.tasks[out.task]
            model = load_into(
                build_model(zoo.metas[task].architecture, len(zoo.metas[task].class_names)),
                tuned[out.task],
                zoo.head(task),
            )
            torch.testing.assert_close(
                out.probabilities, model.eval()(x[i : i + 1])[0].softmax(-1), atol=1e-5, rtol=1e-4
            )


def test_routed_methods_refuse_what_they_cannot_do(test_zoo_report):
    zoo = test_zoo_report.zoo
    ctx = merge_context(zoo, zoo.tasks)
    with pytest.raises(ValueError, match="router_variant='shared_prefix' needs low-rank task deltas"):
        run_merge("emr_routed", ctx, {**ROUTER, "router_variant": "shared_prefix"})
    with pytest.raises(ValueError, match="router_k=3: the backbone has 2 blocks"):
        run_merge("emr_routed", ctx, {**ROUTER, "router_k": 3})
    with pytest.raises(ValueError, match="router_hidden"):
        run_merge("tsv_routed", ctx, {**ROUTER, "router_hidden": 512})


def test_the_bundle_spec_types_the_router_and_old_bundles_still_load(server_store_template, router_store):
    store, versions = router_store
    raw = BundleReader(store.load(versions["emr"])).spec.model_dump(mode="json")
    assert raw["router"]["kind"] == "backbone" and raw["router"]["format_version"] == 1 and raw["gate"] is None
    assert raw["router"]["theta0_file"] == "base" and raw["router"]["pooling"] == "cls+mean, layernorm"
    old = BundleReader(BundleStore(StoreLayout(server_store_template)).load())  # a gate bundle: unchanged
    assert old.spec.router_kind == "gate" and "router" not in old.bundle.json("model")
    gate = old.spec.model_dump(mode="json")["gate"]
    with pytest.raises(ValidationError, match="a gate or a backbone router, not both"):
        BundleSpec.model_validate({**raw, "gate": gate})
    with pytest.raises(ValidationError, match="shared_prefix needs a lowrank bundle"):
        BundleSpec.model_validate({**raw, "router": {**raw["router"], "variant": "shared_prefix"}})
    with pytest.raises(ValidationError, match="hidden"):
        BundleSpec.model_validate({**raw, "router": {**raw["router"], "hidden": 1024}})


@contextlib.contextmanager
def _syncs_between(start: torch.nn.Module, stop: torch.nn.Module) -> Iterator[list[str]]:
    """The host syncs made from ``start``'s forward to the end of ``stop``'s (every such span of the block)."""
    mode, inside = _HostSyncs(), [False]

    def enter(*_) -> None:
        mode.__enter__()
        inside[0] = True

    def leave(*_) -> None:
        if inside[0]:
            mode.__exit__(None, None, None)
            inside[0] = False

    hooks = [start.register_forward_pre_hook(enter), stop.register_forward_hook(leave)]
    try:
        yield mode.seen
    finally:
        leave()
        for h in hooks:
            h.remove()


@pytest.mark.parametrize("device", DEVICES)
def test_the_routed_pass_makes_no_host_sync_inside_its_layer_loops(router_store, device):
    """rerun: the router runs before the one-pass engine, whose layer loop (patch embedding to final norm)
    makes no host sync. shared_prefix: the pass syncs once between block k and block k+1 (the routed task
    groups' sizes); none in the prefix, none from block k+1 to the final norm."""
    store, versions = router_store
    rerun = Engine(store.load(versions["tsv_rerun"]), EngineOptions(device, cuda_graphs=False))
    vit = rerun.kind_strategy.gated.vit  # type: ignore[attr-defined]
    n, prep = len(rerun.tasks), rerun.preprocessing
    x = torch.randn(8, prep.channels, prep.size, prep.size, device=device)
    with _syncs_between(vit.patch_embed, vit.norm) as seen:
        outs = rerun.predict(x, [None] * 8)
    assert seen == [] and len({o.task for o in outs}) >= 1
    shared = Engine(store.load(versions["tsv_shared"]), EngineOptions(device, cuda_graphs=False))
    vit = shared.kind_strategy.gated.vit  # type: ignore[attr-defined]
    given = [i % n if i % 2 else None for i in range(8)]
    with _syncs_between(vit.patch_embed, vit.blocks[0]) as prefix, _syncs_between(vit.blocks[1], vit.norm) as rest:
        shared.predict(x, given)
    assert prefix == [] and rest == []
    with _HostSyncs() as whole:
        shared.predict(x, given)
    assert whole.seen, "the detector must see the pass's one sync (the task groups' sizes)"


def test_backbone_router_over_http_v1_v2_and_the_process_worker(test_zoo_report, router_store, tmp_path):
    """/v1 and /v2 route without a gate input and report p(x) per image (v2: TASK_PROBABILITIES), through the
    process worker; the answers are the in-process Engine's."""
    import shutil

    from server_helpers import AsgiHarness, png_bytes

    from server.http.settings import ServerSettings

    store, versions = router_store
    root = tmp_path / "store"
    shutil.copytree(store.layout.root, root)
    BundleStore(StoreLayout(root)).set_current(versions["tsv_shared"])
    settings = ServerSettings(store=root, watch_interval_s=0, device="cpu", max_wait_ms=2, worker="process")
    h = AsgiHarness(settings)
    try:
        engine = h.state.manager.engine
        assert type(engine).__name__ == "ProcessEngine" and engine.has_router and not engine.has_gate
        direct = Engine(engine.bundle, "cpu")
        tasks = h.request("GET", "/v1/tasks").json()
        assert tasks["gate"] is True and tasks["router"] == "backbone"
        images = [load_split(t, "test", limit=1).images[0] for t in test_zoo_report.zoo.tasks]
        pngs = [png_bytes(img) for img in images]
        want = direct.predict(torch.stack([direct.preprocess(img, None)[0] for img in images]), [None] * len(images))
        for png, w in zip(pngs, want):
            r = h.request("POST", "/v1/classify", files={"image": ("x.png", png)})
            assert r.status_code == 200, r.text
            task = r.json()["predictions"][0]["task"]
            assert task["source"] == "gate" and task["name"] == direct.tasks[w.task]
            got = [task["probabilities"][t] for t in direct.tasks]
            np.testing.assert_allclose(got, w.task_probabilities.numpy(), atol=1e-5)
        meta = h.request("GET", "/v2/models/vitmerge").json()
        assert meta["parameters"]["router"] == "backbone" and meta["parameters"]["gate"] is True
        assert {"name": "TASK_PROBABILITIES", "datatype": "FP32", "shape": [-1, len(direct.tasks)]} in [
            {k: o[k] for k in ("name", "datatype", "shape")} for o in meta["outputs"]
        ]
        body = {
            "inputs": [
                {
                    "name": "IMAGE",
                    "shape": [len(pngs)],
                    "datatype": "BYTES",
                    "data": [base64.b64encode(p).decode() for p in pngs],
                }
            ],
            "outputs": [{"name": "TASK"}, {"name": "TASK_PROBABILITIES"}],
        }
        r = h.request("POST", "/v2/models/vitmerge/infer", json=body)
        assert r.status_code == 200, r.text
        out = {o["name"]: o for o in r.json()["outputs"]}
        assert out["TASK_PROBABILITIES"]["shape"] == [len(pngs), len(direct.tasks)]
        p = np.array(out["TASK_PROBABILITIES"]["data"], dtype=np.float32).reshape(len(pngs), -1)
        np.testing.assert_allclose(p, torch.stack([w.task_probabilities for w in want]).numpy(), atol=1e-5)
        assert out["TASK"]["data"] == [direct.tasks[w.task] for w in want]
    finally:
        h.close()
