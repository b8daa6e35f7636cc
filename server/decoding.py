"""Request decoding: image bytes -> validated uint8 pixels (runs in worker threads).

Pillow reads only the header first, so oversized images (decompression bombs, a
PNG header claiming 100k x 100k pixels) are refused before any pixel is decoded.
:func:`configure_pillow` sets ``Image.MAX_IMAGE_PIXELS`` and turns Pillow's
``DecompressionBombWarning`` into an error, process-wide.
"""
from __future__ import annotations

import base64
import binascii
import io
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

from server.errors import InvalidImage, InvalidRequest, PayloadTooLarge

#: Formats we decode; everything else (PSD, EPS, ICO, ...) is refused.
FORMATS = ("PNG", "JPEG", "GIF", "BMP", "WEBP", "TIFF")


def configure_pillow(max_pixels: int) -> None:
    """Cap decoded pixels process-wide and make Pillow's bomb warning an error."""
    Image.MAX_IMAGE_PIXELS = max_pixels
    warnings.simplefilter("error", Image.DecompressionBombWarning)


def decode_image(data: bytes, max_pixels: int, what: str = "image") -> np.ndarray:
    """Bytes of one PNG/JPEG/GIF/BMP/WEBP/TIFF -> ``(H, W)`` or ``(H, W, 3)`` uint8."""
    if not data:
        raise InvalidImage(f"{what} is empty")
    try:
        with Image.open(io.BytesIO(data), formats=FORMATS) as img:
            w, h = img.size
            if w < 1 or h < 1:
                raise InvalidImage(f"{what} has no pixels ({w}x{h})")
            if w * h > max_pixels:
                raise PayloadTooLarge(f"{what} is {w}x{h} = {w * h} pixels, above the limit of {max_pixels}", code="image_too_large")
            img.load()
            gray = img.mode in ("1", "L", "LA", "I", "I;16", "F")
            out = img.convert("L" if gray else "RGB")
            arr = np.asarray(out, dtype=np.uint8)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise PayloadTooLarge(f"{what}: {e}", code="image_too_large") from e
    except UnidentifiedImageError as e:
        raise InvalidImage(f"{what} is not an image in a supported format ({', '.join(FORMATS)})") from e
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError) as e:
        raise InvalidImage(f"{what} could not be decoded (truncated or corrupt): {e}") from e
    return arr


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
