"""FS-Merge: a Foldable SuperNet merges differently-initialised ViTs (appendix B; SPEC section 5).

The SuperNet keeps every source ViT's weights frozen and learns, around every
linear map, a *merge* matrix ``M`` (``N*d -> d``) and an *unmerge* matrix ``U``
(``d -> N*d``); skip connections and LayerNorms run in the merged width ``d`` and
the norms' parameters are learned (initialised from the first model). Per block:

    h  = LN1(x);  x_i = U_ln1,i h;   q = sum_i M_q,i (W_q,i x_i + b_q,i)   (k, v alike)
    o  = MHA(q, k, v);  o_i = U_o,i o;   x += sum_i M_proj,i (W_proj,i o_i + b_proj,i)
    h  = LN2(x);  x_i = U_ln2,i h;   a = sum_i M_fc1,i (W_fc1,i x_i + b_fc1,i)
    g  = GELU(a); g_i = U_act,i g;   x += sum_i M_fc2,i (W_fc2,i g_i + b_fc2,i)

with the embedding merged by ``M_emb`` (patch projection, cls and position tokens)
and the final features unmerged per task, ``f_t = U_final,t LN(x)_cls``. Every
``M``/``U`` is a concatenation of diagonals plus a rank-``r`` term (Eq. 12), so
"first" initialisation (``M = [I 0 ..]``, ``U = [I; I; ..]``, low-rank term 0)
selects the first model exactly. Training minimises the global reconstruction
loss (an image of task t reconstructs model t's final features).

Folding gives one ordinary ViT of the original width: ``W' = sum_i M_i W_i U_i``,
``b' = sum_i M_i b_i``, learned norms as they are; ``U_final,t`` is folded into task
t's classifier. Because folding is an exact identity, training evaluates the
SuperNet through its fold (one ViT forward instead of N);
:meth:`FoldableSuperNet.literal_features` runs the SuperNet as written above.

``fs_merge_seq`` merges models one at a time (appendix B.4): stage k merges the
previous merged model (initialised "first") with model k, with the features of
all original models 0..k as targets.
"""

from __future__ import annotations

import functools
import operator
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import cast

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Attention, Block, VisionTransformer
from torch import nn
from torch.func import functional_call

from merging.different_init.feature_data import FeatureSet, FitConfig, fit
from merging.types import StateDict, Tensors


