"""The served bundle as an Open Inference Protocol model: its metadata, how inputs become images, the outputs.

Inputs: ``IMAGE`` (BYTES ``[B]``: encoded image files; base64 strings in the JSON form) or ``PIXELS``
(FP32 ``[B, C, S, S]``, preprocessed as the metadata's ``parameters.preprocessing`` says), and optional
``TASK`` (BYTES ``[B]``, empty = the gate routes). Outputs: ``TASK``, ``TASK_PROBABILITY``,
``CLASS_INDEX``, ``CLASS_LABEL``, ``CLASS_PROBABILITY`` by default; on request ``PROBABILITIES``
(FP32 ``[B, K]`` with K the largest class count, rows of smaller tasks padded with 0, or with
``parameters.classification = k`` / the request's ``parameters.top_k = k``: BYTES ``[B, k]`` of
``"probability:index:label"``, Triton's classification extension) and ``TASK_PROBABILITIES`` (FP32
``[B, N]``: the router's ``p(x)`` per image over the N tasks in metadata order; one-hot for a given task).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from model_store.data.preprocessing import renormalise
from server.http.codec import decode_base64
from server.http.errors import InvalidRequest, InvalidTensor, PayloadTooLarge, UnknownTask
from server.http.oip.schemas import InferRequest, MetadataTensor, ModelMetadata
from server.http.oip.wire import Tensor
from server.runtime.inputs import ImageInput
from server.runtime.protocol import ImageOutput, InferenceEngine

PLATFORM = "vitmerge_pytorch"
INPUTS = ("IMAGE", "PIXELS", "TASK")
#: output name -> datatype; the first five are sent when the request names no outputs
OUTPUTS = {
    "TASK": "BYTES",
    "TASK_PROBABILITY": "FP32",
    "CLASS_INDEX": "INT64",
    "CLASS_LABEL": "BYTES",
    "CLASS_PROBABILITY": "FP32",
    "PROBABILITIES": "FP32",
    "TASK_PROBABILITIES": "FP32",
}
DEFAULT_OUTPUTS = ("TASK", "TASK_PROBABILITY", "CLASS_INDEX", "CLASS_LABEL", "CLASS_PROBABILITY")


def max_classes(engine: InferenceEngine) -> int:
    return max(len(engine.class_names[t]) for t in engine.tasks)


def metadata(engine: InferenceEngine, name: str, versions: list[str]) -> ModelMetadata:
    """``GET /v2/models/{name}``: tensors, shapes (-1 = any), and what the model is (tasks, classes, preprocessing)."""
    prep = engine.preprocessing
    return ModelMetadata(
        name=name,
        versions=versions,
        platform=PLATFORM,
        inputs=[
            MetadataTensor(name="IMAGE", datatype="BYTES", shape=[-1], parameters={"content": "encoded image file"}),
            MetadataTensor(
                name="PIXELS",
                datatype="FP32",
                shape=[-1, prep.channels, prep.size, prep.size],
                parameters={"preprocessing": prep.model_dump()},
            ),
            MetadataTensor(
                name="TASK", datatype="BYTES", shape=[-1], parameters={"optional": True, "empty": "the gate routes"}
            ),
        ],
        outputs=[MetadataTensor(name=n, datatype=d, shape=_output_shape(engine, n)) for n, d in OUTPUTS.items()],
        parameters={
            "served_version": engine.version,
            "method": engine.method,
            "kind": engine.kind,
            "gate": engine.has_router,  # TASK may be empty (the bundle routes)
            "router": engine.router_kind,
            "tasks": engine.tasks,
            "classes": engine.class_names,
            "preprocessing": prep.model_dump(),
            "task_preprocessing": {  # tasks whose own preprocessing differs from the bundle's (PIXELS follow it)
                t: tp.model_dump()
                for t, tp in zip(engine.tasks, engine.task_preprocessing)
                if not tp.pixels_equal(prep)
            },
        },
    )


def _output_shape(engine: InferenceEngine, name: str) -> list[int]:
    if name == "PROBABILITIES":
        return [-1, max_classes(engine)]
    return [-1, len(engine.tasks)] if name == "TASK_PROBABILITIES" else [-1]


def _batch_size(t: Tensor, rank: int) -> int:
    if len(t.shape) != rank:
        raise InvalidTensor(f"input '{t.name}': expected {rank} dimension(s), got shape {t.shape}")
    return t.shape[0]


def _tasks(task: Tensor | None, n: int, engine: InferenceEngine) -> list[int | None]:
    if task is None:
        names: list[str] = [""] * n
    else:
        if task.datatype != "BYTES" or _batch_size(task, 1) != n:
            raise InvalidTensor(f"input 'TASK' must be BYTES of shape [{n}], got {task.datatype} {task.shape}")
        assert isinstance(task.value, list)
        try:
            names = [v.decode() for v in task.value]
        except UnicodeDecodeError as e:
            raise InvalidTensor(f"input 'TASK' is not UTF-8 text: {e}") from e
    out: list[int | None] = []
    for name in names:
        if not name:
            if not engine.has_router:
                raise InvalidRequest(
                    f"bundle {engine.version} has no gate: give TASK for every image ({', '.join(engine.tasks)})",
                    code="task_required",
                )
            out.append(None)
        elif name not in engine.tasks:
            raise UnknownTask(f"unknown task '{name}'; this model serves: {', '.join(engine.tasks)}")
        else:
            out.append(engine.task_index(name))
    return out


def _image_blobs(t: Tensor) -> list[bytes]:
    if t.datatype != "BYTES":
        raise InvalidTensor(f"input 'IMAGE' must be BYTES (encoded image files), got {t.datatype}")
    assert isinstance(t.value, list)
    if not t.from_json:
        return t.value
    try:  # base64, plain or as a data:image/...;base64, URL (as /v1/classify takes them)
        return [decode_base64(v.decode(), i) for i, v in enumerate(t.value)]
    except InvalidRequest as e:
        raise InvalidTensor(f"input 'IMAGE': JSON BYTES elements must be base64 image files ({e.message})") from e


def _pixels(t: Tensor, engine: InferenceEngine) -> torch.Tensor:
    prep = engine.preprocessing
    want = [prep.channels, prep.size, prep.size]
    if t.datatype != "FP32" or len(t.shape) != 4 or t.shape[1:] != want:
        raise InvalidTensor(
            f"input 'PIXELS' must be FP32 of shape [B, {', '.join(map(str, want))}], got {t.datatype} {t.shape}"
        )
    assert isinstance(t.value, np.ndarray)
    if not np.isfinite(t.value).all():
        raise InvalidTensor("input 'PIXELS' has NaN or infinite values")
    return torch.from_numpy(np.array(t.value, dtype=np.float32))


def decode_inputs(inputs: dict[str, Tensor], engine: InferenceEngine, max_images: int) -> list[ImageInput]:
    """The request's tensors -> one :class:`ImageInput` per image (encoded files are decoded with the batch they
    run in); 4xx naming what is wrong."""
    unknown = sorted(set(inputs) - set(INPUTS))
    if unknown:
        raise InvalidTensor(f"unknown input(s) {', '.join(unknown)}; this model takes {', '.join(INPUTS)}")
    given = [n for n in ("IMAGE", "PIXELS") if n in inputs]
    if len(given) != 1:
        raise InvalidTensor("send exactly one of the inputs IMAGE (encoded files) or PIXELS (preprocessed)")
    source = inputs[given[0]]
    n = _batch_size(source, 1 if given[0] == "IMAGE" else 4)
    if n == 0:
        raise InvalidTensor(f"input '{source.name}' holds no images")
    if n > max_images:
        raise PayloadTooLarge(f"{n} images in one request; the limit is {max_images}", code="too_many_images")
    tasks = _tasks(inputs.get("TASK"), n, engine)
    if given[0] == "IMAGE":
        return [ImageInput(tasks[i], blob, what=f"IMAGE[{i}]") for i, blob in enumerate(_image_blobs(source))]
    x = _pixels(source, engine)
    routed = [i for i, t in enumerate(tasks) if t is None]
    if routed and len(engine.input_variants) > 1:
        raise InvalidTensor(
            "this bundle's tasks differ in preprocessing, so routed 'PIXELS' (one tensor per image) cannot be served "
            "exactly: send 'IMAGE' (encoded files) or name each image's TASK (then PIXELS follow that task's "
            "preprocessing)"
        )
    gate_prep = engine.gate_preprocessing
    gate_rows = renormalise(x[routed], engine.preprocessing, gate_prep) if routed and gate_prep is not None else None
    pixel_gates: list[torch.Tensor | None] = [None] * n
    for j, i in enumerate(routed):
        pixel_gates[i] = gate_rows[j] if gate_rows is not None else None
    return [ImageInput(tasks[i], x=x[i], x_gate=pixel_gates[i], what=f"PIXELS[{i}]") for i in range(n)]


@dataclass
class Wanted:
    """One output the response carries."""

    name: str
    binary: bool
    classification: int | None = None


def _positive_int(value: object, what: str) -> int:
    """A positive integer; ``3.0`` is one (JSON does not tell ``3.0`` from ``3``)."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise InvalidTensor(f"{what} must be a positive integer, got {value!r}")
    return value


