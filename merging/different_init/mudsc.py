"""MuDSC: merging under dual-space constraints (Xu et al. 2024; SPEC section 5).

For ViTs that share NO initialisation. Every permutation group of the ViT
(:mod:`merging.different_init.permutation`: the residual stream shared by all blocks, per block
the attention heads and the MLP units) gets a unit similarity

    S = alpha * C_w + (1 - alpha) * C_a

``C_a``: Pearson correlation of the units' activations on the same unlabeled
images in every model; ``C_w``: cosine similarity of the units' weights, each unit
represented by its incoming weights with the other groups' current permutations
applied, concatenated with its outgoing weights (Eq. 6). Algorithm 1: start from the
activation-only matching, then sweep the groups in a seeded random order,
recomputing ``C_w`` with the neighbours' current permutations, until no matching
changes or ``max_sweeps``. Attention heads are groups: units are matched inside
every head pair (q/k share one inner permutation, v has its own), then heads by
their mean matched similarity (group alignment).

* **Align**: every model is matched onto the first one (linear assignment), then
  the permuted weights are averaged (Eq. 2).
* **Zip**: models are zipped pairwise in turn: model k is matched to the consensus of
  the models zipped so far (their mean similarity) with ZipIt's greedy rule (most
  similar pair first). Heads use the group-alignment grouping, units inside head
  pairs are zipped greedily (the paper's group zip). Same-model merges are not
  used, so every model keeps one unit per merged unit and LayerNorms stay exact.

Classifier heads are not merged: each task's head is permuted like its model's
residual stream, so it reads the merged features in the right order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

from merging.different_init.permutation import (
    ViTPerm,
    ViTShape,
    apply_perm,
    head_structured,
    permute_head,
    unit_weights,
)
from merging.types import StateDict, Tensors

Mode = Literal["align", "zip"]


@torch.inference_mode()
def collect_activations(
    model: nn.Module, images: torch.Tensor, shape: ViTShape, batch_size: int = 128
) -> dict[str, torch.Tensor]:
    """Unit activations of a timm ViT on ``images`` (rows: samples, columns: units).

    ``residual``: the stream at the input of every norm (all blocks + final), all
    tokens; ``attn.<b>.qk``: q and k outputs stacked as samples; ``attn.<b>.v``;
    ``mlp.<b>``: the GELU outputs.
    """
    model.eval()
    d = shape.dim
    store: dict[str, list[torch.Tensor]] = {}

    def put(name: str, x: torch.Tensor) -> None:
        store.setdefault(name, []).append(x.reshape(-1, x.shape[-1]).float())

    def put_qkv(b: int, o: torch.Tensor) -> None:
        put(f"attn.{b}.qk", torch.cat([o[..., :d], o[..., d : 2 * d]], 0))
        put(f"attn.{b}.v", o[..., 2 * d :])

    hooks = []
    blocks: list[Any] = list(model.blocks)  # type: ignore[arg-type]
    for b, block in enumerate(blocks):
        hooks.append(block.norm1.register_forward_hook(lambda _m, i, _o: put("residual", i[0])))
        hooks.append(block.norm2.register_forward_hook(lambda _m, i, _o: put("residual", i[0])))
        hooks.append(block.attn.qkv.register_forward_hook(lambda _m, _i, o, b=b: put_qkv(b, o)))
        hooks.append(block.mlp.fc2.register_forward_hook(lambda _m, i, _o, b=b: put(f"mlp.{b}", i[0])))
    norm: nn.Module = model.norm  # type: ignore[assignment]
    hooks.append(norm.register_forward_hook(lambda _m, i, _o: put("residual", i[0])))
    try:
        for i in range(0, len(images), batch_size):
            model(images[i : i + batch_size])
    finally:
        for h in hooks:
            h.remove()
    return {k: torch.cat(v) for k, v in store.items()}


def correlation(acts: Sequence[torch.Tensor]) -> torch.Tensor:
    """Pearson correlation between all units of all models, ``(N*U, N*U)``."""
    z = torch.cat(list(acts), 1).double()
    z = z - z.mean(0)
    z = z / z.norm(dim=0).clamp_min(1e-12)
    return (z.T @ z).float()


def cosine(rows: Sequence[torch.Tensor]) -> torch.Tensor:
    """Cosine similarity between all units (rows) of all models, ``(N*U, N*U)``."""
    z = torch.cat(list(rows), 0).double()
    z = z / z.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return (z @ z.T).float()


def match(sim: torch.Tensor, solver: Mode) -> torch.Tensor:
    """Column for every row maximising total similarity: linear assignment or greedy."""
    s = sim.detach().cpu().numpy()
    if solver == "align":
        rows, cols = linear_sum_assignment(s, maximize=True)
        return torch.as_tensor(cols[np.argsort(rows)], dtype=torch.long)
    n = s.shape[0]
    out = np.full(n, -1)
    used = np.zeros(s.shape[1], dtype=bool)
    for flat in np.argsort(-s, axis=None, kind="stable"):
        r, c = divmod(int(flat), s.shape[1])
        if out[r] < 0 and not used[c]:
            out[r], used[c] = c, True
            n -= 1
            if n == 0:
                break
    return torch.as_tensor(out, dtype=torch.long)


def match_heads(
    sim_qk: torch.Tensor, sim_v: torch.Tensor, heads: int, solver: Mode
) -> tuple[torch.Tensor, torch.Tensor]:
    """Group alignment: units inside every head pair, then heads by mean matched similarity."""
    hd = sim_qk.shape[0] // heads
    inner_qk = torch.empty(heads, heads, hd, dtype=torch.long)
    inner_v = torch.empty_like(inner_qk)
    score = torch.empty(heads, heads)
    for a in range(heads):
        for c in range(heads):
            blk = (slice(a * hd, (a + 1) * hd), slice(c * hd, (c + 1) * hd))
            inner_qk[a, c] = match(sim_qk[blk], solver)
            inner_v[a, c] = match(sim_v[blk], solver)
            ar = torch.arange(hd)
            score[a, c] = 0.5 * (sim_qk[blk][ar, inner_qk[a, c]].mean() + sim_v[blk][ar, inner_v[a, c]].mean())
    order = match(score, "align")
    ar = torch.arange(heads)
    return head_structured(order, inner_qk[ar, order]), head_structured(order, inner_v[ar, order])


def _block(sim: torch.Tensor, i: int, j: int, n: int) -> torch.Tensor:
    return sim[i * n : (i + 1) * n, j * n : (j + 1) * n]


def _target(sim: torch.Tensor, k: int, n: int, perms: Sequence[torch.Tensor], mode: Mode) -> torch.Tensor:
    """Similarity of model k's units to the merged units (rows): model 0 (align) or the zipped consensus."""
    if mode == "align":
        return _block(sim, 0, k, n)[perms[0]]
    return torch.stack([_block(sim, j, k, n)[perms[j]] for j in range(k)]).mean(0)


