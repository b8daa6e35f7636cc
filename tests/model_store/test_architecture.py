"""Gate construction for serving: batch norms folded into the convolutions only when exact."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from model_store.architecture import GATE_ARCHS, build_gate, fold_batchnorm, folded_gate


def _randomise_norms(model: nn.Module, seed: int = 0) -> int:
    """Non-trivial BN statistics and affine parameters (fresh ones are an identity); returns how many."""
    g = torch.Generator().manual_seed(seed)
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        for bn in norms:
            c = bn.num_features
            bn.running_mean.copy_(torch.randn(c, generator=g) * 0.1)
            bn.running_var.copy_(torch.rand(c, generator=g) + 0.5)
            bn.weight.copy_(torch.rand(c, generator=g) + 0.5)
            bn.bias.copy_(torch.randn(c, generator=g) * 0.1)
    return len(norms)


@pytest.mark.parametrize("arch", GATE_ARCHS)
def test_folding_every_gate_norm_keeps_its_logits(arch):
    gate = build_gate(arch, 4).eval()
    norms = _randomise_norms(gate)
    x = torch.randn(3, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        want = gate(x)
        fused = folded_gate(gate, 64)
        got = fused(x)
    assert fused is not gate and norms > 0
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())  # every norm folded
    assert any(isinstance(m, nn.BatchNorm2d) for m in gate.modules())  # the original is untouched
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
    assert torch.equal(got.argmax(1), want.argmax(1))


class _NormFirst(nn.Module):
    """A conv registered before a norm that actually runs FIRST: folding by sibling order is wrong here."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.bn(x)).mean((2, 3))


def test_a_fold_that_changes_the_logits_is_refused():
    model = _NormFirst().eval()
    _randomise_norms(model)
    probe = _NormFirst().eval()
    probe.load_state_dict(model.state_dict())
    assert fold_batchnorm(probe) == 1  # sibling order alone would fold it ...
    x = torch.randn(2, 3, 8, 8)
    with torch.inference_mode():
        assert not torch.allclose(probe(x), model(x), atol=1e-3)  # ... and get it wrong
        assert folded_gate(model, 8) is model  # so the checked fold keeps the original


def test_training_mode_norms_are_never_folded():
    gate = build_gate(GATE_ARCHS[0], 2).train()
    assert fold_batchnorm(gate) == 0
