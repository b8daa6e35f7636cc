"""The user's alternative for the serving benchmark: the zoo's N task models served by LitServe, with batching.

Run with a Python that has ``litserve`` (it pins its own uvicorn, so it lives in its own virtualenv; see
``benchmarks/http_stack.py --litserve``):

    /path/to/litserve-venv/bin/python benchmarks/litserve_zoo.py ZOO_DIR PORT
    /path/to/litserve-venv/bin/python benchmarks/litserve_zoo.py synthetic:vit_b16:5 PORT

``synthetic:ARCH:N``: N randomly initialised models of ``merging.synthetic.ARCHS``' ARCH (real size; speed and memory
only), tasks ``task0``..., RGB input squashed to the model's size, mean/std 0.5 (the synthetic bundles' own).
``POST /predict`` with ``{"image": "<base64 PNG>", "task": "<name>"}`` (the task must be given: there is
no gate) answers ``{"task", "class", "probability"}``. A batch runs each task's own model once on that
task's images (the N models stay resident).

Feeds BENCHMARKS.md, section
"HTTP stack: asyncio + h11 vs uvloop + httptools, orjson, and LitServe side by side (issue 19)"
(run by ``http_stack.py --litserve``) and
"vitmerge vs LitServe: demo zoo at concurrency 1 to 64, and real size side by side" (run by ``vs_litserve.py``).
"""

from __future__ import annotations

import base64
import io
import sys

import litserve as ls
import numpy as np
import torch
from PIL import Image

from model_store.data.preprocessing import to_model_input
from model_store.zoo import Zoo


class ZooAPI(ls.LitAPI):
    """N individual fine-tuned models, one per task."""

    def __init__(self, zoo_dir: str):
        super().__init__(max_batch_size=32, batch_timeout=0.005)
        self.zoo_dir = zoo_dir

    def setup(self, device: str) -> None:
        torch.set_grad_enabled(False)
        if self.zoo_dir.startswith("synthetic:"):
            self.models, self.prep, self.classes = synthetic(self.zoo_dir)
            return
        zoo = Zoo.load(self.zoo_dir)
        self.models = {t: zoo.build_model(t).eval() for t in zoo.tasks}
        self.prep = {t: zoo.metas[t].preprocessing for t in zoo.tasks}
        self.classes = {t: zoo.metas[t].class_names for t in zoo.tasks}

    def decode_request(self, request: dict) -> tuple[str, torch.Tensor]:
        task = request["task"]
        img = np.asarray(Image.open(io.BytesIO(base64.b64decode(request["image"]))))
        return task, to_model_input(img[None], self.prep[task])[0]

    def batch(self, inputs: list) -> list:
        return inputs

    @torch.inference_mode()
    def predict(self, batch: list) -> list:
        out: list = [None] * len(batch)
        for task in {t for t, _ in batch}:
            idx = [i for i, (t, _) in enumerate(batch) if t == task]
            probs = self.models[task](torch.stack([batch[i][1] for i in idx])).softmax(-1)
            for j, i in enumerate(idx):
                out[i] = (task, probs[j])
        return out

    def unbatch(self, output: list) -> list:
        return output

    def encode_response(self, output: tuple) -> dict:
        task, probs = output
        k = int(probs.argmax())
        return {"task": task, "class": self.classes[task][k], "probability": float(probs[k])}


def synthetic(spec: str) -> tuple[dict, dict, dict]:
    """``synthetic:ARCH:N`` -> N random models (seeded), their preprocessing and class names."""
    from merging.synthetic import ARCHS
    from model_store.architecture import build_model
    from model_store.schema import Architecture, Preprocessing

    _, name, n = spec.split(":")
    arch, size = ARCHS[name]
    tasks = [f"task{i}" for i in range(int(n))]
    models = {}
    for i, t in enumerate(tasks):
        torch.manual_seed(i)
        models[t] = build_model(Architecture.model_validate(arch), 10).eval()
    prep = Preprocessing(size=size, channels=3, mean=[0.5] * 3, std=[0.5] * 3)
    return models, dict.fromkeys(tasks, prep), {t: [str(c) for c in range(10)] for t in tasks}


if __name__ == "__main__":
    server = ls.LitServer(ZooAPI(sys.argv[1]), accelerator="cpu", workers_per_device=1)
    server.run(port=int(sys.argv[2]), generate_client_file=False)
