"""Each merge method against values computed by hand, and SPEC invariants."""

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from merging import (
    dare,
    emr_merge,
    fisher_merge,
    layer_similarity,
    pack_mask,
    rank_blocks,
    regmean,
    task_arithmetic,
    ties_merge,
    unpack_mask,
    weight_average,
)
from merging.methods.regmean import collect_grams, scale_off_diagonal
from merging.methods.ties import disjoint_mean, topk_magnitude_threshold
from model_store.lazy_tensors import LazySafetensors

T = torch.tensor


def test_weight_average_and_task_arithmetic_by_hand():
    pre = {"w": T([0.0, 1.0, 2.0])}
    ft = [{"w": T([1.0, 1.0, 4.0])}, {"w": T([3.0, 0.0, 2.0])}]
    assert torch.allclose(weight_average(ft)["w"], T([2.0, 0.5, 3.0]))
    # taus: [1,0,2], [3,-1,0] -> sum [4,-1,2]
    assert torch.allclose(task_arithmetic(pre, ft, lam=0.5)["w"], T([2.0, 0.5, 3.0]))
    assert torch.allclose(task_arithmetic(pre, ft, lam=1.0)["w"], T([4.0, 0.0, 4.0]))


def test_ties_trim_elect_disjoint_mean_by_hand():
    pre = {"a": torch.zeros(4), "b": torch.zeros(2)}
    # model 1 tau: a=[ 3, -1, 0.5, 2], b=[-4, 0.1]  -> top 50% of 6 = 3 largest |.|: 4, 3, 2
    # model 2 tau: a=[-1,  2, 1,  -3], b=[ 1, 0.2]  -> top 3: 3, 2, 1 (ties at 1: both 1s kept)
    ft = [{"a": T([3.0, -1.0, 0.5, 2.0]), "b": T([-4.0, 0.1])}, {"a": T([-1.0, 2.0, 1.0, -3.0]), "b": T([1.0, 0.2])}]
    keys = ["a", "b"]
    assert topk_magnitude_threshold(pre, ft[0], keys, 0.5) == pytest.approx(2.0)
    assert topk_magnitude_threshold(pre, ft[1], keys, 0.5) == pytest.approx(1.0)
    out = ties_merge(pre, ft, k=0.5, lam=1.0)
    # trimmed 1: a=[3,0,0,2] b=[-4,0]; trimmed 2: a=[-1,2,1,-3] b=[1,0]
    # elect: a sums [2,2,1,-1] -> signs [+,+,+,-]; b sums [-3,0] -> [-, 0]
    # disjoint mean: a0 = 3 (only +), a1 = 2, a2 = 1, a3 = -3; b0 = -4, b1 = 0
    assert torch.allclose(out["a"], T([3.0, 2.0, 1.0, -3.0]))
    assert torch.allclose(out["b"], T([-4.0, 0.0]))
    assert torch.allclose(ties_merge(pre, ft, k=0.5, lam=0.5)["a"], T([1.5, 1.0, 0.5, -1.5]))


def test_disjoint_mean_averages_only_agreeing_entries():
    trimmed = T([[2.0, -1.0, 0.0], [4.0, 3.0, 0.0], [-1.0, 0.0, 0.0]])
    # sums [5, 2, 0] -> gamma [+, +, 0]; col0 mean(2,4)=3; col1 only 3; col2 nothing -> 0
    assert torch.allclose(disjoint_mean(trimmed), T([3.0, 3.0, 0.0]))


def test_ties_threshold_is_exact_on_a_large_random_vector():
    torch.manual_seed(0)
    pre = {"x": torch.zeros(50_000), "y": torch.zeros(30, 100)}
    ft = {"x": torch.randn(50_000), "y": torch.randn(30, 100)}
    thr = topk_magnitude_threshold(pre, ft, ["x", "y"], 0.2)
    flat = torch.cat([ft["x"].abs(), ft["y"].abs().flatten()])
    k = round(0.2 * flat.numel())
    assert thr == pytest.approx(float(flat.topk(k).values[-1]))
    assert int((flat >= thr).sum()) == k


def test_dare_is_seeded_and_unbiased():
    torch.manual_seed(0)
    pre = {"w": torch.zeros(20_000)}
    ft = [{"w": torch.randn(20_000)}]
    a, b, c = dare(pre, ft, 0.5, seed=1), dare(pre, ft, 0.5, seed=1), dare(pre, ft, 0.5, seed=2)
    assert torch.equal(a[0]["w"], b[0]["w"]) and not torch.equal(a[0]["w"], c[0]["w"])
    kept = a[0]["w"] != 0
    assert 0.45 < kept.float().mean() < 0.55
    assert torch.allclose(a[0]["w"][kept], 2 * ft[0]["w"][kept])
    mean = torch.stack([dare(pre, ft, 0.5, seed=s)[0]["w"] for s in range(200)]).mean(0)
    assert (mean - ft[0]["w"]).abs().mean() < 0.1  # mean of draws -> the original vector
    assert torch.equal(dare(pre, ft, 0.0, seed=0)[0]["w"], ft[0]["w"])


