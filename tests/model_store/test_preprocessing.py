import numpy as np
import pytest
import torch
from PIL import Image

from model_store.data.preprocessing import to_model_input
from model_store.schema import Preprocessing


def test_gray_to_rgb_resize_and_normalise():
    imgs = np.full((2, 8, 8), 255, dtype=np.uint8)
    prep = Preprocessing(size=16, channels=3, mean=[0.5, 0.5, 0.5], std=[0.25, 0.5, 1.0])
    x = to_model_input(imgs, prep)
    assert x.shape == (2, 3, 16, 16)
    assert torch.allclose(x[:, 0], torch.full((2, 16, 16), 2.0))
    assert torch.allclose(x[:, 1], torch.full((2, 16, 16), 1.0))
    assert torch.allclose(x[:, 2], torch.full((2, 16, 16), 0.5))


def test_rgb_to_gray_is_pillows_luma():
    imgs = np.random.default_rng(0).integers(0, 256, (1, 4, 4, 3), dtype=np.uint8)
    imgs[0, 0, 0] = (0, 255, 0)  # pure green: 150 (0.587 * 255 rounded)
    x = to_model_input(imgs, Preprocessing(size=4, channels=1, mean=[0.0], std=[1.0], rescale_factor=1.0))
    assert x.shape == (1, 1, 4, 4)
    want = np.asarray(Image.fromarray(imgs[0]).convert("L"), dtype=np.float32)
    assert torch.equal(x[0, 0], torch.from_numpy(want)) and x[0, 0, 0, 0] == 150


def test_chunking_gives_identical_results():
    imgs = np.random.default_rng(0).integers(0, 256, (10, 20, 20), dtype=np.uint8)
    prep = Preprocessing(size=12, channels=1, mean=[0.5], std=[0.5])
    assert torch.equal(to_model_input(imgs, prep, chunk=3), to_model_input(imgs, prep, chunk=100))


def test_bad_shapes_and_schema():
    with pytest.raises(ValueError, match="expected"):
        to_model_input(np.zeros((4,), dtype=np.uint8), Preprocessing(size=4, channels=1, mean=[0], std=[1]))
    with pytest.raises(ValueError, match="one per channel"):
        Preprocessing(size=4, channels=3, mean=[0], std=[1])
    with pytest.raises(ValueError, match="> 0"):
        Preprocessing(size=4, channels=1, mean=[0], std=[0])


def test_renormalise_makes_another_models_input_from_preprocessed_pixels():
    """/v2 PIXELS routed by the gate: the gate's input re-made from the ViT's equals the gate's own preprocessing."""
    from model_store.data.preprocessing import renormalise

    images = np.random.default_rng(0).integers(0, 256, (4, 20, 20, 3), dtype=np.uint8)
    vit = Preprocessing(size=20, channels=3, mean=[0.5, 0.4, 0.3], std=[0.2, 0.3, 0.25])
    x = to_model_input(images, vit)
    for gate in (
        Preprocessing(size=20, channels=3, mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]),
        Preprocessing(size=20, channels=1, mean=[0.5], std=[0.5]),
        Preprocessing(size=40, channels=3, mean=[0.5] * 3, std=[0.5] * 3, interpolation="bicubic"),
    ):
        torch.testing.assert_close(renormalise(x, vit, gate), to_model_input(images, gate), atol=1e-5, rtol=0)
