"""Image decoding to uint8 RGB for every mode PIL reads: grey, grey+alpha, RGBA, palette, 16- and
32-bit grey; the EXIF orientation is applied as detectron2's ``read_image`` does."""

from __future__ import annotations

import numpy as np
from PIL import Image, UnidentifiedImageError


class DataError(ValueError):
    """Bad input data; the message names the file, the field and the fix."""


class UnusableExample(DataError):
    """An example that cannot be trained or evaluated on as it is: the pipeline skips it and
    counts it under ``kind`` (a report.ISSUE_KINDS name); strict mode raises it."""

    kind = "unusable_example"


class UnreadableImage(UnusableExample):
    """An image file that cannot be decoded (corrupt, truncated, not an image)."""

    kind = "unreadable_image"


class ImageSizeMismatch(UnusableExample):
    """An image whose decoded size differs from the height/width its annotations were made for."""

    kind = "image_size_mismatch"


class BadSegmentation(UnusableExample):
    """A segmentation that does not fit its image (an RLE of another size, RLE counts that do
    not cover the image, an unknown format): the example's annotations cannot be trusted."""

    kind = "bad_segmentation"


# EXIF orientation (tag 0x0112) -> the transposition that makes the stored pixels upright.
_EXIF_ORIENTATION = 0x0112
_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def _upright(image: Image.Image) -> Image.Image:
    """The image as a viewer shows it: its EXIF orientation applied (a phone photo is stored
    sideways with a tag saying so). COCO-style annotations, and their width and height, refer
    to these pixels, as in detectron2. An unreadable EXIF block counts as no tag."""
    try:
        orientation = image.getexif().get(_EXIF_ORIENTATION, 1)
    except (OSError, SyntaxError, ValueError, KeyError, TypeError):
        return image
    method = _UPRIGHT.get(orientation)
    return image if method is None else image.transpose(method)


def _grey_to_uint8(image: Image.Image, path) -> np.ndarray:
    """uint8[H, W] of a 16-bit, 32-bit integer or float grey image.

    16-bit images are scaled from 0..65535. 32-bit integer images (mode "I") are read by the
    range their values use: 8-bit values are kept as they are, values up to 65535 are scaled
    from the 16-bit range (older PIL opens 16-bit PNGs as "I"), larger ones from 0..2**31-1.
    Float images are clipped to 0..255.
    """
    pixels = np.asarray(image)
    if image.mode == "F":
        return np.round(np.clip(pixels, 0, 255)).astype(np.uint8)
    if image.mode.startswith("I;16"):
        full = 2**16 - 1
    else:
        low, high = int(pixels.min(initial=0)), int(pixels.max(initial=0))
        if low < 0:
            raise UnreadableImage(
                f"{path}: 32-bit image with negative values (range {low}..{high}); convert it "
                "to 8-bit or 16-bit grey or to RGB"
            )
        if high <= 255:
            return pixels.astype(np.uint8)
        full = 2**16 - 1 if high <= 2**16 - 1 else 2**31 - 1
    return np.round(pixels.astype(np.float64) / full * 255.0).astype(np.uint8)


def decode_image(path) -> np.ndarray:
    """uint8[H, W, 3] RGB pixels of an image file, upright (its EXIF orientation applied).

    Alpha is dropped, palettes are expanded, 16- and 32-bit grey images are brought to 8 bits
    (see _grey_to_uint8).
    """
    try:
        with Image.open(path) as image:
            image.load()  # decode now: a truncated file fails here, not later
            image = _upright(image)
            if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
                grey = _grey_to_uint8(image, path)
                return np.repeat(grey[..., None], 3, axis=2)
            return np.asarray(image.convert("RGB"))
    except FileNotFoundError as error:
        raise DataError(f"{path}: image file not found") from error
    except UnusableExample:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise UnreadableImage(f"{path}: cannot decode image ({error})") from error