def _flag(value: object, what: str) -> bool:
    if not isinstance(value, bool):
        raise InvalidTensor(f"{what} must be true or false, got {value!r}")
    return value


def wanted_outputs(request: InferRequest) -> list[Wanted]:
    """Which outputs to send, each in JSON or binary (``binary_data_output``, per output ``binary_data``)."""
    binary = _flag(request.parameters.get("binary_data_output", False), "parameters.binary_data_output")
    top_k = request.parameters.get("top_k")
    if top_k is not None:  # checked even when no output uses it
        top_k = _positive_int(top_k, "parameters.top_k")
    if request.outputs is None:
        out = [Wanted(n, binary) for n in DEFAULT_OUTPUTS]
        if top_k is not None:
            out.append(Wanted("PROBABILITIES", binary, top_k))
        return out
    out = []
    for o in request.outputs:
        if o.name not in OUTPUTS:
            raise InvalidTensor(f"unknown output '{o.name}'; this model has {', '.join(OUTPUTS)}")
        k = o.parameters.get("classification", top_k if o.name == "PROBABILITIES" else None)
        if k is not None and o.name != "PROBABILITIES":
            raise InvalidTensor(f"output '{o.name}': classification applies to PROBABILITIES only")
        out.append(
            Wanted(
                o.name,
                _flag(o.parameters.get("binary_data", binary), f"output '{o.name}' binary_data"),
                None if k is None else _positive_int(k, f"output '{o.name}' classification"),
            )
        )
    return out


