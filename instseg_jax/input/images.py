"""Image decoding to uint8 RGB for every mode PIL reads: grey, grey+alpha, RGBA, palette, 16-bit."""

from __future__ import annotations

import numpy as np
from PIL import Image, UnidentifiedImageError


class DataError(ValueError):
    """Bad input data; the message names the file, the field and the fix."""


class UnreadableImage(DataError):
    """An image file that cannot be decoded (corrupt, truncated, not an image)."""


def decode_image(path) -> np.ndarray:
    """uint8[H, W, 3] RGB pixels of an image file.

    Alpha is dropped, palettes are expanded, 16- and 32-bit grey images are scaled from their
    full integer range to 8 bits.
    """
    try:
        with Image.open(path) as image:
            image.load()  # decode now: a truncated file fails here, not later
            if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
                pixels = np.asarray(image)
                if image.mode == "F":
                    pixels = np.clip(pixels, 0, 255)
                else:
                    bits = 16 if image.mode.startswith("I;16") else 32
                    if bits == 32 and pixels.max(initial=0) < 2**16:
                        bits = 16  # PIL opens 16-bit PNGs as mode "I"
                    pixels = pixels.astype(np.float64) / (2**bits - 1) * 255.0
                grey = np.round(pixels).astype(np.uint8)
                return np.repeat(grey[..., None], 3, axis=2)
            return np.asarray(image.convert("RGB"))
    except FileNotFoundError as error:
        raise DataError(f"{path}: image file not found") from error
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise UnreadableImage(f"{path}: cannot decode image ({error})") from error