class FoldMap(nn.Module):
    """A merge (``N*d -> d``) or unmerge (``d -> N*d``) matrix: concatenated diagonals + low rank.

    Block ``i`` (the ``d x d`` part acting on model i) is ``diag(diag[i]) + lo_i @ hi`` for
    unmerge and ``diag(diag[i]) + lo @ hi_i`` for merge; the zero-initialised factor
    makes the low-rank term vanish at initialisation.
    """

    def __init__(self, kind: str, n: int, d: int, rank: int, generator: torch.Generator):
        super().__init__()
        if kind not in ("merge", "unmerge"):
            raise ValueError(kind)
        self.kind, self.n, self.d, self.rank = kind, n, d, rank
        diag = torch.zeros(n, d)
        if kind == "merge":
            diag[0] = 1.0  # "first": select model 0
        else:
            diag[:] = 1.0  # every model's features start as the merged ones
        self.diag = nn.Parameter(diag)
        scale = d**-0.5
        if kind == "merge":
            self.lo = nn.Parameter(torch.zeros(d, rank))
            self.hi = nn.Parameter(torch.randn(rank, n * d, generator=generator) * scale)
        else:
            self.lo = nn.Parameter(torch.zeros(n * d, rank))
            self.hi = nn.Parameter(torch.randn(rank, d, generator=generator) * scale)

    def _factors(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        d = self.d
        if self.kind == "merge":
            return self.lo, self.hi[:, i * d : (i + 1) * d]
        return self.lo[i * d : (i + 1) * d], self.hi

    def left(self, i: int, w: torch.Tensor) -> torch.Tensor:
        """``block_i @ w`` for ``w`` of shape ``(d, ...)`` (structure-aware, no dense block)."""
        a, b = self._factors(i)
        flat = w.reshape(self.d, -1)
        return (self.diag[i][:, None] * flat + a @ (b @ flat)).reshape(w.shape)

    def right(self, i: int, w: torch.Tensor) -> torch.Tensor:
        """``w @ block_i`` for ``w`` of shape ``(..., d)``."""
        a, b = self._factors(i)
        return w * self.diag[i] + (w @ a) @ b

    def block(self, i: int) -> torch.Tensor:
        """The dense ``d x d`` block of model i."""
        a, b = self._factors(i)
        return torch.diag(self.diag[i]) + a @ b

    def merge(self, xs: Sequence[torch.Tensor]) -> torch.Tensor:
        """``sum_i block_i x_i`` over the last dimension."""
        return sum(x @ self.block(i).T for i, x in enumerate(xs))  # type: ignore[return-value]

    def unmerge(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [x @ self.block(i).T for i in range(self.n)]


def _total(terms: Iterable[torch.Tensor]) -> torch.Tensor:
    """Left-to-right sum of tensors (``sum()`` without its int start)."""
    return functools.reduce(operator.add, terms)


class _FoldMaps(nn.ModuleDict):
    """The SuperNet's maps by name (a ModuleDict whose items are typed :class:`FoldMap`)."""

    def __getitem__(self, key: str) -> FoldMap:
        return cast(FoldMap, super().__getitem__(key))


class _PreLogits(nn.Module):
    def __init__(self, vit: VisionTransformer):
        super().__init__()
        self.vit = vit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.vit.forward_head(self.vit.forward_features(x), pre_logits=True)


def vit_features(template: nn.Module, state: Tensors, x: torch.Tensor) -> torch.Tensor:
    """Pre-logit features of ``template``'s architecture run with the weights ``state``."""
    return functional_call(
        _PreLogits(cast(VisionTransformer, template)), {f"vit.{k}": v for k, v in state.items()}, (x,), strict=False
    )


@dataclass
class TaskSource:
    """Which source model serves a task, and a frozen map from its features to the task's."""

    source: int
    project: torch.Tensor | None = None


class FoldableSuperNet(nn.Module):
    """The global Foldable SuperNet over ``N`` source ViTs (frozen) of one architecture."""

    def __init__(
        self, sources: Sequence[Tensors], template: nn.Module, tasks: Sequence[TaskSource], rank: int = 8, seed: int = 0
    ):
        super().__init__()
        self.sources = [{k: v.detach().float() for k, v in s.items()} for s in sources]
        self.template = cast(VisionTransformer, template.eval())
        for p in self.template.parameters():
            p.requires_grad_(False)
        self.tasks = list(tasks)
        s0 = self.sources[0]
        first = cast(Block, self.template.blocks[0])
        self.depth = len(self.template.blocks)
        self.heads = cast(Attention, first.attn).num_heads
        self.eps = cast(nn.LayerNorm, first.norm1).eps
        self.patch = s0["patch_embed.proj.weight"].shape[-1]
        d, hidden, n = s0["cls_token"].shape[-1], s0["blocks.0.mlp.fc1.weight"].shape[0], len(sources)
        self.dim, self.hidden = d, hidden
        gen = torch.Generator().manual_seed(seed)
        maps = {"emb": FoldMap("merge", n, d, rank, gen), "final": FoldMap("unmerge", n, d, rank, gen)}
        for b in range(self.depth):
            for name, kind, width in (
                ("ln1", "unmerge", d),
                ("q", "merge", d),
                ("k", "merge", d),
                ("v", "merge", d),
                ("o", "unmerge", d),
                ("proj", "merge", d),
                ("ln2", "unmerge", d),
                ("fc1", "merge", hidden),
                ("act", "unmerge", hidden),
                ("fc2", "merge", d),
            ):
                maps[f"{b}_{name}"] = FoldMap(kind, n, width, rank, gen)
        self.maps = _FoldMaps(maps)
        norms = [f"blocks.{b}.norm{j}" for b in range(self.depth) for j in (1, 2)] + ["norm"]
        self.norms = nn.ParameterDict(
            {
                f"{k.replace('.', '_')}_{w}": nn.Parameter(s0[f"{k}.{w}"].clone())
                for k in norms
                for w in ("weight", "bias")
            }
        )

    def _norm(self, key: str) -> tuple[torch.Tensor, torch.Tensor]:
        k = key.replace(".", "_")
        return self.norms[f"{k}_weight"], self.norms[f"{k}_bias"]

    def optimised_parameters(self) -> int:
        return sum(p.numel() for n, p in self.named_parameters() if not n.startswith("template."))

    # -- folding ------------------------------------------------------------------
    def _fold_linear(
        self, w_key: str, b_key: str, m: str, u: str, rows: slice | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        mm, uu = self.maps[m], self.maps[u]
        ws, bs = [], []
        for i, s in enumerate(self.sources):
            w, b = s[w_key], s[b_key]
            if rows is not None:
                w, b = w[rows], b[rows]
            ws.append(mm.left(i, uu.right(i, w)))
            bs.append(mm.left(i, b))
        return _total(ws), _total(bs)

    def fold(self) -> StateDict:
        """The merged ViT's backbone (differentiable in the SuperNet's parameters)."""
        emb = self.maps["emb"]
        out: StateDict = {}
        d = self.dim
        out["patch_embed.proj.weight"] = _total(
            emb.left(i, s["patch_embed.proj.weight"]) for i, s in enumerate(self.sources)
        )
        out["patch_embed.proj.bias"] = _total(
            emb.left(i, s["patch_embed.proj.bias"]) for i, s in enumerate(self.sources)
        )
        out["cls_token"] = _total(s["cls_token"] @ emb.block(i).T for i, s in enumerate(self.sources))
        out["pos_embed"] = _total(s["pos_embed"] @ emb.block(i).T for i, s in enumerate(self.sources))
        for b in range(self.depth):
            p = f"blocks.{b}."
            ws, bs = [], []
            for j, name in enumerate(("q", "k", "v")):
                w, bias = self._fold_linear(
                    p + "attn.qkv.weight", p + "attn.qkv.bias", f"{b}_{name}", f"{b}_ln1", slice(j * d, (j + 1) * d)
                )
                ws.append(w)
                bs.append(bias)
            out[p + "attn.qkv.weight"], out[p + "attn.qkv.bias"] = torch.cat(ws), torch.cat(bs)
            out[p + "attn.proj.weight"], out[p + "attn.proj.bias"] = self._fold_linear(
                p + "attn.proj.weight", p + "attn.proj.bias", f"{b}_proj", f"{b}_o"
            )
            out[p + "mlp.fc1.weight"], out[p + "mlp.fc1.bias"] = self._fold_linear(
                p + "mlp.fc1.weight", p + "mlp.fc1.bias", f"{b}_fc1", f"{b}_ln2"
            )
            out[p + "mlp.fc2.weight"], out[p + "mlp.fc2.bias"] = self._fold_linear(
                p + "mlp.fc2.weight", p + "mlp.fc2.bias", f"{b}_fc2", f"{b}_act"
            )
            for j in (1, 2):
                out[f"{p}norm{j}.weight"], out[f"{p}norm{j}.bias"] = self._norm(f"{p}norm{j}")
        out["norm.weight"], out["norm.bias"] = self._norm("norm")
        return out

    def adapters(self) -> torch.Tensor:
        """``(T, d, d)``: task t's features are ``adapters[t] @ merged features``."""
        final = self.maps["final"]
        out = []
        for t in self.tasks:
            g = final.block(t.source)
            out.append(t.project @ g if t.project is not None else g)
        return torch.stack(out)

    # -- running ------------------------------------------------------------------
    def task_features(self, x: torch.Tensor, task: torch.Tensor) -> torch.Tensor:
        """Each image's reconstruction of its own task's original features (via the fold)."""
        merged = vit_features(self.template, self.fold(), x)
        return torch.einsum("bjd,bd->bj", self.adapters()[task], merged)

    def literal_features(self, x: torch.Tensor) -> torch.Tensor:
        """The merged (cls) features computed by the SuperNet itself, layer by layer, unfolded."""
        m = self.maps
        toks = []
        for s in self.sources:
            pe = (
                F.conv2d(x, s["patch_embed.proj.weight"], s["patch_embed.proj.bias"], stride=self.patch)
                .flatten(2)
                .transpose(1, 2)
            )
            toks.append(torch.cat([s["cls_token"].expand(len(x), -1, -1), pe], 1) + s["pos_embed"])
        h = m["emb"].merge(toks)
        d, nh = self.dim, self.heads
        for b in range(self.depth):
            p = f"blocks.{b}."
            xs = m[f"{b}_ln1"].unmerge(F.layer_norm(h, (d,), *self._norm(p + "norm1"), eps=self.eps))
            qkv = []
            for j, name in enumerate(("q", "k", "v")):
                rows = slice(j * d, (j + 1) * d)
                qkv.append(
                    m[f"{b}_{name}"].merge(
                        [
                            F.linear(xi, s[p + "attn.qkv.weight"][rows], s[p + "attn.qkv.bias"][rows])
                            for xi, s in zip(xs, self.sources)
                        ]
                    )
                )
            q, k, v = (t.reshape(len(x), -1, nh, d // nh).transpose(1, 2) for t in qkv)
            att = ((q @ k.transpose(-2, -1)) * (d // nh) ** -0.5).softmax(-1)
            o = (att @ v).transpose(1, 2).reshape(len(x), -1, d)
            os_ = m[f"{b}_o"].unmerge(o)
            h = h + m[f"{b}_proj"].merge(
                [F.linear(oi, s[p + "attn.proj.weight"], s[p + "attn.proj.bias"]) for oi, s in zip(os_, self.sources)]
            )
            xs = m[f"{b}_ln2"].unmerge(F.layer_norm(h, (d,), *self._norm(p + "norm2"), eps=self.eps))
            a = m[f"{b}_fc1"].merge(
                [F.linear(xi, s[p + "mlp.fc1.weight"], s[p + "mlp.fc1.bias"]) for xi, s in zip(xs, self.sources)]
            )
            gs = m[f"{b}_act"].unmerge(F.gelu(a))
            h = h + m[f"{b}_fc2"].merge(
                [F.linear(gi, s[p + "mlp.fc2.weight"], s[p + "mlp.fc2.bias"]) for gi, s in zip(gs, self.sources)]
            )
        return F.layer_norm(h, (d,), *self._norm("norm"), eps=self.eps)[:, 0]


@dataclass
class FoldedMerge:
    """A merged backbone plus, per task, the matrix folded into its classifier."""

    backbone: StateDict
    adapters: list[torch.Tensor]
    optimised_parameters: int
    history: list[float] = field(default_factory=list)
    seconds: float = 0.0


def fold_head(head: Tensors, adapter: torch.Tensor) -> StateDict:
    """Classifier reading merged features: ``W_t @ G_t`` (bias unchanged)."""
    return {
        k: (v.float() @ adapter if k.endswith("weight") else v.float()).detach().contiguous() for k, v in head.items()
    }


def _train_supernet(net: FoldableSuperNet, data: FeatureSet, cfg: FitConfig, desc: str, progress: bool) -> FoldedMerge:
    start = time.perf_counter()
    params = [p for n, p in net.named_parameters() if not n.startswith("template.")]
    history = fit(params, net.task_features, data, cfg, desc=desc, progress=progress)
    with torch.no_grad():
        backbone = {k: v.detach().clone() for k, v in net.fold().items()}
        adapters = [a.detach().clone() for a in net.adapters()]
    return FoldedMerge(backbone, adapters, net.optimised_parameters(), history, time.perf_counter() - start)


def fs_merge(
    sources: Sequence[Tensors],
    template: nn.Module,
    data: FeatureSet,
    rank: int = 8,
    cfg: FitConfig | None = None,
    progress: bool = False,
) -> FoldedMerge:
    """Global FS-Merge of all ``sources`` at once (task t = source t), folded."""
    cfg = cfg or FitConfig()
    net = FoldableSuperNet(sources, template, [TaskSource(t) for t in range(len(sources))], rank, cfg.seed)
    return _train_supernet(net, data, cfg, "fs_merge", progress)


def fs_merge_seq(
    sources: Sequence[Tensors],
    template: nn.Module,
    data: FeatureSet,
    rank: int = 8,
    cfg: FitConfig | None = None,
    progress: bool = False,
) -> FoldedMerge:
    """FS-Merge seq.: merge the running merged model with one new model per stage."""
    cfg = cfg or FitConfig()
    start = time.perf_counter()
    merged: Tensors = sources[0]
    adapters: list[torch.Tensor] = [torch.eye(sources[0]["cls_token"].shape[-1])]
    history: list[float] = []
    most = 0
    for k in range(1, len(sources)):
        tasks = [TaskSource(0, a) for a in adapters] + [TaskSource(1)]
        net = FoldableSuperNet([merged, sources[k]], template, tasks, rank, cfg.seed + k)
        keep = data.task <= k
        stage = FeatureSet(data.images[keep], data.task[keep], data.targets[keep])
        out = _train_supernet(net, stage, cfg, f"fs_merge_seq {k}/{len(sources) - 1}", progress)
        merged, adapters = out.backbone, out.adapters
        history += out.history
        most = max(most, out.optimised_parameters)
    return FoldedMerge(dict(merged), adapters, most, history, time.perf_counter() - start)


def distill(
    student: Tensors,
    template: nn.Module,
    data: FeatureSet,
    n_tasks: int,
    cfg: FitConfig | None = None,
    progress: bool = False,
) -> FoldedMerge:
    """Knowledge distillation baseline: train ALL weights of ``student`` (the first model, "first"
    initialisation) plus one linear map per task (identity-initialised, folded into the task's
    classifier) on the same features and budget as FS-Merge."""
    cfg = cfg or FitConfig()
    start = time.perf_counter()
    for p in template.parameters():
        p.requires_grad_(False)
    weights = {k: nn.Parameter(v.detach().float().clone()) for k, v in student.items()}
    d = student["cls_token"].shape[-1]
    maps = nn.Parameter(torch.eye(d).repeat(n_tasks, 1, 1))

    def predict(x: torch.Tensor, task: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bjd,bd->bj", maps[task], vit_features(template, weights, x))

    params = [*weights.values(), maps]
    history = fit(params, predict, data, cfg, desc="distill", progress=progress)
    backbone = {k: v.detach().clone() for k, v in weights.items()}
    return FoldedMerge(
        backbone,
        [m.detach().clone() for m in maps],
        sum(p.numel() for p in params),
        history,
        time.perf_counter() - start,
    )