def solve_group(
    sims: dict[str, torch.Tensor], group: str, shape: ViTShape, n_models: int, mode: Mode
) -> list[tuple[torch.Tensor, ...]]:
    """Every model's permutation(s) of ``group`` from its similarity matrices (model 0: identity)."""
    if group.startswith("attn"):
        n = shape.dim
        qk, v = [torch.arange(n)], [torch.arange(n)]
        for k in range(1, n_models):
            pq, pv = match_heads(
                _target(sims["qk"], k, n, qk, mode), _target(sims["v"], k, n, v, mode), shape.heads, mode
            )
            qk.append(pq)
            v.append(pv)
        return list(zip(qk, v))
    sim = next(iter(sims.values()))
    n = sim.shape[0] // n_models
    perms = [torch.arange(n)]
    for k in range(1, n_models):
        perms.append(match(_target(sim, k, n, perms, mode), mode))
    return [(p,) for p in perms]


@dataclass
class MuDSCResult:
    merged: StateDict
    perms: list[ViTPerm]
    heads: list[StateDict]
    sweeps: int
    converged: bool


def _activation_sims(acts: Sequence[dict[str, torch.Tensor]], group: str) -> dict[str, torch.Tensor]:
    if group.startswith("attn"):
        return {u: correlation([a[f"{group}.{u}"] for a in acts]) for u in ("qk", "v")}
    return {group: correlation([a[group] for a in acts])}


def _weight_sims(
    states: Sequence[Tensors], perms: Sequence[ViTPerm], shape: ViTShape, group: str
) -> dict[str, torch.Tensor]:
    reps = [unit_weights(apply_perm(s, p.without(group, shape), shape), shape, group) for s, p in zip(states, perms)]
    return {u: cosine([r[u] for r in reps]) for u in reps[0]}


def _key(group: str, unit: str) -> str:
    return unit if group.startswith("attn") else group


def mudsc_merge(
    states: Sequence[Tensors],
    activations: Sequence[dict[str, torch.Tensor]],
    shape: ViTShape,
    heads: Sequence[Tensors] | None = None,
    alpha: float = 0.5,
    mode: Mode = "align",
    max_sweeps: int = 10,
    seed: int = 0,
) -> MuDSCResult:
    """Match every model's units (Alg. 1) and average the permuted weights (Eq. 2).

    ``activations[i]`` comes from :func:`collect_activations` on the SAME images for
    every model; ``heads[i]`` (optional) is permuted along with model i.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if len(states) != len(activations) or len(states) < 2:
        raise ValueError(f"need >= 2 models with one activation dict each, got {len(states)} and {len(activations)}")
    n_models = len(states)
    groups = shape.groups()
    act_sims = {g: _activation_sims(activations, g) for g in groups}
    perms = [ViTPerm.identity(shape) for _ in states]
    for g in groups:  # P^1 = Psi(C(A))
        for p, new in zip(perms, solve_group(act_sims[g], g, shape, n_models, mode)):
            p.set(g, *new)
    gen = torch.Generator().manual_seed(seed)
    sweeps, converged = 0, alpha == 0.0
    while not converged and sweeps < max_sweeps:
        sweeps += 1
        changed = False
        for gi in torch.randperm(len(groups), generator=gen).tolist():
            g = groups[gi]
            w = _weight_sims(states, perms, shape, g)
            sims = {u: alpha * w[u] + (1.0 - alpha) * act_sims[g][_key(g, u)] for u in w}
            sims = {_key(g, u): s for u, s in sims.items()}
            for p, new in zip(perms, solve_group(sims, g, shape, n_models, mode)):
                if not all(torch.equal(a, b) for a, b in zip(p.get(g), new)):
                    changed = True
                    p.set(g, *new)
        converged = not changed
    permuted = [apply_perm(s, p, shape) for s, p in zip(states, perms)]
    merged = {k: torch.stack([m[k].float() for m in permuted]).mean(0) for k in permuted[0]}
    new_heads = [permute_head(h, p.residual) for h, p in zip(heads, perms)] if heads is not None else []
    return MuDSCResult(merged, perms, new_heads, sweeps, converged)
