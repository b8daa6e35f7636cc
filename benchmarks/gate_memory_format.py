"""Gate speed on CPU by memory format: the timm gates (EfficientNet-Lite0, MobileNetV2) in
PyTorch's default NCHW layout vs ``channels_last`` (what ``model_store.architecture.build_gate`` returns).

Per architecture and input size: training ms/image (AdamW, batch 32, forward + backward +
step) and inference ms/image (batch 256, ``inference_mode``); same weights, same inputs,
one process, warm-up excluded, best of ``--repeats``. ``--engine`` adds the serving view:
the engine's ``predict`` on mixed-task batches of 32 test images of the tiny zoo, task NOT
given (gate + routed EMR), with the bundle's gate in each format. Writes
``benchmarks/results/gate_memory_format.{json,md}``.

    .venv/bin/python benchmarks/gate_memory_format.py [--sizes 32,64] [--repeats 3] [--engine]
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from model_store.architecture import GATE_ARCHS, build_gate

RESULTS = Path(__file__).resolve().parent / "results"


def _nchw(model: torch.nn.Module) -> torch.nn.Module:
    return model.to(memory_format=torch.contiguous_format)


def _train_ms(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int) -> float:
    model.train()
    opt = torch.optim.AdamW(model.parameters(), 1e-3)

    def step(xb: torch.Tensor, yb: torch.Tensor) -> None:
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(xb), yb).backward()
        opt.step()

    step(x[:batch], y[:batch])
    t = time.perf_counter()
    for i in range(0, len(x), batch):
        step(x[i : i + batch], y[i : i + batch])
    return (time.perf_counter() - t) / len(x) * 1000


@torch.inference_mode()
def _infer_ms(model: torch.nn.Module, x: torch.Tensor) -> float:
    model.eval()
    model(x[:16])
    t = time.perf_counter()
    model(x)
    return (time.perf_counter() - t) / len(x) * 1000


def measure(arch: str, size: int, repeats: int) -> dict[str, float]:
    """Best-of-``repeats`` train / infer ms per image in both formats."""
    torch.manual_seed(0)
    x, y = torch.randn(256, 3, size, size), torch.randint(0, 4, (256,))
    out: dict[str, float] = {}
    for fmt in ("nchw", "channels_last"):
        trains, infers = [], []
        for _ in range(repeats):
            model = build_gate(arch, 4)  # channels_last
            xs = x.contiguous(memory_format=torch.channels_last)
            if fmt == "nchw":
                model, xs = _nchw(model), x.contiguous()
            trains.append(_train_ms(model, xs, y, 32))
            infers.append(_infer_ms(model, xs))
        out[f"train_{fmt}"], out[f"infer_{fmt}"] = min(trains), min(infers)
    return out


def engine_ms(repeats: int, batches: int = 8) -> dict[str, float]:
    """ms per routed batch of 32 through ``Engine.predict`` (tiny zoo, routed EMR, 64 px EfficientNet-Lite0
    gate trained briefly: speed does not depend on its accuracy), gate in NCHW vs channels_last."""
    import tempfile

    from merging.pipeline import merge_and_publish
    from model_store.bundle import BundleStore
    from model_store.data.builtin import load_split
    from model_store.settings import StoreLayout
    from model_store.zoo_build.presets import build_zoo
    from server.runtime.engine import Engine

    work = Path(tempfile.mkdtemp(prefix="gate-engine-"))
    zoo = build_zoo("tiny", work / "zoo", progress=False).zoo
    store = BundleStore(StoreLayout(work / "store"))
    merge_and_publish(
        zoo, store, "emr_routed", {"gate_epochs": 1, "gate_max_images": 50, "gate_test_images": 0}, progress=False
    )
    engine = Engine(store.load(), "cpu")
    images = [img for t in zoo.tasks for img in load_split(t, "test", limit=64).images]
    pairs = [engine.preprocess(img, None) for img in images[: 32 * batches]]
    xs = [torch.stack([x for x, _ in pairs[i : i + 32]]) for i in range(0, len(pairs), 32)]
    gs = [torch.stack([g for _, g in pairs[i : i + 32] if g is not None]) for i in range(0, len(pairs), 32)]
    cl_gate = engine.gate
    assert cl_gate is not None
    out: dict[str, float] = {}
    for fmt in ("nchw", "channels_last"):
        if fmt == "nchw":
            nchw = _nchw(cl_gate)
            engine._gate_run = lambda x, m=nchw: m(x.contiguous())  # type: ignore[misc]
        else:
            engine._gate_run = cl_gate.to(memory_format=torch.channels_last)
        engine.predict(xs[0], [None] * len(xs[0]), gs[0])
        best = float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            for x, g in zip(xs, gs):
                engine.predict(x, [None] * len(x), g)
            best = min(best, (time.perf_counter() - t) / len(xs) * 1000)
        out[fmt] = best
    shutil.rmtree(work, ignore_errors=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="32,64")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--engine", action="store_true", help="also time the serving engine's routed predict")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    rows = []
    cases = [(a, s) for a in GATE_ARCHS for s in sizes]
    for arch, size in tqdm(cases, desc="gate memory formats", unit="case"):
        rows.append({"arch": arch, "size": size, **measure(arch, size, args.repeats)})
    engine = engine_ms(args.repeats) if args.engine else None
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "gate_memory_format.json").write_text(
        json.dumps({"threads": torch.get_num_threads(), "rows": rows, "engine_ms_per_batch32": engine}, indent=2)
    )
    lines = [
        "| gate | px | train NCHW | train channels_last | speed-up | infer NCHW | infer channels_last | speed-up |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['arch']} | {r['size']} | {r['train_nchw']:.2f} | {r['train_channels_last']:.2f} | "
            f"{r['train_nchw'] / r['train_channels_last']:.2f}× "
            f"| {r['infer_nchw']:.2f} | {r['infer_channels_last']:.2f} | "
            f"{r['infer_nchw'] / r['infer_channels_last']:.2f}× |"
        )
    if engine is not None:
        lines += [
            "",
            "| engine, routed batch of 32 (tiny zoo, gate 64 px) | NCHW gate | channels_last gate | speed-up |",
            "|---|---|---|---|",
            f"| ms per batch | {engine['nchw']:.1f} | {engine['channels_last']:.1f} | "
            f"{engine['nchw'] / engine['channels_last']:.2f}× |",
        ]
    table = "\n".join(lines)
    (RESULTS / "gate_memory_format.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
