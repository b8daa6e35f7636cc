"""Permutation machinery, MuDSC matching and FS-Merge folding on small random ViTs (no zoo)."""

import pytest
import timm
import torch

from merging.different_init.feature_data import FeatureSet, FitConfig, augment, build_feature_set, pre_logits
from merging.different_init.fs_merge import FoldableSuperNet, TaskSource, fs_merge_seq, vit_features
from merging.different_init.mudsc import collect_activations, match, mudsc_merge
from merging.different_init.permutation import ViTPerm, ViTShape, apply_perm, invert, random_perm

HEADS = 3


def _vit(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    m = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        num_classes=5,
        img_size=16,
        patch_size=4,
        embed_dim=24,
        depth=2,
        num_heads=HEADS,
        in_chans=1,
    ).eval()
    with torch.no_grad():  # larger weights than timm's init so every unit matters
        for name, p in m.named_parameters():
            if "norm" not in name:
                p.normal_(0, 0.3)
    return m


def _split(state):
    return {k: v for k, v in state.items() if not k.startswith("head.")}, {
        k: v for k, v in state.items() if k.startswith("head.")
    }


@pytest.fixture(scope="module")
def vit():
    return _vit(0)


@pytest.fixture(scope="module")
def images():
    return torch.randn(48, 1, 16, 16, generator=torch.Generator().manual_seed(0))


def _permuted_copy(model, seed):
    shape = ViTShape.from_state(model.state_dict(), HEADS)
    perm = random_perm(shape, torch.Generator().manual_seed(seed))
    copy = _vit(99)
    copy.load_state_dict(apply_perm(model.state_dict(), perm, shape))
    return copy, perm, shape


def test_random_permutation_leaves_outputs_unchanged(vit, images):
    copy, perm, shape = _permuted_copy(vit, 1)
    assert not torch.equal(perm.residual, torch.arange(shape.dim)) and not torch.equal(
        perm.mlp[0], torch.arange(shape.hidden)
    )
    heads_moved = perm.qk[0].reshape(HEADS, -1)[:, 0] // shape.head_dim
    assert sorted(heads_moved.tolist()) == list(range(HEADS))  # head-structured
    with torch.no_grad():
        assert (vit(images) - copy(images)).abs().max() < 1e-5
        # undoing it restores the state exactly
        inverse = ViTPerm(
            invert(perm.residual),
            [invert(p) for p in perm.qk],
            [invert(p) for p in perm.v],
            [invert(p) for p in perm.mlp],
        )
        back = apply_perm(copy.state_dict(), inverse, shape)
        assert all(torch.equal(back[k], v) for k, v in vit.state_dict().items())


def test_apply_perm_refuses_unknown_tensors(vit):
    shape = ViTShape.from_state(vit.state_dict(), HEADS)
    with pytest.raises(ValueError, match="unsupported tensors"):
        apply_perm({**vit.state_dict(), "blocks.0.attn.q_norm.weight": torch.ones(8)}, ViTPerm.identity(shape), shape)


@pytest.mark.parametrize("mode", ["align", "zip"])
def test_mudsc_recovers_the_permutation_of_a_permuted_copy(vit, images, mode):
    copy, perm, shape = _permuted_copy(vit, 2)
    acts = [collect_activations(m, images, shape) for m in (vit, copy)]
    (a, ha), (b, hb) = _split(vit.state_dict()), _split(copy.state_dict())
    res = mudsc_merge([a, b], acts, shape, [ha, hb], alpha=0.5, mode=mode)
    assert res.converged
    # model 1's permutation maps the copy back onto the original: perm[found[j]] == j
    assert torch.equal(perm.residual[res.perms[1].residual], torch.arange(shape.dim))
    for blk in range(shape.depth):
        assert torch.equal(perm.mlp[blk][res.perms[1].mlp[blk]], torch.arange(shape.hidden))
        assert torch.equal(perm.qk[blk][res.perms[1].qk[blk]], torch.arange(shape.dim))
        assert torch.equal(perm.v[blk][res.perms[1].v[blk]], torch.arange(shape.dim))
    assert all((res.merged[k] - v).abs().max() < 1e-6 for k, v in a.items())
    merged = _vit(5)
    merged.load_state_dict({**res.merged, **res.heads[1]})
    with torch.no_grad():
        assert (merged(images) - vit(images)).abs().max() < 1e-5


