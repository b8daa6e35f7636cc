"""The user's alternative for the serving benchmark: the zoo's N task models served by LitServe, with batching.

Run with a Python that has ``litserve`` (it pins its own uvicorn, so it lives in its own virtualenv; see
``benchmarks/http_stack.py --litserve``):

    /path/to/litserve-venv/bin/python benchmarks/litserve_zoo.py ZOO_DIR PORT

``POST /predict`` with ``{"image": "<base64 PNG>", "task": "<name>"}`` (the task must be given: there is
no gate) answers ``{"task", "class", "probability"}``. A batch runs each task's own model once on that
task's images (the N models stay resident).

Feeds BENCHMARKS.md, section
"HTTP stack: asyncio + h11 vs uvloop + httptools, orjson, and LitServe side by side (issue 19)"
(run by ``http_stack.py --litserve``).
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
        self.zoo = Zoo.load(self.zoo_dir)
        self.models = {t: self.zoo.build_model(t).eval() for t in self.zoo.tasks}
        self.prep = {t: self.zoo.metas[t].preprocessing for t in self.zoo.tasks}

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
        return {"task": task, "class": self.zoo.metas[task].class_names[k], "probability": float(probs[k])}


if __name__ == "__main__":
    server = ls.LitServer(ZooAPI(sys.argv[1]), accelerator="cpu", workers_per_device=1)
    server.run(port=int(sys.argv[2]), generate_client_file=False)
