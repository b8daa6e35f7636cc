"""Task Singular Vectors (SPEC section 7) on small random layers: the math, exactly."""

import pytest
import torch

from merging.methods.tsv import exact_lowrank, factorise, is_matrix_key, lowrank_rank, tsv_compress, tsv_merge


def _zoo(n: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    base = {
        "blocks.0.attn.qkv.weight": torch.randn(24, 8, generator=g),
        "blocks.0.attn.qkv.bias": torch.randn(24, generator=g),
        "blocks.0.norm1.weight": torch.randn(8, generator=g),
        "patch_embed.proj.weight": torch.randn(8, 1, 2, 2, generator=g),
        "cls_token": torch.randn(1, 1, 8, generator=g),
    }
    tuned = [{k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(n)]
    return base, tuned


def test_matrix_layers_are_the_2d_weights_only():
    base, _ = _zoo()
    assert [k for k, v in base.items() if is_matrix_key(k, v)] == ["blocks.0.attn.qkv.weight"]
    assert lowrank_rank((24, 8), 0.25) == 2 and lowrank_rank((24, 8), 0.01) == 1 and lowrank_rank((24, 8), 1.0) == 8


def test_factors_are_the_best_rank_r_approximation():
    d = torch.randn(24, 8, generator=torch.Generator().manual_seed(1))
    s = torch.linalg.svdvals(d.double())
    for r in (1, 3, 8):
        b, a = factorise(d, r)
        assert b.shape == (24, r) and a.shape == (r, 8)
        # Eckart-Young: the Frobenius error of the top-r truncation is the norm of the dropped singular values
        err = torch.linalg.matrix_norm((d - b @ a).double())
        assert float(err) == pytest.approx(float(s[r:].norm()), abs=1e-5)


def test_tsv_c_at_full_rank_is_every_fine_tuned_model_and_small_tensors_are_the_tasks_own():
    base, tuned = _zoo()
    full = tsv_compress(base, tuned, 1.0)
    for i, model in enumerate(tuned):
        state = full.task_state(i)
        for k in base:
            torch.testing.assert_close(state[k], model[k], atol=1e-5, rtol=0)
    low = tsv_compress(base, tuned, 0.25)
    assert low.ranks == {"blocks.0.attn.qkv.weight": 2}
    b, a = low.factors[1]["blocks.0.attn.qkv.weight"]
    assert b.shape == (24, 2) and a.shape == (2, 8)
    assert torch.equal(low.task_state(1)["blocks.0.norm1.weight"], tuned[1]["blocks.0.norm1.weight"])
    assert low.stored_numbers() == 3 * (2 * (24 + 8) + 24 + 8 + 32 + 8)
    with pytest.raises(ValueError, match="rank fraction"):
        tsv_compress(base, tuned, 0.0)


def test_tsv_m_of_one_model_is_that_model_and_merges_small_tensors_by_the_mean():
    base, tuned = _zoo(n=1)
    one = tsv_merge(base, tuned)
    for k in base:
        torch.testing.assert_close(one[k], tuned[0][k], atol=1e-5, rtol=0)
    base, tuned = _zoo(n=3)
    merged = tsv_merge(base, tuned, alpha=0.5)
    mean = torch.stack([m["cls_token"] for m in tuned]).mean(0)
    torch.testing.assert_close(merged["cls_token"], base["cls_token"] + 0.5 * (mean - base["cls_token"]))
    # r = floor(8 / 3) = 2 per task: the merged delta has rank <= 6 and differs from the plain sum of deltas
    delta = merged["blocks.0.attn.qkv.weight"] - base["blocks.0.attn.qkv.weight"]
    assert int(torch.linalg.matrix_rank(delta.double(), atol=1e-6)) <= 6


def test_exact_lowrank_keeps_each_layers_numerical_rank_and_refuses_full_rank_deltas():
    """LoRA-style deltas (rank 2 on the q rows and rank 1 on the v rows of a fused qkv, rank 3 elsewhere)."""
    g = torch.Generator().manual_seed(3)
    base = {
        "blocks.0.attn.qkv.weight": torch.randn(48, 16, generator=g),
        "blocks.0.mlp.fc1.weight": torch.randn(32, 16, generator=g),
        "blocks.0.mlp.fc1.bias": torch.randn(32, generator=g),
    }

    def lora(m: int, n: int, r: int) -> torch.Tensor:
        return 0.1 * torch.randn(m, r, generator=g) @ torch.randn(r, n, generator=g)

    qkv = torch.zeros(48, 16)
    qkv[:16] += lora(16, 16, 2)
    qkv[32:] += lora(16, 16, 1)
    tuned = [
        {**base, "blocks.0.attn.qkv.weight": base["blocks.0.attn.qkv.weight"] + qkv},  # fc1 untouched
        {**base, "blocks.0.mlp.fc1.weight": base["blocks.0.mlp.fc1.weight"] + lora(32, 16, 3)},
    ]
    tuned[1]["blocks.0.mlp.fc1.bias"] = base["blocks.0.mlp.fc1.bias"] + 0.5  # a trained bias: a small tensor
    deltas = exact_lowrank(base, tuned, names=["a", "b"])
    assert deltas.ranks == {"blocks.0.attn.qkv.weight": 3, "blocks.0.mlp.fc1.weight": 3}
    assert deltas.source == "lora" and deltas.rank_fraction is None
    for i, model in enumerate(tuned):
        state = deltas.task_state(i)
        for key, want in model.items():
            assert (state[key] - want).abs().max().item() < 1e-5, (i, key)
    full = [{**base, "blocks.0.mlp.fc1.weight": base["blocks.0.mlp.fc1.weight"] + 0.1 * torch.randn(32, 16)}]
    with pytest.raises(ValueError, match=r"task 'x': 'blocks.0.mlp.fc1.weight' has rank 16 of 16.*tsv_c"):
        exact_lowrank(base, full, names=["x"])


def test_tsv_c_with_conv_compresses_the_patch_conv_as_a_matrix():
    base, tuned = _zoo()
    plain, conv = tsv_compress(base, tuned, 1.0), tsv_compress(base, tuned, 1.0, conv=True)
    assert "patch_embed.proj.weight" in plain.small[0] and "patch_embed.proj.weight" not in plain.ranks
    assert conv.ranks["patch_embed.proj.weight"] == 4 and "patch_embed.proj.weight" not in conv.small[0]  # 8 x 4
    b, a = conv.factors[0]["patch_embed.proj.weight"]
    assert b.shape == (8, 4) and a.shape == (4, 4)
    for i, model in enumerate(tuned):  # full rank: every model, the conv reshaped back
        state = conv.task_state(i)
        for key, want in model.items():
            assert state[key].shape == want.shape and (state[key] - want).abs().max().item() < 1e-5, key
    half = tsv_compress(base, tuned, 0.5, conv=True)
    assert half.ranks["patch_embed.proj.weight"] == 2 and half.stored_numbers() < conv.stored_numbers()