def test_greedy_and_optimal_matching_differ_where_they_should():
    sim = torch.tensor([[0.9, 0.8], [0.85, 0.1]])
    assert match(sim, "align").tolist() == [1, 0]  # 0.8 + 0.85 beats 0.9 + 0.1
    assert match(sim, "zip").tolist() == [0, 1]  # greedy takes 0.9 first


def _supernet(models, n_tasks=None):
    sources = [_split(m.state_dict())[0] for m in models]
    return FoldableSuperNet(sources, _vit(7), [TaskSource(t) for t in range(n_tasks or len(models))], rank=4, seed=0)


def test_untrained_first_supernet_folds_into_the_first_model(images):
    models = [_vit(1), _vit(2), _vit(3)]
    net = _supernet(models)
    first = _split(models[0].state_dict())[0]
    with torch.no_grad():
        folded = net.fold()
        assert all((folded[k] - v).abs().max() < 1e-6 for k, v in first.items())
        assert (vit_features(net.template, folded, images) - pre_logits(models[0], images)).abs().max() < 1e-5
        assert (net.literal_features(images) - pre_logits(models[0], images)).abs().max() < 1e-5


def test_trained_supernet_equals_its_fold(images):
    from merging.different_init.feature_data import fit

    models = [_vit(1), _vit(2)]
    net = _supernet(models)
    data = build_feature_set(models, [images[:16], images[16:32]], copies=1, seed=0)
    history = fit(
        [p for n, p in net.named_parameters() if not n.startswith("template.")],
        net.task_features,
        data,
        FitConfig(epochs=3, lr=1e-2, batch_size=16),
    )
    assert history[-1] < history[0]
    with torch.no_grad():
        folded = net.fold()
        assert (
            folded["blocks.0.mlp.fc1.weight"] - _split(models[0].state_dict())[0]["blocks.0.mlp.fc1.weight"]
        ).abs().max() > 1e-3
        merged = _vit(11)
        merged.load_state_dict({**folded, **_split(models[0].state_dict())[1]})
        literal = net.literal_features(images)
        assert (pre_logits(merged, images) - literal).abs().max() < 1e-4
        # task features of the SuperNet == the folded heads' inputs
        task = torch.tensor([0, 1]).repeat(24)
        assert (
            net.task_features(images, task) - torch.einsum("bjd,bd->bj", net.adapters()[task], literal)
        ).abs().max() < 1e-4


def test_fs_merge_seq_merges_one_model_at_a_time(images):
    models = [_vit(1), _vit(2), _vit(3)]
    data = build_feature_set(models, [images[:8], images[8:16], images[16:24]], copies=1, seed=0)
    out = fs_merge_seq(
        [_split(m.state_dict())[0] for m in models], _vit(7), data, rank=2, cfg=FitConfig(epochs=1, batch_size=16)
    )
    assert len(out.adapters) == 3 and len(out.history) == 2  # two stages, one epoch each
    _vit(8).load_state_dict({**out.backbone, **_split(models[0].state_dict())[1]})  # an ordinary ViT of the same width
    assert isinstance(data, FeatureSet) and len(data) == 48


def test_augment_is_seeded_and_keeps_shapes(images):
    a = augment(images[:4], 3, torch.Generator().manual_seed(1))
    b = augment(images[:4], 3, torch.Generator().manual_seed(1))
    assert a.shape == (12, 1, 16, 16) and torch.equal(a, b) and not torch.equal(a[:4], images[:4])
