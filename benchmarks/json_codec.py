"""Is the JSON codec worth changing? ``json`` vs ``orjson`` on the server's request and response bodies.

Times encoding a typical ``/v1/classify`` response (one image, top-5) and decoding a one-image base64
request, per call, best of 5 runs of 2000 calls each:

    .venv/bin/python benchmarks/json_codec.py
"""

from __future__ import annotations

import base64
import json
import os
import sys
import timeit

import orjson


def main() -> int:
    response = {
        "model_version": "v1",
        "predictions": [
            {
                "task": {"name": "digits", "index": 3, "probability": 0.998, "source": "gate"},
                "class": {"index": 7, "label": "7", "probability": 0.93},
                "top_k": [{"index": i, "label": str(i), "probability": 0.01 * i} for i in range(5)],
            }
        ],
        "timing": {"total_ms": 6.1, "decode_ms": 0.4, "queue_ms": 1.2, "inference_ms": 4.0, "batch_sizes": [3]},
    }
    request = json.dumps({"images": [base64.b64encode(os.urandom(1500)).decode()], "task": "digits"}).encode()
    cases = {
        "encode response, json": lambda: json.dumps(response).encode(),
        "encode response, orjson": lambda: orjson.dumps(response),
        "decode request, json": lambda: json.loads(request),
        "decode request, orjson": lambda: orjson.loads(request),
    }
    print("| case | µs per call |\n|---|---|")
    for name, fn in cases.items():
        best = min(timeit.repeat(fn, number=2000, repeat=5)) / 2000
        print(f"| {name} | {1e6 * best:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
