"""Task vectors and the checks every merge shares."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from merging.types import StateDict, Tensors


def merge_keys(finetuned: Sequence[Tensors], pretrained: Tensors | None = None) -> list[str]:
    """Keys merged: every tensor of the backbones (heads are never part of them).

    All models must hold the same keys with the same shapes; anything else raises.
    """
    if not finetuned:
        raise ValueError("need at least one fine-tuned model")
    keys = list(finetuned[0].keys())
    ref = set(keys)
    for i, model in enumerate(list(finetuned[1:]) + ([pretrained] if pretrained is not None else [])):
        if set(model.keys()) != ref:
            diff = sorted(ref.symmetric_difference(model.keys()))[:5]
            raise ValueError(f"model {i + 1} has different tensors than model 0 (e.g. {diff})")
    return keys


def task_vector(pretrained: Tensors, finetuned: Tensors) -> StateDict:
    """``tau = theta_ft - theta_0`` for every tensor (fp32)."""
    return {k: finetuned[k].float() - pretrained[k].float() for k in pretrained}


def stacked_task_vectors(
    pretrained: Tensors, finetuned: Sequence[Tensors], key: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(theta_0[key], stack_i tau_i[key])`` in fp32; reads one tensor per model.

    The stack is preallocated and filled model by model, so the peak is one stack
    plus one input tensor (not two stacks).
    """
    base = pretrained[key].float()
    taus = torch.empty((len(finetuned), *base.shape), dtype=torch.float32)
    for i, model in enumerate(finetuned):
        torch.sub(model[key].float(), base, out=taus[i])
    return base, taus