def test_emr_by_hand_including_a_zero_sum_element():
    pre = {"w": torch.zeros(4)}
    ft = [{"w": T([1.0, -2.0, 3.0, 0.0])}, {"w": T([2.0, 1.0, -3.0, 0.0])}]
    m = emr_merge(pre, ft)
    # sums [3, -1, 0, 0] -> gamma [+, -, -(zero sum), -(zero sum)]
    # eps: max |tau| with matching sign: [2, 2, 3, 0] -> tau_uni [2, -2, -3, 0]
    assert torch.equal(m.tau_unified["w"], T([2.0, -2.0, -3.0, 0.0]))
    assert m.masks[0]["w"].tolist() == [True, True, False, False]
    assert m.masks[1]["w"].tolist() == [True, False, True, False]
    # lam_1 = (1+2+3)/(2+2) = 1.5 ; lam_2 = (2+1+3)/(2+3) = 1.2
    assert m.rescalers == pytest.approx([1.5, 1.2])
    assert torch.allclose(m.task_state(0)["w"], T([3.0, -3.0, 0.0, 0.0]))


def _random_models(n, seed=0, shapes=((6, 5), (7,), (3, 4, 2))):
    g = torch.Generator().manual_seed(seed)
    pre = {f"t{j}": torch.randn(s, generator=g) for j, s in enumerate(shapes)}
    ft = [{k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in pre.items()} for _ in range(n)]
    return pre, ft


def test_emr_invariants():
    pre, ft = _random_models(1)
    single = emr_merge(pre, ft)
    for k in pre:
        assert torch.allclose(single.task_state(0)[k], ft[0][k], atol=1e-6)
    pre, ft = _random_models(4, seed=3)
    m = emr_merge(pre, ft)
    for i, model in enumerate(ft):
        masks = m.masks[i]
        tau = {k: model[k] - pre[k] for k in pre}
        # masks are 1 only where tau_i and tau_uni share a sign
        for k in pre:
            on = masks[k]
            assert bool((torch.sign(tau[k][on]) == torch.sign(m.tau_unified[k][on])).all())
        # sum |lam M tau_uni| == sum |tau_i|
        lhs = sum(float((m.rescalers[i] * masks[k] * m.tau_unified[k]).abs().sum()) for k in pre)
        rhs = sum(float(tau[k].abs().sum()) for k in pre)
        assert lhs == pytest.approx(rhs, rel=1e-5)

        # distance to theta_i is no larger than without mask or without rescaler
        def dist(est, model=model):
            return sum(float((est[k] - model[k]).pow(2).sum()) for k in pre) ** 0.5

        full = dist(m.task_state(i))
        no_mask = dist({k: pre[k] + m.rescalers[i] * m.tau_unified[k] for k in pre})
        no_rescale = dist({k: pre[k] + masks[k] * m.tau_unified[k] for k in pre})
        assert full <= no_mask + 1e-6 and full <= no_rescale + 1e-6


