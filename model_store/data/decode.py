"""Image bytes -> validated uint8 pixels: the one decoder of the server and the data sources.

Pillow reads only the header first, so oversized images (decompression bombs, a PNG
header claiming 100k x 100k pixels) are refused before any pixel is decoded.
:func:`configure_pillow` sets ``Image.MAX_IMAGE_PIXELS`` and turns Pillow's
``DecompressionBombWarning`` into an error, process-wide.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

from model_store.errors import ImageDecodeError, ImageTooLargeError

#: Formats we decode; everything else (PSD, EPS, ICO, ...) is refused.
FORMATS = ("PNG", "JPEG", "GIF", "BMP", "WEBP", "TIFF")
#: File extensions the data sources read (files with other extensions are skipped).
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".gif", ".bmp", ".webp", ".tif", ".tiff"})
#: Default width*height cap (the server's ``max_image_pixels`` default).
DEFAULT_MAX_PIXELS = 4096 * 4096
_GRAY_MODES = ("1", "L", "LA", "I", "I;16", "F")


def configure_pillow(max_pixels: int) -> None:
    """Cap decoded pixels process-wide and make Pillow's bomb warning an error."""
    Image.MAX_IMAGE_PIXELS = max_pixels
    warnings.simplefilter("error", Image.DecompressionBombWarning)


def decode_image(
    data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, what: str = "image", header_only: bool = False
) -> np.ndarray:
    """Bytes of one PNG/JPEG/GIF/BMP/WEBP/TIFF -> ``(H, W)`` or ``(H, W, 3)`` uint8.

    ``header_only`` checks format and size without decoding pixels (returns an empty array).
    """
    if not data:
        raise ImageDecodeError(f"{what} is empty")
    try:
        with Image.open(io.BytesIO(data), formats=FORMATS) as img:
            w, h = img.size
            if w < 1 or h < 1:
                raise ImageDecodeError(f"{what} has no pixels ({w}x{h})")
            if w * h > max_pixels:
                raise ImageTooLargeError(f"{what} is {w}x{h} = {w * h} pixels, above the limit of {max_pixels}")
            if header_only:
                return np.empty((0,), dtype=np.uint8)
            img.load()
            out = img.convert("L" if img.mode in _GRAY_MODES else "RGB")
            arr = np.asarray(out, dtype=np.uint8)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageTooLargeError(f"{what}: {e}") from e
    except UnidentifiedImageError as e:
        raise ImageDecodeError(f"{what} is not an image in a supported format ({', '.join(FORMATS)})") from e
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError) as e:
        raise ImageDecodeError(f"{what} could not be decoded (truncated or corrupt): {e}") from e
    return arr
