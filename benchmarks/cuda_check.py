"""CUDA path check: the engine on ``cuda`` gives the CPU engine's answers (bundles in bench stores).

    python3 benchmarks/cuda_check.py STORE [STORE ...]

For every store's CURRENT bundle: one mixed-task batch of pool images (``STORE/pool``
or the first store's), task given and routed by the gate; gated bundles with both
mixing modes (exact, sparse). Prints a JSON report; exits 1 on any mismatch.

Feeds BENCHMARKS.md, section "Serving (issue 5)" (its CUDA path check).
"""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from model_store.bundle import BundleStore
from model_store.settings import StoreLayout
from server.runtime.bundle_reader import BundleReader
from server.runtime.engine import Engine, EngineOptions
from server.runtime.gated_vit import Mixing


def _batch(engine: Engine, pool: Path, n: int = 64):
    files = sorted(pool.glob("*.png"))[:: max(1, len(sorted(pool.glob("*.png"))) // n)][:n]
    imgs = [np.asarray(Image.open(io.BytesIO(f.read_bytes()))) for f in files]
    tasks = [engine.task_index(f.name.split("_")[0]) for f in files]
    xs, gs = zip(*(engine.preprocess(im, None) for im in imgs))
    return torch.stack(xs), torch.stack(gs) if gs[0] is not None else None, tasks


def compare(store: Path, pool: Path, mixing: Mixing = "sparse") -> dict:
    cpu = Engine(BundleStore(StoreLayout(store)).load(), EngineOptions("cpu", mixing=mixing))
    gpu = Engine(BundleStore(StoreLayout(store)).load(), EngineOptions("cuda", mixing=mixing))
    x, g, tasks = _batch(cpu, pool)
    out = {"store": store.name, "bundle": cpu.version, "kind": cpu.kind, "mixing": mixing}
    modes = [("given", tasks, None)] + ([("routed", [None] * len(tasks), g)] if cpu.has_gate else [])
    for name, given, xg in modes:
        a, b = cpu.predict(x, given, xg), gpu.predict(x, given, xg)
        same_task = sum(u.task == v.task for u, v in zip(a, b))
        same_class = sum(int(u.probabilities.argmax()) == int(v.probabilities.argmax()) for u, v in zip(a, b))
        diff = max(float((u.probabilities - v.probabilities).abs().max()) for u, v in zip(a, b))
        out[name] = {"images": len(a), "same_task": same_task, "same_class": same_class, "max_prob_diff": diff}
    return out


def main() -> int:
    stores = [Path(s) for s in sys.argv[1:]]
    pool = next(s / "pool" for s in stores if (s / "pool").exists())
    reports = []
    for store in stores:
        kind = BundleReader(BundleStore(StoreLayout(store)).load(verify=False)).kind
        mixings: list[Mixing] = ["exact", "sparse"] if kind == "gated" else ["sparse"]
        reports += [compare(store, pool, s) for s in mixings]
    print(
        json.dumps({"torch": torch.__version__, "device": torch.cuda.get_device_name(), "reports": reports}, indent=2)
    )
    ok = all(
        r[m]["same_task"] == r[m]["images"]
        and r[m]["same_class"] >= r[m]["images"] - 1
        and r[m]["max_prob_diff"] < 1e-2
        for r in reports
        for m in ("given", "routed")
        if m in r
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