@pytest.mark.parametrize("shape", [(1,), (7,), (8,), (3, 5), (64, 33), (2, 3, 4, 5)])
def test_mask_packing_round_trip_is_bit_exact(shape):
    mask = torch.rand(shape, generator=torch.Generator().manual_seed(len(shape))) > 0.5
    packed = pack_mask(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == (mask.numel() + 7) // 8
    assert torch.equal(unpack_mask(packed, shape), mask)
    assert np.array_equal(packed.numpy(), np.packbits(mask.numpy().ravel()))


def test_regmean_equals_direct_least_squares():
    g = torch.Generator().manual_seed(0)
    d_in, d_out = 6, 4
    xs = [torch.randn(50, d_in, generator=g, dtype=torch.float64) for _ in range(3)]
    ws = [torch.randn(d_out, d_in, generator=g) for _ in range(3)]  # torch convention y = x W^T
    pre = {"lin.weight": torch.zeros(d_out, d_in), "lin.bias": torch.zeros(d_out)}
    ft = [{"lin.weight": w, "lin.bias": torch.full((d_out,), float(i))} for i, w in enumerate(ws)]
    grams = [{"lin.weight": x.T @ x} for x in xs]
    out = regmean(pre, ft, grams, alpha=1.0)
    # argmin_W sum_i ||X_i W^T - X_i W_i^T||^2 via one stacked least-squares problem
    X = torch.cat(xs)
    Y = torch.cat([x @ w.double().T for x, w in zip(xs, ws)])
    direct = torch.linalg.lstsq(X, Y).solution.T
    assert torch.allclose(out["lin.weight"].double(), direct, atol=1e-5)
    assert torch.allclose(out["lin.bias"], torch.full((d_out,), 1.0))  # biases: AvgMean


def test_regmean_alpha_scales_only_off_diagonals():
    gram = T([[4.0, 2.0], [2.0, 9.0]])
    assert torch.equal(scale_off_diagonal(gram, 0.5), T([[4.0, 1.0], [1.0, 9.0]]))
    assert torch.equal(scale_off_diagonal(gram, 0.0), T([[4.0, 0.0], [0.0, 9.0]]))
    # alpha = 0 makes RegMean a per-input-feature weighted mean; with equal grams it is the average
    pre = {"l.weight": torch.zeros(2, 2)}
    ft = [{"l.weight": T([[1.0, 2.0], [3.0, 4.0]])}, {"l.weight": T([[3.0, 0.0], [1.0, 0.0]])}]
    out = regmean(pre, ft, [{"l.weight": gram}, {"l.weight": gram}], alpha=0.0)
    assert torch.allclose(out["l.weight"], T([[2.0, 1.0], [2.0, 2.0]]))


def test_collect_grams_sees_every_backbone_linear_but_not_the_head():
    import timm

    model = timm.create_model(
        "vit_tiny_patch16_224", img_size=16, patch_size=4, embed_dim=16, depth=1, num_heads=2, num_classes=3, in_chans=1
    )
    grams = collect_grams(model, torch.randn(5, 1, 16, 16))
    assert set(grams) == {
        "blocks.0.attn.qkv.weight",
        "blocks.0.attn.proj.weight",
        "blocks.0.mlp.fc1.weight",
        "blocks.0.mlp.fc2.weight",
    }
    assert grams["blocks.0.mlp.fc2.weight"].shape == (64, 64)
    g = grams["blocks.0.attn.qkv.weight"]
    assert torch.allclose(g, g.T) and bool((torch.linalg.eigvalsh(g) > -1e-6).all())


def test_fisher_merge_by_hand():
    ft = [{"w": T([1.0, 1.0, 5.0])}, {"w": T([3.0, 2.0, 7.0])}]
    fishers = [{"w": T([1.0, 3.0, 0.0])}, {"w": T([1.0, 1.0, 0.0])}]
    # [ (1+3)/2, (3*1+1*2)/4, no mass -> mean 6 ]
    assert torch.allclose(fisher_merge(ft, fishers)["w"], T([2.0, 1.25, 6.0]))


def test_layer_similarity_and_rank_blocks():
    a = {
        "blocks.0.attn.qkv.weight": T([1.0, 0.0]),
        "blocks.0.attn.proj.weight": T([0.0]),
        "blocks.0.mlp.fc1.weight": T([1.0]),
        "blocks.0.mlp.fc2.weight": T([1.0]),
        "blocks.1.attn.qkv.weight": T([1.0, 1.0]),
        "blocks.1.attn.proj.weight": T([1.0]),
        "blocks.1.mlp.fc1.weight": T([1.0]),
        "blocks.1.mlp.fc2.weight": T([-1.0]),
    }
    b = {k: v.clone() for k, v in a.items()}
    b["blocks.0.attn.qkv.weight"] = T([0.0, 1.0])  # orthogonal -> cos 0
    c = {k: v.clone() for k, v in a.items()}
    assert layer_similarity([a, b], ["blocks.0.attn.qkv.weight"]) == pytest.approx(0.0)
    assert layer_similarity([a, b, c], ["blocks.1.attn.qkv.weight", "blocks.1.attn.proj.weight"]) == pytest.approx(3.0)
    # a-b 0, a-c 1, b-c 0 -> 1 for block 0 attention
    ranked = rank_blocks([a, b, c])
    assert [s.block for s in ranked["attn"]] == [0, 1]
    assert ranked["attn"][0].similarity == pytest.approx(1.0)


def test_streaming_over_lazy_files_equals_in_memory(tmp_path):
    pre, ft = _random_models(3, seed=7)
    save_file(pre, tmp_path / "pre.safetensors")
    for i, m in enumerate(ft):
        save_file(m, tmp_path / f"{i}.safetensors")
    lazy_pre = LazySafetensors(tmp_path / "pre.safetensors")
    lazy_ft = [LazySafetensors(tmp_path / f"{i}.safetensors") for i in range(3)]
    for fn in (
        lambda p, f: task_arithmetic(p, f, 0.4),
        lambda p, f: ties_merge(p, f, 0.3),
        lambda p, f: emr_merge(p, f).task_state(1),
    ):
        a, b = fn(pre, ft), fn(lazy_pre, lazy_ft)
        assert all(torch.equal(a[k], b[k]) for k in pre)


def test_mismatched_models_are_refused():
    pre, ft = _random_models(2)
    ft[1] = {k: v for k, v in ft[1].items() if k != "t0"}
    with pytest.raises(ValueError, match="different tensors"):
        weight_average(ft)
