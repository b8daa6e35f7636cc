"""Request decoding: image bytes -> validated uint8 pixels (runs in worker threads).

The decoder itself is :mod:`model_store.data.decode` (shared with the data sources);
this module maps its errors onto HTTP errors (400 ``invalid_image``, 413 ``image_too_large``).
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

import numpy as np

from model_store.data.decode import FORMATS, configure_pillow
from model_store.data.decode import decode_image as _decode
from model_store.errors import ImageDecodeError, ImageTooLargeError
from server.http.errors import APIError, InvalidImage, InvalidRequest, PayloadTooLarge

__all__ = [
    "FORMATS",
    "MAX_JSON_DEPTH",
    "MAX_JSON_NUMBER_CHARS",
    "configure_pillow",
    "decode_base64",
    "decode_error",
    "decode_image",
    "decode_json",
]

#: bounds on a JSON request body (ours nest 3 levels; numbers are small): deeper or longer is a 400
MAX_JSON_DEPTH = 32
MAX_JSON_NUMBER_CHARS = 64


def _number(parse: type) -> Any:
    def parse_bounded(text: str) -> Any:
        if len(text) > MAX_JSON_NUMBER_CHARS:
            raise InvalidRequest(
                f"body is not acceptable JSON: a number of {len(text)} characters (the limit is "
                f"{MAX_JSON_NUMBER_CHARS})",
                status=400,
                code="invalid_json",
            )
        return parse(text)

    return parse_bounded


def _reject_constant(name: str) -> Any:
    raise InvalidRequest(f"body is not acceptable JSON: {name} is not a JSON number", status=400, code="invalid_json")


def _depth(value: Any) -> int:
    """Nesting depth of parsed JSON (iterative; stops counting past the limit)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, (dict, list)):
            deepest = max(deepest, depth)
            if deepest > MAX_JSON_DEPTH:
                break
            stack.extend((child, depth + 1) for child in (node.values() if isinstance(node, dict) else node))
    return deepest


def decode_json(body: bytes) -> Any:
    """A request body -> parsed JSON, bounded in depth and number length; 400 ``invalid_json`` otherwise."""
    try:
        data = json.loads(body, parse_int=_number(int), parse_float=_number(float), parse_constant=_reject_constant)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InvalidRequest(f"body is not valid JSON: {e}", status=400, code="invalid_json") from e
    except RecursionError:
        raise InvalidRequest(
            f"body is not acceptable JSON: nested deeper than {MAX_JSON_DEPTH} levels", status=400, code="invalid_json"
        ) from None
    if _depth(data) > MAX_JSON_DEPTH:
        raise InvalidRequest(
            f"body is not acceptable JSON: nested deeper than {MAX_JSON_DEPTH} levels", status=400, code="invalid_json"
        )
    return data


def decode_error(e: ImageDecodeError) -> APIError:
    """An image that would not decode as its HTTP error: 413 ``image_too_large`` or 400 ``invalid_image``."""
    if isinstance(e, ImageTooLargeError):
        return PayloadTooLarge(str(e), code="image_too_large")
    return InvalidImage(str(e))


def decode_image(data: bytes, max_pixels: int, what: str = "image", exif_transpose: bool = True) -> np.ndarray:
    """Bytes of one PNG/JPEG/GIF/BMP/WEBP/TIFF -> ``(H, W[, 3 or 4])`` uint8 (HTTP errors)."""
    try:
        return _decode(data, max_pixels, what, exif_transpose=exif_transpose)
    except ImageDecodeError as e:
        raise decode_error(e) from e


def decode_base64(value: str, index: int) -> bytes:
    """A base64 string (optionally a ``data:image/...;base64,`` URL) -> bytes."""
    if value.startswith("data:"):
        head, sep, value = value.partition(",")
        if not sep or ";base64" not in head:
            raise InvalidRequest(f"images[{index}]: data URL must be base64-encoded", code="invalid_base64")
        media = head[len("data:") :].split(";")[0].strip().lower()
        if not media.startswith("image/"):
            raise InvalidRequest(
                f"images[{index}]: data URL media type '{media or 'none'}' is not an image (use "
                "data:image/png;base64,...)",
                code="invalid_data_url",
            )
    try:
        return base64.b64decode(value.strip(), validate=True)
    except (binascii.Error, ValueError) as e:
        raise InvalidRequest(f"images[{index}] is not valid base64: {e}", code="invalid_base64") from e
