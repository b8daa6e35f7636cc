"""Gated whole-ViT merging: exactness of per-image routing, block choice, the gate."""

import pytest
import torch

from merging import layer_similarity, weight_average
from merging.gating.plan import expert_stacks, gating_plan, is_always_gated
from merging.gating.router import GateConfig, train_gate
from merging.methods.similarity import ATTN_KEYS, MLP_KEYS
from model_store.architecture import build_gate
from model_store.data.builtin import load_split
from model_store.data.preprocessing import to_model_input
from model_store.zoo import Zoo
from server.runtime.gated_vit import GatedViT


@pytest.fixture(scope="module")
def zoo(test_zoo_dir):
    return Zoo.load(test_zoo_dir)


@pytest.fixture(scope="module")
def inputs(zoo):
    prep = zoo.metas[zoo.tasks[0]].preprocessing
    xs = [to_model_input(load_split(t, "test", limit=3).images, prep) for t in zoo.tasks]
    return torch.cat(xs)


def _gated_vit(zoo, m, mode="mix"):
    finetuned = [zoo.backbone(t) for t in zoo.tasks]
    plan = gating_plan(finetuned, m)
    experts = expert_stacks(finetuned, plan.gated_keys)
    static = {k: v for k, v in weight_average(finetuned).items() if k not in experts}
    heads = [zoo.head(t) for t in zoo.tasks]
    return GatedViT(zoo.metas[zoo.base].architecture, static, experts, heads, linear_mode=mode), plan, finetuned


@pytest.mark.parametrize("mode", ["mix", "experts"])
@pytest.mark.parametrize("mixing", ["exact", "sparse"])
def test_all_blocks_gated_with_one_hot_p_is_the_fine_tuned_model(zoo, inputs, mode, mixing):
    depth = zoo.metas[zoo.base].architecture.kwargs["depth"]
    gated, plan, _ = _gated_vit(zoo, depth, mode)
    assert len(plan.attn_blocks) == len(plan.mlp_blocks) == depth
    for t, task in enumerate(zoo.tasks):
        p = torch.zeros(len(inputs), len(zoo.tasks))
        p[:, t] = 1.0
        out = gated.classify(inputs, p, mixing)
        with torch.no_grad():
            ref = zoo.build_model(task)(inputs)
        assert max(float((out.logits[i] - ref[i]).abs().max()) for i in range(len(inputs))) < 1e-5


def test_m0_with_one_hot_p_is_avgmean_plus_the_tasks_embeddings_and_norms(zoo, inputs):
    gated, plan, finetuned = _gated_vit(zoo, 0)
    assert plan.attn_blocks == () and all(is_always_gated(k) for k in plan.gated_keys)
    assert any(k.startswith("patch_embed") for k in plan.gated_keys) and "pos_embed" in plan.gated_keys
    avg = weight_average(finetuned)
    for t, task in enumerate(zoo.tasks):
        expected = {k: (finetuned[t][k] if k in plan.gated_keys else v) for k, v in avg.items()}
        model = zoo.build_model(task)
        model.load_state_dict({**expected, **zoo.head(task)})
        p = torch.zeros(len(inputs), len(zoo.tasks))
        p[:, t] = 1.0
        out = gated.classify(inputs, p)
        with torch.no_grad():
            ref = model(inputs)
        assert max(float((out.logits[i] - ref[i]).abs().max()) for i in range(len(inputs))) < 1e-5


@pytest.mark.parametrize("mode", ["mix", "experts"])
def test_mixed_batch_equals_one_image_at_a_time(zoo, inputs, mode):
    gated, _, _ = _gated_vit(zoo, 1, mode)
    p = torch.softmax(3 * torch.randn(len(inputs), len(zoo.tasks), generator=torch.Generator().manual_seed(0)), -1)
    for mixing, threshold in (("exact", 0.0), ("sparse", 0.2), ("sparse", 0.0)):
        batch = gated.features(inputs, p, mixing, threshold)
        single = torch.cat(
            [gated.features(inputs[i : i + 1], p[i : i + 1], mixing, threshold) for i in range(len(inputs))]
        )
        assert torch.allclose(batch, single, atol=1e-5), mixing
    exact = gated.features(inputs, p, "exact")
    assert torch.allclose(gated.features(inputs, p, "sparse", 0.0), exact, atol=1e-5)  # threshold 0 == exact
    one_hot = torch.nn.functional.one_hot(p.argmax(1), len(zoo.tasks)).float()
    assert torch.allclose(
        gated.features(inputs, p, "sparse", 0.99), gated.features(inputs, one_hot, "exact"), atol=1e-5
    )


def test_similarity_ranking_matches_layer_similarity(zoo):
    finetuned = [zoo.backbone(t) for t in zoo.tasks]
    plan = gating_plan(finetuned, 1)
    for kind, suffixes in (("attn", ATTN_KEYS), ("mlp", MLP_KEYS)):
        ranked = plan.similarity[kind]
        direct = {b: layer_similarity(finetuned, [f"blocks.{b}.{s}" for s in suffixes]) for b, _ in ranked}
        assert [b for b, _ in ranked] == sorted(direct, key=lambda b: (direct[b], b))
        assert all(sim == pytest.approx(direct[b]) for b, sim in ranked)
    assert plan.attn_blocks == (ranked_min := plan.similarity["attn"][0][0],) and ranked_min >= 0
    with pytest.raises(ValueError, match="m must be between 0 and the depth"):
        gating_plan(finetuned, 99)


