"""Serving gate speed on CPU with its batch norms folded into the convolutions (``folded_gate``).

Per gate architecture and input size: ms per batch of ``--batch`` images (``inference_mode``,
``channels_last``, the serving engine's layout) for the gate as trained and as the server loads it
(``BundleReader.gate_model``: norms folded when the logits agree), interleaved per repeat, medians;
plus the largest logit difference and the routing (argmax) agreement on the same random inputs.
BN statistics are randomised first (a fresh gate's norms are an identity, which would hide errors).
Writes ``benchmarks/results/gate_fold.{json,md}``.

    .venv/bin/python benchmarks/gate_fold.py [--sizes 64,96] [--batch 32] [--repeats 20]

Feeds BENCHMARKS.md, section
"Low-rank task deltas: TSV-C, TSV-M, TSV routed, one-pass serving (issue 21)" (the gate-fold table).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from model_store.architecture import GATE_ARCHS, build_gate, folded_gate

RESULTS = Path(__file__).resolve().parent / "results"


def _randomise_norms(model: torch.nn.Module, g: torch.Generator) -> None:
    with torch.no_grad():
        for bn in [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]:
            c = bn.num_features
            assert bn.running_mean is not None and bn.running_var is not None
            bn.running_mean.copy_(torch.randn(c, generator=g) * 0.1)
            bn.running_var.copy_(torch.rand(c, generator=g) + 0.5)
            bn.weight.copy_(torch.rand(c, generator=g) + 0.5)
            bn.bias.copy_(torch.randn(c, generator=g) * 0.1)


@torch.inference_mode()
def measure(arch: str, size: int, batch: int, repeats: int) -> dict:
    """Median ms per batch unfolded vs folded, the largest logit difference, the argmax agreement."""
    g = torch.Generator().manual_seed(0)
    gate = build_gate(arch, 5).eval()
    _randomise_norms(gate, g)
    folded = folded_gate(gate, size)
    x = torch.randn(batch, 3, size, size, generator=g).contiguous(memory_format=torch.channels_last)
    want, got = gate(x), folded(x)
    times: dict[str, list[float]] = {"unfolded": [], "folded": []}
    for _ in range(3):
        gate(x), folded(x)
    for i in range(repeats):
        for name, model in (("unfolded", gate), ("folded", folded))[:: 1 if i % 2 else -1]:
            t = time.perf_counter()
            model(x)
            times[name].append((time.perf_counter() - t) * 1000)
    unf, fol = statistics.median(times["unfolded"]), statistics.median(times["folded"])
    return {
        "arch": arch,
        "size": size,
        "folded_norms": folded is not gate,
        "unfolded_ms": unf,
        "folded_ms": fol,
        "speedup": unf / fol,
        "max_abs_logit_diff": float((got - want).abs().max()),
        "argmax_agree": float((got.argmax(1) == want.argmax(1)).float().mean()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="64,96")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    cells = [(a, s) for a in GATE_ARCHS for s in sizes]
    rows = [measure(a, s, args.batch, args.repeats) for a, s in tqdm(cells, desc="gate fold", unit="cell")]
    cmd = f"python benchmarks/gate_fold.py --sizes {args.sizes} --batch {args.batch} --repeats {args.repeats}"
    res = {"command": cmd, "machine": f"{platform.machine()}, {torch.get_num_threads()} threads", "rows": rows}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "gate_fold.json").write_text(json.dumps(res, indent=1))
    lines = [
        f"Command: `{cmd}`; {res['machine']}; ms per batch of {args.batch} (median of {args.repeats}, interleaved).",
        "",
        "| gate | px | as trained (ms) | norms folded (ms) | speed-up | max abs logit diff | same argmax |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['arch']} | {r['size']} | {r['unfolded_ms']:.1f} | {r['folded_ms']:.1f} | {r['speedup']:.2f}× "
            f"| {r['max_abs_logit_diff']:.1e} | {r['argmax_agree']:.0%} |"
        )
    md = "\n".join(lines) + "\n"
    (RESULTS / "gate_fold.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
