"""Where to dequantize quantized low-rank factors: at load (what the engine does) or inside every pass.

A ViT-S/14 at 56 px (the dinov2-s14 zoo's backbone; random weights, speed only) with N = 5 tasks' random
rank-r factors, run as :class:`~server.runtime.gated_vit.GatedViT` on a shuffled mixed batch (task groups):

* ``at load``: factors dequantized once to float32 (:meth:`BundleReader.lowrank_factors`): the pass is the
  unquantized one;
* ``in pass, 8-bit`` / ``4-bit``: every :class:`LowRankLinear` keeps its int8 codes (4-bit: packed, two per
  byte) and per-row scales and dequantizes ``A_t`` and ``B_t`` of each task group inside every forward.

Timing is interleaved (every configuration runs each round in turn, a different one first each round); the
table gives median ms per batch and the factors' resident bytes.

    .venv/bin/python benchmarks/dequant_probe.py [--ranks 17,57] [--batch 32] [--rounds 30]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from model_store.architecture import build_model
from model_store.quantize import dequantize_rows, quantize_rows
from model_store.schema import Architecture
from server.runtime.gated_vit import GatedViT
from server.runtime.layers.lowrank import LowRankLinear

ARCH = Architecture(timm_name="vit_small_patch14_dinov2", kwargs={"img_size": 56})
TASKS = 5


class InPassLowRankLinear(LowRankLinear):
    """A :class:`LowRankLinear` that holds quantized factors and dequantizes each task group's per pass."""

    def __init__(self, layer: LowRankLinear, bits: int):
        rank = layer.rank
        b, bias = layer.b_aug[:, :, :rank], layer.b_aug[:, :, rank]
        super().__init__(layer.weight.detach(), bias, b.detach(), layer.a.detach(), layer.routing)
        self.bits, self.cols = bits, layer.a.shape[-1]
        self.qa, self.sa = quantize_rows(layer.a.detach(), bits)
        self.qb, self.sb = quantize_rows(b.detach(), bits)
        self.bias_t = bias.detach().clone()
        del self.a, self.b_aug  # only the codes stay resident

    def factors_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qa, self.sa, self.qb, self.sb, self.bias_t))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = self.routing
        hard = [(slice(0, x.shape[0]), r.expert)] if r.expert is not None else r.hard_groups()
        assert hard is not None, "the probe runs task groups"
        in_f, out_f = self.weight.shape[1], self.weight.shape[0]
        x2, shape = x.reshape(-1, in_f), (*x.shape[:-1], out_f)
        per_image = x2.shape[0] // x.shape[0]
        y2 = x2.new_empty(x2.shape[0], out_f)
        h = x2.new_empty(x2.shape[0], self.rank + 1)
        h[:, self.rank] = 1
        for rows, t in hard:
            a_t = dequantize_rows(self.qa[t], self.sa[t], self.bits, self.cols)
            b_t = torch.cat([dequantize_rows(self.qb[t], self.sb[t], self.bits, self.rank), self.bias_t[t, :, None]], 1)
            tokens = slice(rows.start * per_image, rows.stop * per_image)
            torch.mm(x2[tokens], a_t.t(), out=h[tokens, : self.rank])
            torch.mm(h[tokens], b_t.t(), out=y2[tokens])
        return y2.addmm_(x2, self.weight.t()).view(shape)


def synthetic(rank: int, seed: int = 0) -> GatedViT:
    """A ViT-S/14 with random ``W_0``, N tasks' random rank-``rank`` factors and small tensors."""
    torch.manual_seed(seed)
    state = build_model(ARCH, 0).state_dict()
    linear = {k for k, v in state.items() if v.ndim == 2 and k.endswith(".weight") and "blocks" in k}
    static = {k: v for k, v in state.items() if k in linear}
    small = {k: v for k, v in state.items() if k not in linear}
    experts = {k: torch.stack([v + 1e-3 * torch.randn_like(v) for _ in range(TASKS)]) for k, v in small.items()}
    lowrank = {
        k.removesuffix(".weight"): (
            0.02 * torch.randn(TASKS, v.shape[0], rank),
            0.02 * torch.randn(TASKS, rank, v.shape[1]),
        )
        for k, v in static.items()
    }
    heads = [{"head.weight": torch.randn(10, 384) * 0.02, "head.bias": torch.zeros(10)} for _ in range(TASKS)]
    return GatedViT(ARCH, static, experts, heads, lowrank=lowrank)


def in_pass(model: GatedViT, bits: int) -> GatedViT:
    """The same model with every low-rank layer dequantizing inside the pass."""
    import copy

    out = copy.deepcopy(model)
    for name, mod in list(out.vit.named_modules()):
        if isinstance(mod, LowRankLinear):
            parent, _, child = name.rpartition(".")
            setattr(out.vit.get_submodule(parent), child, InPassLowRankLinear(mod, bits))
    for mod in out.vit.modules():  # deepcopy gave each layer its own Routing copy: share the model's again
        if isinstance(mod, LowRankLinear):
            mod.routing = out.routing
    return out


def factor_bytes(model: GatedViT) -> int:
    total = 0
    for mod in model.vit.modules():
        if isinstance(mod, InPassLowRankLinear):
            total += mod.factors_bytes()
        elif isinstance(mod, LowRankLinear):
            total += (mod.a.numel() + mod.b_aug.numel()) * 4
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ranks", default="17,57", help="ranks of every layer (17: f = 0.045, 57: f = 0.15 at 384)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=30)
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, {args.rounds} rounds")
    print("| rank | configuration | median ms/batch | vs at load | factors resident MB |\n|---|---|---|---|---|")
    for rank in [int(r) for r in args.ranks.split(",")]:
        base = synthetic(rank)
        configs = {"at load (float32 in memory)": base, "in pass, 8-bit": in_pass(base, 8)}
        configs["in pass, 4-bit"] = in_pass(base, 4)
        x = torch.randn(args.batch, 3, 56, 56)
        tasks = torch.randperm(args.batch) % TASKS
        p = torch.nn.functional.one_hot(tasks, TASKS).float()
        want = base.features(x, p, "sparse")
        for name, model in configs.items():  # the same answer up to quantization (random factors: loose)
            got = model.features(x, p, "sparse")
            assert got.shape == want.shape and bool(torch.isfinite(got).all()), name
        times: dict[str, list[float]] = {n: [] for n in configs}
        names = list(configs)
        for i in range(args.rounds):
            for name in names[i % len(names) :] + names[: i % len(names)]:
                t0 = time.perf_counter()
                configs[name].features(x, p, "sparse")
                times[name].append(1e3 * (time.perf_counter() - t0))
        ref = statistics.median(times[names[0]])
        for name in names:
            med = statistics.median(times[name])
            print(f"| {rank} | {name} | {med:.1f} | {med / ref:.2f}x | {factor_bytes(configs[name]) / 2**20:.2f} |")


if __name__ == "__main__":
    main()