def test_gate_learns_which_task_an_image_comes_from():
    tasks = ["mnist", "animals"]
    from model_store.schema import Preprocessing

    prep = Preprocessing(size=32, channels=3, mean=[0.5] * 3, std=[0.5] * 3)
    calib = [to_model_input(load_split(t, "calibration", limit=300).images, prep) for t in tasks]
    trained = train_gate(calib, GateConfig(epochs=8, batch_size=32, lr=1e-2), progress=False)
    assert trained.holdout_accuracy > 0.85  # measured 0.967 (MobileNetV2 from scratch, 8 epochs, seed 0)
    test = [to_model_input(load_split(t, "test", limit=100).images, prep) for t in tasks]
    from merging.gating.router import gate_accuracy

    acc = gate_accuracy(trained.model, torch.cat(test), torch.cat([torch.full((100,), i) for i in range(2)]))
    assert acc > 0.85, acc  # measured 0.99 on these 200 test images (seed 0)
    with pytest.raises(ValueError, match="unknown gate arch"):
        build_gate("resnet50", 2)


def test_mixing_scratch_is_reused_bounded_and_safe_across_modes(zoo, inputs):
    gated, _, _ = _gated_vit(zoo, 1)
    p = torch.softmax(torch.randn(len(inputs), len(zoo.tasks), generator=torch.Generator().manual_seed(1)), -1)
    first = gated.features(inputs, p)
    held = gated.routing.scratch_bytes
    assert held > 0  # kept for the next batch ...
    assert torch.equal(gated.features(inputs, p), first)  # ... and reusing it changes nothing
    assert gated.routing.scratch_bytes == held
    with torch.no_grad():  # outside inference mode: a fresh (non-inference) buffer, same result
        gated.routing.p = p
        try:
            assert torch.allclose(gated._pre_logits(inputs), first, atol=1e-6)
        finally:
            gated.routing.p = None
    assert torch.allclose(
        gated.double().features(inputs.double(), p.double()).float(), first, atol=1e-5
    )  # dtype change
    gated.float()
    gated.keep_scratch_bytes = 0
    assert torch.allclose(gated.features(inputs, p), first, atol=1e-6) and gated.routing.scratch_bytes == 0


@pytest.mark.parametrize("stride", [4, 2])
def test_gated_patch_embedding_mixes_per_image(stride):
    from torch import nn

    from server.runtime.layers.gated import GatedConv2d
    from server.runtime.layers.routing import Routing

    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(3, 8, 2, 4, 4, generator=g), torch.randn(3, 8, generator=g)
    routing = Routing()
    conv = GatedConv2d(nn.Conv2d(2, 8, 4, stride=stride), w, b, routing)  # stride 4: patch path, 2: all experts
    x, p = torch.randn(5, 2, 16, 16, generator=g), torch.softmax(torch.randn(5, 3, generator=g), -1)
    routing.p = p
    with torch.inference_mode():
        y = conv(x)
    expected = sum(p[:, i, None, None, None] * torch.nn.functional.conv2d(x, w[i], b[i], stride) for i in range(3))
    assert y.shape == expected.shape and torch.allclose(y, expected, atol=1e-5)


@pytest.mark.parametrize("hidden", [0, 8])
def test_backbone_router_head_trains_on_standardised_features_and_folds_them_in(hidden):
    """SPEC section 8's head: features of very different scales per dimension (as a ViT's are); the stored head
    reads raw ``z`` (the standardisation folded into its first layer, exactly), separates the tasks, and the
    same seed gives the same head."""
    from merging.gating.backbone_router import HeadConfig, fold_standardisation, train_head
    from model_store.backbone_router import RouterHead

    g = torch.Generator().manual_seed(0)
    scale = torch.logspace(-3, 3, 12)  # per-dimension scales over six orders of magnitude
    centres = torch.randn(3, 12, generator=g) * 3
    feats = [(centres[t] + torch.randn(40, 12, generator=g)) * scale for t in range(3)]
    cfg = HeadConfig(hidden=hidden, epochs=60, batch_size=16, seed=1)
    trained = train_head(feats, cfg)
    assert trained.holdout_accuracy == 1.0 and trained.epochs_run <= 60
    acc = [float((trained.head(f).argmax(1) == t).float().mean()) for t, f in enumerate(feats)]
    assert min(acc) >= 0.95, acc
    again = train_head(feats, cfg)
    for a, b in zip(trained.head.state_dict().values(), again.head.state_dict().values()):
        assert torch.equal(a, b)
    head = RouterHead(12, 3, hidden)
    z = torch.cat(feats)
    mean, std = z.mean(0), z.std(0)
    want = head((z - mean) / std)
    fold_standardisation(head, mean, std)
    torch.testing.assert_close(head(z), want, atol=1e-4, rtol=1e-4)
