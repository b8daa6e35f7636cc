"""Request decoding: image bytes -> validated uint8 pixels (runs in worker threads).

The decoder itself is :mod:`model_store.data.decode` (shared with the data sources);
this module maps its errors onto HTTP errors (400 ``invalid_image``, 413 ``image_too_large``).
"""
from __future__ import annotations

import base64
import binascii

import numpy as np

from model_store.data.decode import FORMATS, configure_pillow
from model_store.data.decode import decode_image as _decode
from model_store.errors import ImageDecodeError, ImageTooLargeError
from server.errors import InvalidImage, InvalidRequest, PayloadTooLarge

__all__ = ["FORMATS", "configure_pillow", "decode_base64", "decode_image"]


def decode_image(data: bytes, max_pixels: int, what: str = "image") -> np.ndarray:
    """Bytes of one PNG/JPEG/GIF/BMP/WEBP/TIFF -> ``(H, W)`` or ``(H, W, 3)`` uint8 (HTTP errors)."""
    try:
        return _decode(data, max_pixels, what)
    except ImageTooLargeError as e:
        raise PayloadTooLarge(str(e), code="image_too_large") from e
    except ImageDecodeError as e:
        raise InvalidImage(str(e)) from e


def decode_base64(value: str, index: int) -> bytes:
    """A base64 string (optionally a ``data:image/...;base64,`` URL) -> bytes."""
    if value.startswith("data:"):
        head, sep, value = value.partition(",")
        if not sep or ";base64" not in head:
            raise InvalidRequest(f"images[{index}]: data URL must be base64-encoded", code="invalid_base64")
    try:
        return base64.b64decode(value.strip(), validate=True)
    except (binascii.Error, ValueError) as e:
        raise InvalidRequest(f"images[{index}] is not valid base64: {e}", code="invalid_base64") from e
