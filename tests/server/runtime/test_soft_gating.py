"""Soft per-image gating against an oracle that does not use the gated code: image b runs with
``W(x_b) = sum_i p_i(x_b) W_i`` (SPEC section 3), so

* a gated linear layer gives ``sum_i p_i (W_i x + b_i)``, computed here from the expert tensors directly;
* the whole gated ViT gives, for each image, what timm's own ViT gives with the weights mixed by ``p`` of
  that image (plain arithmetic on the fine-tuned models' tensors).

``p`` is soft (every expert weighted) and seeded: one-hot checks cannot see how ``p`` mixes the experts
(``p^2 / sum p^2`` and ``p`` agree on one-hot rows). ``mix`` (mixed weights) equals ``experts`` (mixed outputs).
"""

from __future__ import annotations

import pytest
import torch

from merging import weight_average
from merging.gating.plan import expert_stacks, gating_plan
from model_store.architecture import build_model
from model_store.data.builtin import load_split
from model_store.data.preprocessing import to_model_input
from model_store.zoo import Zoo
from server.runtime.gated_vit import GatedLinear, GatedViT, Routing


def _soft(batch: int, n: int, seed: int) -> torch.Tensor:
    """Seeded routing weights, every one well above 0 (no expert is one-hot or dropped)."""
    p = torch.softmax(0.5 * torch.randn(batch, n, generator=torch.Generator().manual_seed(seed)), -1)
    assert float(p.min()) > 0.05
    return p


@pytest.mark.parametrize("mode", ["mix", "experts"])
@pytest.mark.parametrize("bias", [True, False])
def test_gated_linear_with_soft_p_is_the_p_weighted_sum_of_the_experts_outputs(mode, bias):
    g = torch.Generator().manual_seed(7)
    n, out_f, in_f = 3, 6, 5
    w, b = torch.randn(n, out_f, in_f, generator=g), torch.randn(n, out_f, generator=g) if bias else None
    x, p = torch.randn(4, 7, in_f, generator=g), _soft(4, n, 8)
    oracle = sum(p[:, i, None, None] * (x @ w[i].T + (b[i] if b is not None else 0)) for i in range(n))
    routing = Routing()
    layer = GatedLinear(w, b, routing, mode)
    routing.p = p
    with torch.inference_mode():  # the serving path (scratch buffer)
        served = layer(x)
    with torch.no_grad():
        plain = layer(x)
    torch.testing.assert_close(served, oracle, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(plain, oracle, atol=1e-5, rtol=1e-5)
    # the sparse pass's groups: images 0-1 mixed, images 2-3 on expert 1 alone (their p is one-hot there)
    p_grouped = torch.cat([p[:2], torch.tensor([[0.0, 1.0, 0.0]] * 2)])
    routing.p, routing.groups = p_grouped, [(slice(0, 2), None), (slice(2, 4), 1)]
    with torch.inference_mode():
        grouped = layer(x)
    want = sum(p_grouped[:, i, None, None] * (x @ w[i].T + (b[i] if b is not None else 0)) for i in range(n))
    torch.testing.assert_close(grouped, want, atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def gated_parts(test_zoo_dir):
    """The `test` zoo gated at m=1 (one block + embeddings and norms): architecture, static and expert tensors."""
    zoo = Zoo.load(test_zoo_dir)
    finetuned = [zoo.backbone(t) for t in zoo.tasks]
    plan = gating_plan(finetuned, 1)
    experts = expert_stacks(finetuned, plan.gated_keys)
    static = {k: v for k, v in weight_average(finetuned).items() if k not in experts}
    heads = [zoo.head(t) for t in zoo.tasks]
    prep = zoo.metas[zoo.tasks[0]].preprocessing
    x = torch.cat([to_model_input(load_split(t, "test", limit=2).images, prep) for t in zoo.tasks])
    return zoo.metas[zoo.base].architecture, static, experts, heads, x


def _oracle(architecture, static, experts, x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Per image: timm's ViT with every gated tensor set to ``sum_i p_i theta_i`` -- no gated code involved."""
    rows = []
    for b in range(x.shape[0]):
        mixed = {k: torch.tensordot(p[b], stack, dims=1) for k, stack in experts.items()}
        model = build_model(architecture, 0)
        model.load_state_dict({**static, **mixed})
        with torch.no_grad():
            rows.append(model.forward_head(model.forward_features(x[b : b + 1]), pre_logits=True)[0])
    return torch.stack(rows)


@pytest.mark.parametrize("mode", ["mix", "experts"])
def test_gated_vit_with_soft_p_is_timm_with_each_images_mixed_weights(gated_parts, mode):
    architecture, static, experts, heads, x = gated_parts
    assert any(k.startswith("blocks.") and k.endswith("weight") and v.ndim == 3 for k, v in experts.items())
    gated = GatedViT(architecture, static, experts, heads, linear_mode=mode)
    p = _soft(x.shape[0], len(heads), 3)
    want = _oracle(architecture, static, experts, x, p)
    torch.testing.assert_close(gated.features(x, p, "exact"), want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(gated.features(x, p, "sparse", 0.0), want, atol=1e-4, rtol=1e-4)  # nothing dropped


def test_mix_equals_experts_on_a_soft_batch(gated_parts):
    architecture, static, experts, heads, x = gated_parts
    p = _soft(x.shape[0], len(heads), 4)
    mix = GatedViT(architecture, static, experts, heads, linear_mode="mix").features(x, p)
    outputs = GatedViT(architecture, static, experts, heads, linear_mode="experts").features(x, p)
    torch.testing.assert_close(mix, outputs, atol=1e-5, rtol=1e-5)
