"""GPU: the one-pass low-rank engine vs a plain ViT, fp32 and bf16, batches of 32 and 128 (``gpu_check.sh`` step 2).

The synthetic real-size zoo of ``lowrank_serve.py`` (N = 5 random task models; speed only) merged as the TSV
bundle that met the accuracy goal (f = 0.045, patch conv compressed, EfficientNet-Lite0 gate at 96 px);
shuffled mixed-task batches run through the serving ``Engine`` (CUDA graphs on), task given and routed, and
through one plain timm ViT of the same size, interleaved per batch, medians. bf16 is ``torch.autocast``
around the same code (one engine per dtype, so each captures its CUDA graphs in its own precision); the
agreement of bf16 with fp32 is the share of images whose top-1 class (and routed task) is the same.

    python3 benchmarks/gpu_lowrank.py [--arch vit_b16] [--batches 32,128] [--dtypes fp32,bf16] [--rounds 10]
        [--device cuda] [--out DIR]

Writes DIR/gpu_lowrank.{json,md} (default benchmarks/results).

Feeds BENCHMARKS.md, section "The GPU run: benchmarks/gpu_check.sh (prepared, not yet run)".
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from merging.synthetic import ARCHS, mixed_batches, publish_synthetic, synthetic_gate, synthetic_zoo
from model_store.architecture import build_model
from model_store.bundle import BundleStore
from model_store.settings import StoreLayout
from server.runtime.engine import Engine

RESULTS = Path(__file__).resolve().parent / "results"

TARGET_AGREEMENT = 0.999


def precision(dtype: str, device: torch.device) -> contextlib.AbstractContextManager:
    """fp32 as is, bf16 by autocast."""
    if dtype == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", choices=sorted(ARCHS), default="vit_b16")
    ap.add_argument("--tasks", type=int, default=5)
    ap.add_argument("--batches", default="32,128")
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--agreement-batches", type=int, default=8, help="mixed batches of 128 for the bf16 agreement")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    device = torch.device(args.device)
    arch, size = ARCHS[args.arch]
    dtypes = args.dtypes.split(",")
    zoo = synthetic_zoo(arch, args.tasks, 0)
    base, _, heads = zoo
    gate, gate_pool = synthetic_gate(args.tasks, 96, 0)
    rows, agreement = [], {}
    with tempfile.TemporaryDirectory() as tmp, torch.inference_mode():
        store = BundleStore(StoreLayout(Path(tmp)))
        version = publish_synthetic(store, "lowrank", arch, size, zoo, gate, 0.045, True, 96)
        engines = {d: Engine(store.load(version), device) for d in dtypes}
        plain = build_model(engines[dtypes[0]].models.architecture, 10).to(device).eval()
        plain.load_state_dict({**base, "head.weight": heads[0]["head.weight"], "head.bias": heads[0]["head.bias"]})
        for batch in (int(b) for b in args.batches.split(",")):
            batches = mixed_batches(args.tasks, size, gate_pool, batch, 2, batch)
            configs = {}
            for d in dtypes:
                e = engines[d]
                configs[f"plain ViT, {d}"] = (d, lambda b: plain(b["x"].to(device)))
                configs[f"TSV f=0.045 conv, task given, {d}"] = (d, lambda b, e=e: e.predict(b["x"], b["t"]))
                configs[f"TSV f=0.045 conv, routed, {d}"] = (
                    d,
                    lambda b, e=e: e.predict(b["x"], [None] * len(b["t"]), b["g"]),
                )
            for d, fn in configs.values():  # warm-up: graphs captured, kernels chosen
                with precision(d, device):
                    fn(batches[0])
            times: dict[str, list[float]] = {n: [] for n in configs}
            names = list(configs)
            for r in range(args.rounds):
                for b in batches:
                    for name in names[r % len(names) :] + names[: r % len(names)]:
                        d, fn = configs[name]
                        sync(device)
                        t = time.perf_counter()
                        with precision(d, device):
                            fn(b)
                        sync(device)
                        times[name].append(time.perf_counter() - t)
            for name, secs in times.items():
                d = configs[name][0]
                rows.append(
                    {
                        "config": name,
                        "batch": batch,
                        "img_s": batch / statistics.median(secs),
                        "vs_plain": statistics.median(times[f"plain ViT, {d}"]) / statistics.median(secs),
                    }
                )
                print(json.dumps(rows[-1]), flush=True)
        if "bf16" in dtypes and "fp32" in dtypes:
            agreement = agree(engines["fp32"], engines["bf16"], plain, gate_pool, args, size, device)
    res = {
        "command": " ".join(["python", *sys.argv]),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else str(device),
        "torch": torch.__version__,
        "arch": args.arch,
        "rows": rows,
        "bf16_agreement": agreement,
        "target_agreement": TARGET_AGREEMENT,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_lowrank.json").write_text(json.dumps(res, indent=1))
    md = render(res)
    (args.out / "gpu_lowrank.md").write_text(md)
    print(md)
    return 0 if not agreement or all(v >= TARGET_AGREEMENT for v in agreement.values()) else 1


def agree(fp32: Engine, bf16: Engine, plain, gate_pool, args, size: int, device: torch.device) -> dict[str, float]:
    """Share of images with the same top-1 class (and task) in bf16 as in fp32, over mixed batches of 128."""
    same = {"engine, task given": 0, "engine, routed (task and class)": 0, "plain ViT": 0}
    total = 0
    for b in mixed_batches(args.tasks, size, gate_pool, 128, args.agreement_batches, 7):
        routed = [None] * len(b["t"])
        ref_g = fp32.predict(b["x"], b["t"])
        ref_r = fp32.predict(b["x"], routed, b["g"])
        ref_p = plain(b["x"].to(device)).argmax(1)
        with precision("bf16", device):
            got_g = bf16.predict(b["x"], b["t"])
            got_r = bf16.predict(b["x"], routed, b["g"])
            got_p = plain(b["x"].to(device)).argmax(1)
        top = [int(o.probabilities.argmax()) for o in ref_g]
        same["engine, task given"] += sum(int(o.probabilities.argmax()) == k for o, k in zip(got_g, top))
        same["engine, routed (task and class)"] += sum(
            u.task == v.task and int(u.probabilities.argmax()) == int(v.probabilities.argmax())
            for u, v in zip(ref_r, got_r)
        )
        same["plain ViT"] += int((ref_p == got_p).sum())
        total += len(b["t"])
    return {k: v / total for k, v in same.items()}


def render(res: dict) -> str:
    lines = [f"Command: `{res['command']}`; {res['device']}, torch {res['torch']}; {res['arch']}, CUDA graphs on.", ""]
    lines += ["| configuration | batch | img/s | vs plain ViT (same dtype) |", "|---|---|---|---|"]
    lines += [f"| {r['config']} | {r['batch']} | {r['img_s']:.0f} | {r['vs_plain']:.2f}× |" for r in res["rows"]]
    if res["bf16_agreement"]:
        lines += ["", f"bf16 top-1 agreement with fp32 (target ≥ {100 * res['target_agreement']:.1f}%):", ""]
        lines += [f"- {k}: {100 * v:.2f}%" for k, v in res["bf16_agreement"].items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
