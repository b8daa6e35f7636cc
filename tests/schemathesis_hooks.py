"""schemathesis hooks for the contract test (``SCHEMATHESIS_HOOKS=schemathesis_hooks``, tests/ on the path).

The OpenAPI document names image content in JSON bodies with the custom string format ``base64-image``
(``server.http.openapi.IMAGE_FORMAT``): base64 of an image file, plain or as a ``data:`` URL; multipart image
parts declare image media types. Generators know neither what a custom format holds nor what a PNG looks
like; this teaches schemathesis to draw real (tiny) image files for both.
"""

from __future__ import annotations

import base64
import io

import numpy as np
import schemathesis
from hypothesis import strategies as st
from PIL import Image

from server.http.openapi import IMAGE_FORMAT


def _encoded(fmt: str, size: int, mode: str) -> bytes:
    pixels = np.random.default_rng(size).integers(0, 256, (size, size, 3 if mode == "RGB" else 1), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels.squeeze(-1) if mode == "L" else pixels, mode).save(buf, format=fmt)
    return buf.getvalue()


FILES = [
    (fmt, _encoded(fmt, size, mode)) for fmt in ("PNG", "JPEG", "GIF", "WEBP") for size, mode in ((1, "L"), (20, "RGB"))
]
BASE64_IMAGES = [base64.b64encode(data).decode() for _, data in FILES] + [
    f"data:image/{fmt.lower()};base64,{base64.b64encode(data).decode()}" for fmt, data in FILES
]

schemathesis.openapi.format(IMAGE_FORMAT, st.sampled_from(BASE64_IMAGES))
# image files (multipart parts, raw bodies) of each media type the document names: real files of that format
for _fmt in ("PNG", "JPEG", "GIF", "WEBP"):
    schemathesis.openapi.media_type(f"image/{_fmt.lower()}", st.sampled_from([d for f, d in FILES if f == _fmt]))
