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
from PIL import Image, ImageOps, UnidentifiedImageError

from model_store.errors import ImageDecodeError, ImageTooLargeError

#: Formats we decode; everything else (PSD, EPS, ICO, ...) is refused.
FORMATS = ("PNG", "JPEG", "GIF", "BMP", "WEBP", "TIFF")
#: File extensions the data sources read (files with other extensions are skipped).
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".gif", ".bmp", ".webp", ".tif", ".tiff"})
#: Default width*height cap (the server's ``max_image_pixels`` default).
DEFAULT_MAX_PIXELS = 4096 * 4096
ORIENTATION_TAG = 0x0112  # EXIF "Orientation"
_GRAY_MODES = ("1", "L", "I", "I;16", "F")


def _target_mode(img: Image.Image) -> str:
    """``RGBA`` for images with transparency, ``L`` for gray ones, else ``RGB``."""
    if "A" in img.getbands() or "transparency" in img.info:
        return "RGBA"
    return "L" if img.mode in _GRAY_MODES else "RGB"


def configure_pillow(max_pixels: int) -> None:
    """Cap decoded pixels process-wide and make Pillow's bomb warning an error."""
    Image.MAX_IMAGE_PIXELS = max_pixels
    warnings.simplefilter("error", Image.DecompressionBombWarning)


def decode_image(
    data: bytes,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    what: str = "image",
    header_only: bool = False,
    exif_transpose: bool = True,
) -> np.ndarray:
    """Bytes of one PNG/JPEG/GIF/BMP/WEBP/TIFF -> ``(H, W)`` gray, ``(H, W, 3)`` RGB or ``(H, W, 4)`` RGBA uint8.

    An image with transparency (an alpha band, or a palette/RGB ``transparency`` entry) keeps it as a
    fourth channel: the preprocessing decides what it becomes (``Preprocessing.alpha``). CMYK, YCbCr,
    palette and the rest are converted to RGB by Pillow, gray modes to ``L``. ``exif_transpose``
    turns a photo carrying an EXIF orientation upright first (as transformers' ``load_image`` does).
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
            # EXIF is parsed only when the file carries it (parsing costs ~0.2 ms a photo)
            turned = exif_transpose and "exif" in img.info and img.getexif().get(ORIENTATION_TAG, 1) != 1
            upright: Image.Image = ImageOps.exif_transpose(img) if turned else img  # (no copy when upright)
            arr = np.asarray(upright.convert(_target_mode(upright)), dtype=np.uint8)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageTooLargeError(f"{what}: {e}") from e
    except UnidentifiedImageError as e:
        raise ImageDecodeError(f"{what} is not an image in a supported format ({', '.join(FORMATS)})") from e
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError) as e:
        raise ImageDecodeError(f"{what} could not be decoded (truncated or corrupt): {e}") from e
    return arr
