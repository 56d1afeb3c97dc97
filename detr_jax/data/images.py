"""Reading image files into uint8 RGB arrays, with clear errors.

EXIF orientation: official DETR (torchvision's CocoDetection, `Image.open(p).convert("RGB")`)
ignores it, and COCO's annotations (and its `width`/`height`) refer to the stored pixel
grid. So by default the stored orientation is kept. When the annotation file's size matches
only the EXIF-rotated image (data annotated on the displayed image), the EXIF transpose is
applied so that boxes and pixels agree. A size that matches neither is an error: the boxes
would land in the wrong place.
"""

from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image, ImageOps

from detr_jax.data.records import ImageLoadError

_EXIF_ORIENTATION = 0x0112
_SWAPS_AXES = (5, 6, 7, 8)  # EXIF orientations that rotate by 90 or 270 degrees


def decode_image(
    data: bytes | str | os.PathLike,
    expected_size: tuple[int, int] | None = None,
    name: str | None = None,
) -> np.ndarray:
    """Decodes an image file (path or bytes) to uint8 [H, W, 3] RGB.

    Grayscale, palette, RGBA (alpha dropped), CMYK and 16-bit images are converted to RGB.

    Args:
      data: a path or the encoded bytes.
      expected_size: (H, W) from the annotation file, if known; picks the orientation (see
        the module docstring) and rejects images whose size matches neither orientation.
      name: how to name the image in errors (defaults to the path).

    Raises:
      ImageLoadError: missing, unreadable, truncated or corrupt file, or size mismatch.
    """
    is_path = not isinstance(data, (bytes, bytearray))
    name = name or (os.fspath(data) if is_path else "<bytes>")
    image = _open(data if is_path else io.BytesIO(data), name)
    try:
        image.load()  # decode now: truncated files fail here, not later in numpy
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ... on bad data
        raise ImageLoadError(name, f"cannot decode image ({type(e).__name__}: {e})") from None
    if _needs_exif_transpose(image, expected_size, name):
        image = ImageOps.exif_transpose(image)
    try:
        return np.asarray(_to_rgb(image), dtype=np.uint8)
    except Exception as e:
        raise ImageLoadError(name, f"cannot convert {image.mode} image to RGB ({e})") from None


def check_image_file(path: str | os.PathLike, expected_size: tuple[int, int] | None = None) -> None:
    """Checks cheaply that an image file exists, its header decodes and its size fits the
    annotation's (as `decode_image` would accept it); the pixels are not decoded.

    Raises:
      ImageLoadError: naming the file and the problem.
    """
    with _open(path, os.fspath(path)) as image:
        _needs_exif_transpose(image, expected_size, os.fspath(path))


def _open(data, name: str) -> Image.Image:
    """PIL's lazy open (reads the header only), with its errors as ImageLoadError."""
    try:
        return Image.open(data)
    except FileNotFoundError:
        raise ImageLoadError(name, "file not found") from None
    except IsADirectoryError:
        raise ImageLoadError(name, "is a directory, not an image file") from None
    except Image.DecompressionBombError as e:
        raise ImageLoadError(name, f"image too large to decode safely ({e})") from None
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ... on bad data
        raise ImageLoadError(name, f"cannot decode image ({type(e).__name__}: {e})") from None


def _needs_exif_transpose(image: Image.Image, expected_size, name: str) -> bool:
    """Whether the annotation's size is the EXIF-rotated one; ImageLoadError if it is neither."""
    stored = (image.height, image.width)
    if expected_size is None or tuple(expected_size) == stored:
        return False
    orientation = image.getexif().get(_EXIF_ORIENTATION, 1)
    if orientation in _SWAPS_AXES and tuple(expected_size) == stored[::-1]:
        return True
    raise ImageLoadError(
        name,
        f"decoded size (h={stored[0]}, w={stored[1]}) differs from the annotation's "
        f"(h={expected_size[0]}, w={expected_size[1]})",
    )


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # PIL's I -> RGB conversion clips at 255; rescale 16-bit range to 8 bits instead.
        values = np.asarray(image, dtype=np.float64)
        top = 65535.0 if values.max(initial=0) > 255 else 255.0
        return Image.fromarray(np.round(values * (255.0 / top)).astype(np.uint8)).convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")  # avoids PIL's warning; alpha is dropped below
    return image.convert("RGB")
