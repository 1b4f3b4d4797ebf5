"""Reading image files for training, evaluation and the demo, with errors that name the file.

:func:`read_image` is detectron2's ``read_image`` for the model's "BGR" / "RGB" input, plus:

* an unreadable file (missing, empty, not an image, truncated or corrupt) raises
  :class:`BadImageError`, a ``ValueError`` whose message names the file and says what is wrong;
* an image of more than ``max_pixels`` pixels (``INPUT.MAX_IMAGE_PIXELS``) is refused from its
  header, before decoding: a small file can declare billions of pixels (a "decompression bomb").
  This limit replaces PIL's own ``Image.MAX_IMAGE_PIXELS`` guard: while a header is read, PIL's
  guard is raised to it when it is lower (PIL would otherwise refuse images the limit allows),
  then restored (:func:`pil_pixel_limit`);
* 16-bit images (PIL modes "I;16*" and "I") are scaled to 8 bits (value >> 8); detectron2's
  ``Image.convert("RGB")`` clips them instead, turning most of the image white;
* 32-bit float images (mode "F") are clipped to [0, 255];
* the EXIF orientation is applied (phone photos are stored sideways with an orientation tag),
  and a corrupt EXIF block is ignored rather than failing the read;
* every other mode (grayscale "L", 1-bit "1", palette "P"/"PA", "LA", "RGBA", "CMYK", "YCbCr",
  "LAB", "HSV") is converted to 3-channel RGB; an alpha channel is dropped, as detectron2 does.
"""

import contextlib
import os
import re
import threading
import warnings
from typing import Iterator, Optional, Tuple

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..config.defaults import DEFAULT_MAX_IMAGE_PIXELS

__all__ = [
    "BadImageError",
    "read_image",
    "image_size",
    "exif_orientation",
    "DEFAULT_MAX_IMAGE_PIXELS",
    "pil_pixel_limit",
]

EXIF_ORIENTATION_TAG = 0x0112
# EXIF orientations that swap width and height (the rotations by 90 or 270 degrees).
TRANSPOSING_ORIENTATIONS = (5, 6, 7, 8)
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


class BadImageError(ValueError):
    """An image file that cannot be used; ``str()`` names the file and the problem."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"image {path}: {reason}")
        self.path = path
        self.reason = reason


def _too_many_pixels(path: str, pixels: str, max_pixels: int) -> BadImageError:
    return BadImageError(
        path,
        f"has {pixels} pixels, more than INPUT.MAX_IMAGE_PIXELS = {max_pixels}; it is not decoded "
        "(raise INPUT.MAX_IMAGE_PIXELS if the image is genuine)",
    )


_PIL_LIMIT_LOCK = threading.Lock()


@contextlib.contextmanager
def pil_pixel_limit(max_pixels: int) -> Iterator[None]:
    """Within the block, PIL's decompression-bomb guard (``PIL.Image.MAX_IMAGE_PIXELS``, checked
    by ``Image.open``) allows at least ``max_pixels`` pixels; the previous value is restored
    afterwards. The threads of this process that use it take turns."""
    with _PIL_LIMIT_LOCK:
        previous = Image.MAX_IMAGE_PIXELS
        if previous is not None and previous < max_pixels:
            Image.MAX_IMAGE_PIXELS = max_pixels
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = previous


def _open(path: str, max_pixels: int) -> Image.Image:
    """``Image.open`` (header only) with the failures turned into BadImageError; an image of more
    than ``max_pixels`` pixels is refused."""
    try:
        with pil_pixel_limit(max_pixels), warnings.catch_warnings():
            # PIL warns above its limit; the check below decides
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(path)
    except FileNotFoundError:
        raise BadImageError(path, "file not found") from None
    except IsADirectoryError:
        raise BadImageError(path, "is a directory, not an image file") from None
    except PermissionError as e:
        raise BadImageError(path, f"cannot be opened: {e.strerror}") from None
    except UnidentifiedImageError:
        size = os.path.getsize(path)
        if size == 0:
            raise BadImageError(path, "is an empty file") from None
        with open(path, "rb") as f:
            head = f.read(16)
        raise BadImageError(
            path, f"is not an image file PIL can read (it starts with {head!r}, {size} bytes)"
        ) from None
    except Image.DecompressionBombError as e:  # above twice PIL's limit, which is at least ours
        count = re.search(r"\((\d+) pixels\)", str(e))
        raise _too_many_pixels(path, count[1] if count else "too many", max_pixels) from None
    except OSError as e:  # a truncated or corrupt header
        raise BadImageError(path, f"is truncated or corrupt ({e})") from None
    w, h = image.size
    if w * h > max_pixels:
        image.close()
        raise _too_many_pixels(path, f"{w}x{h} = {w * h}", max_pixels)
    return image


def exif_orientation(image: Image.Image) -> int:
    """EXIF orientation tag (1-8) of an opened image; 1 (upright) when absent or unreadable."""
    try:
        orientation = image.getexif().get(EXIF_ORIENTATION_TAG, 1)
    except Exception:  # malformed EXIF: PIL raises many types, the pixels are still fine
        return 1
    return orientation if isinstance(orientation, int) and 1 <= orientation <= 8 else 1


def image_size(path: str, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Tuple[int, int]:
    """(height, width) of an image file as :func:`read_image` returns it, from its header.

    Raises:
        BadImageError: the file is missing or not an image, or has more than ``max_pixels``
            pixels (a truncated body is only found by :func:`read_image`).
    """
    with _open(path, max_pixels) as image:
        w, h = image.size
        if exif_orientation(image) in TRANSPOSING_ORIENTATIONS:
            w, h = h, w
    return h, w


def _to_rgb(image: Image.Image) -> np.ndarray:
    """(H, W, 3) uint8 RGB array of an image in any PIL mode."""
    if image.mode in SIXTEEN_BIT_MODES:
        gray = np.asarray(image).astype(np.int64) >> 8
        gray = np.clip(gray, 0, 255).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if image.mode == "F":
        gray = np.clip(np.nan_to_num(np.asarray(image)), 0, 255).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if image.mode != "RGB":
        image = image.convert("RGB")
    return np.asarray(image)


def read_image(
    path: str, format: Optional[str] = "BGR", max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
) -> np.ndarray:
    """Read an image file as an (H, W, 3) uint8 array in ``format`` ("BGR" or "RGB").

    Args:
        path: a local image file.
        format: channel order of the result.
        max_pixels: larger images are refused before decoding (``INPUT.MAX_IMAGE_PIXELS``).
    Returns:
        the image, EXIF orientation applied (H, W are the displayed height and width).
    Raises:
        BadImageError: the file is missing, empty, not an image, truncated or corrupt, or has
            more than ``max_pixels`` pixels.
    """
    if format not in ("BGR", "RGB"):
        raise ValueError(f"read_image: format must be 'BGR' or 'RGB', got {format!r}")
    with _open(path, max_pixels) as image:
        try:
            image.load()
            if exif_orientation(image) != 1:
                image = ImageOps.exif_transpose(image)
            array = _to_rgb(image)
        except OSError as e:  # "image file is truncated", broken data streams, ...
            raise BadImageError(path, f"is truncated or corrupt ({e})") from None
        except (ValueError, SyntaxError, EOFError) as e:  # raised by some PIL decoders
            raise BadImageError(path, f"is corrupt ({e})") from None
    if array.ndim != 3 or array.shape[2] != 3 or 0 in array.shape:
        raise BadImageError(path, f"decodes to an array of unusable shape {array.shape}")
    return array[:, :, ::-1] if format == "BGR" else array