def _probabilities(engine: InferenceEngine, outs: list[ImageOutput], k: int | None) -> Tensor:
    if k is None:
        width = max_classes(engine)
        rows = np.zeros((len(outs), width), dtype=np.float32)
        for i, o in enumerate(outs):
            rows[i, : o.probabilities.numel()] = o.probabilities.float().numpy()
        return Tensor("PROBABILITIES", "FP32", [len(outs), width], rows)
    k = min(k, min(o.probabilities.numel() for o in outs))
    values: list[bytes] = []
    for o in outs:
        labels = engine.class_names[engine.tasks[o.task]]
        p, idx = o.probabilities.topk(k)
        values.extend(f"{float(v):.6g}:{int(j)}:{labels[int(j)]}".encode() for v, j in zip(p.tolist(), idx.tolist()))
    return Tensor("PROBABILITIES", "BYTES", [len(outs), k], values)


def build_outputs(engine: InferenceEngine, outs: list[ImageOutput], wanted: list[Wanted]) -> list[Tensor]:
    """The requested output tensors for the images' predictions."""
    n = len(outs)
    top = [o.probabilities.max(0) for o in outs]
    tensors: list[Tensor] = []
    for w in wanted:
        if w.name == "TASK":
            tensors.append(Tensor(w.name, "BYTES", [n], [engine.tasks[o.task].encode() for o in outs]))
        elif w.name == "TASK_PROBABILITY":
            tensors.append(Tensor(w.name, "FP32", [n], np.array([o.task_probability for o in outs], np.float32)))
        elif w.name == "CLASS_INDEX":
            tensors.append(Tensor(w.name, "INT64", [n], np.array([int(t.indices) for t in top], np.int64)))
        elif w.name == "CLASS_LABEL":
            labels = [engine.class_names[engine.tasks[o.task]][int(t.indices)] for o, t in zip(outs, top)]
            tensors.append(Tensor(w.name, "BYTES", [n], [v.encode() for v in labels]))
        elif w.name == "CLASS_PROBABILITY":
            tensors.append(Tensor(w.name, "FP32", [n], np.array([float(t.values) for t in top], np.float32)))
        elif w.name == "TASK_PROBABILITIES":
            rows = np.stack([o.task_probabilities.float().numpy() for o in outs]).astype(np.float32)
            tensors.append(Tensor(w.name, "FP32", [n, len(engine.tasks)], rows))
        else:
            tensors.append(_probabilities(engine, outs, w.classification))
    return tensors
