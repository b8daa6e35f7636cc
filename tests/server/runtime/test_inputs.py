"""Batched decode + preprocess in the inference worker computes exactly what per-image preprocessing does."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from model_store.bundle import BundleStore
from model_store.data.decode import decode_image
from model_store.errors import ImageDecodeError, ImageTooLargeError
from model_store.settings import StoreLayout
from server.runtime.engine import Engine
from server.runtime.inputs import PARALLEL_DECODE_BYTES, DecodeOptions, ImageInput, decode_pool, prepare_batch


def _encode(arr: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture(scope="module")
def engine(server_store_template):
    return Engine(BundleStore(StoreLayout(server_store_template)).load(), "cpu")


@pytest.fixture(scope="module")
def blobs():
    """Images of several sizes and modes (gray, RGB, RGBA, JPEG), seeded."""
    rng = np.random.default_rng(0)
    return [
        _encode(rng.integers(0, 256, (28, 28), dtype=np.uint8)),
        _encode(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)),
        _encode(rng.integers(0, 256, (28, 28), dtype=np.uint8)),
        _encode(rng.integers(0, 256, (33, 21, 4), dtype=np.uint8)),
        _encode(rng.integers(0, 256, (64, 48, 3), dtype=np.uint8), "JPEG"),
    ]


def test_a_mixed_batch_is_prepared_and_classified_as_each_image_alone(engine, blobs):
    tasks = [0, None, 1, None, len(engine.tasks) - 1]
    inputs = [ImageInput(t, b, what=f"image {i}") for i, (t, b) in enumerate(zip(tasks, blobs))]
    x_pix, _ = engine.preprocess(decode_image(blobs[0]), 0)
    inputs.append(ImageInput(0, x=x_pix, what="PIXELS[0]"))  # a client's prepared pixels ride along
    batch = prepare_batch(engine, inputs, DecodeOptions())
    assert batch.errors == [None] * len(inputs) and batch.given == [*tasks, 0]
    gate_rows = []
    for i, (t, b) in enumerate(zip(tasks, blobs)):
        x, g = engine.preprocess(decode_image(b), t)
        assert torch.equal(batch.x[i], x)  # exactly the per-image preprocessing, batched
        if g is not None:
            gate_rows.append(g)
    assert batch.x_gate is not None and torch.equal(batch.x_gate, torch.stack(gate_rows))
    assert torch.equal(batch.x[-1], x_pix)

    run = engine.run(inputs)
    for i, (t, b) in enumerate(zip(tasks, blobs)):
        x, g = engine.preprocess(decode_image(b), t)
        alone = engine.predict(x[None], [t], None if g is None else g[None])[0]
        out = run.outputs[i]
        assert not isinstance(out, ImageDecodeError)
        assert out.task == alone.task and out.source == alone.source
        torch.testing.assert_close(out.probabilities, alone.probabilities, atol=1e-5, rtol=1e-4)


def test_an_image_that_does_not_decode_fails_alone(engine, blobs):
    inputs = [
        ImageInput(0, blobs[0], what="image 0"),
        ImageInput(0, b"not an image", what="image 1"),
        ImageInput(None, blobs[1], what="image 2"),
        ImageInput(1, blobs[4], what="image 3"),  # 64 x 48 = 3072 pixels: above the limit below
    ]
    run = engine.run(inputs, DecodeOptions(max_pixels=2000))
    bad, big = run.outputs[1], run.outputs[3]
    assert isinstance(bad, ImageDecodeError) and "image 1" in str(bad)
    assert isinstance(big, ImageTooLargeError) and "image 3" in str(big)
    assert not isinstance(run.outputs[0], ImageDecodeError) and not isinstance(run.outputs[2], ImageDecodeError)
    nothing = engine.run([ImageInput(0, b"", what="image 0")])  # no image decodes: no forward at all
    assert [type(o) for o in nothing.outputs] == [ImageDecodeError]


def test_a_large_batch_decodes_in_parallel_to_the_same_pixels(engine):
    rng = np.random.default_rng(1)
    big = [_encode(rng.integers(0, 256, (300, 300, 3), dtype=np.uint8)) for _ in range(4)]
    assert sum(map(len, big)) > PARALLEL_DECODE_BYTES
    inputs = [ImageInput(None, b) for b in big]
    serial = prepare_batch(engine, inputs, DecodeOptions())
    parallel = prepare_batch(engine, inputs, DecodeOptions(), decode_pool())
    assert torch.equal(serial.x, parallel.x) and torch.equal(serial.x_gate, parallel.x_gate)
