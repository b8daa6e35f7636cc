"""RegMean (Jin et al.; SPEC section 1): closed-form merge of linear layers.

For every ``nn.Linear`` of the backbone, with ``G_i = X_i^T X_i / n_i`` the (per-row
mean) Gram matrix of the ``n_i`` inputs that layer sees in model i on unlabeled data of
task i, off-diagonals scaled by ``alpha``::

    W^T = (sum_i G_i)^-1 (sum_i G_i W_i^T)        (torch's y = x W^T convention)

solved with ``torch.linalg.solve`` (a ridge of 1e-6 * mean diagonal is added when the
system is singular). Biases, norms, embeddings and linears without Grams: AvgMean.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from merging.methods.task_vectors import merge_keys
from merging.types import StateDict, Tensors


def backbone_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """Every ``nn.Linear`` of the model except its classifier, by weight key."""
    classifier = model.get_classifier() if hasattr(model, "get_classifier") else None  # type: ignore[operator]
    return {
        f"{name}.weight": m for name, m in model.named_modules() if isinstance(m, nn.Linear) and m is not classifier
    }


@torch.inference_mode()
def collect_grams(model: nn.Module, images: torch.Tensor, batch_size: int = 64) -> dict[str, torch.Tensor]:
    """``X^T X / n`` of the inputs of every backbone linear, over all tokens and images (fp64).

    Divided by the number of rows ``n`` (tokens x images) that built it -- a per-task
    mean, as FusionBench does -- so a task with more calibration images does not
    dominate the merge. Uses forward hooks; images are unlabeled (only the forward pass runs).
    """
    model.eval()
    linears = backbone_linears(model)
    grams: dict[str, torch.Tensor] = {
        k: torch.zeros(m.in_features, m.in_features, dtype=torch.float64) for k, m in linears.items()
    }
    rows = dict.fromkeys(linears, 0)

    def hook(key: str):
        def fn(_module: nn.Module, inputs: tuple[torch.Tensor, ...], _out: torch.Tensor) -> None:
            x = inputs[0].reshape(-1, inputs[0].shape[-1]).double()
            grams[key] += x.T @ x
            rows[key] += x.shape[0]

        return fn

    handles = [m.register_forward_hook(hook(k)) for k, m in linears.items()]
    try:
        for i in range(0, len(images), batch_size):
            model(images[i : i + batch_size])
    finally:
        for h in handles:
            h.remove()
    if not len(images):
        raise ValueError("RegMean needs at least one calibration image")
    return {k: g / max(rows[k], 1) for k, g in grams.items()}


def scale_off_diagonal(gram: torch.Tensor, alpha: float) -> torch.Tensor:
    """``alpha * G`` off the diagonal, ``G`` on it."""
    diag = torch.diag(torch.diagonal(gram))
    return alpha * gram + (1.0 - alpha) * diag


def regmean(
    pretrained: Tensors, finetuned: Sequence[Tensors], grams: Sequence[dict[str, torch.Tensor]], alpha: float = 0.9
) -> StateDict:
    """RegMean merge; ``grams[i]`` maps weight keys to model i's Gram matrices."""
    if len(grams) != len(finetuned):
        raise ValueError(f"need one Gram dict per model ({len(finetuned)}), got {len(grams)}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    keys = merge_keys(finetuned, pretrained)
    out: StateDict = {}
    for key in keys:
        if all(key in g for g in grams) and finetuned[0][key].ndim == 2:
            out[key] = _solve([m[key] for m in finetuned], [scale_off_diagonal(g[key], alpha) for g in grams])
        else:
            out[key] = torch.stack([m[key].float() for m in finetuned]).mean(0)
    return out


def _solve(weights: Sequence[torch.Tensor], grams: Sequence[torch.Tensor]) -> torch.Tensor:
    grams = [g.double() for g in grams]
    lhs = sum(grams)
    rhs = sum(g @ w.double().T for g, w in zip(grams, weights))
    assert isinstance(lhs, torch.Tensor) and isinstance(rhs, torch.Tensor)
    try:
        sol = torch.linalg.solve(lhs, rhs)
    except RuntimeError:
        ridge = 1e-6 * float(torch.diagonal(lhs).mean().clamp(min=1e-12))
        sol = torch.linalg.solve(lhs + ridge * torch.eye(lhs.shape[0], dtype=lhs.dtype), rhs)
    return sol.T.float().contiguous()
