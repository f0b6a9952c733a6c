"""Images: decoding any image file to the (H, W, 3) uint8 RGB array every dataset, the
Predictor and the tools read, and the data layer's user error (``DatasetError``).

``read_image`` turns any JPEG/PNG/BMP/WebP/TIFF/GIF file into an (H, W, 3) uint8 RGB array of
the pixels as stored: the EXIF orientation is ignored, in training and inference alike, as COCO
does (its boxes and sizes are on the stored pixels; a square image that a viewer shows rotated
would otherwise pass the size check with every box misplaced). Grayscale, CMYK and
palette images become RGB, transparent pixels are composited over black (the colour the batch
is padded with), 16-bit images are scaled to 8 bits. A missing, empty, truncated or
undecodable file raises ``ImageDecodeError`` naming the path.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor


class DatasetError(ValueError):
    """Bad dataset input: the message names the file and the id (image, annotation, class)."""


class ImageDecodeError(DatasetError):
    """An image file that is missing, empty, truncated or cannot be decoded."""


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Decodes an image file to RGB.

    Returns:
        (H, W, 3) uint8 array, RGB, the pixels as stored (EXIF orientation ignored).

    Raises:
        ImageDecodeError: the file is missing, empty, truncated or not an image.
    """
    with _opened(path) as im:
        im.load()  # decodes now, so a truncated file fails here and not later
        return pil_to_rgb(im)


def read_image_size(path: str | os.PathLike) -> tuple[int, int]:
    """(h, w) of an image file as stored, from its header alone (nothing decoded).

    Raises:
        ImageDecodeError: the file is missing, empty or not an image.
    """
    with _opened(path) as im:
        w, h = im.size
        return h, w


@contextlib.contextmanager
def _opened(path: str | os.PathLike) -> Iterator[Image.Image]:
    """The open PIL image of ``path``; every failure, opening or inside the block, is an
    ``ImageDecodeError`` naming the file."""
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise ImageDecodeError(f"{path}: image file is empty")
        with Image.open(path) as im:
            yield im
    except ImageDecodeError:
        raise
    except FileNotFoundError:
        raise ImageDecodeError(f"{path}: image file not found") from None
    except UnidentifiedImageError:
        raise ImageDecodeError(f"{path}: not a readable image (unknown or corrupt format)"
                               ) from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ImageDecodeError(f"{path}: cannot decode image: {e}") from e


def image_to_tensor(image: np.ndarray) -> Tensor:
    """(H, W, 3) uint8 RGB array -> (3, H, W) uint8 tensor (contiguous, no value change)."""
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))


def pil_to_rgb(im: Image.Image) -> np.ndarray:
    """A PIL image of any mode -> (H, W, 3) uint8 RGB, as ``read_image`` reads files."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16-bit grayscale (PNG, TIFF); "I" is how older Pillow opens 16-bit PNGs. Keep the
        # high byte, as Pillow does for 16-bit RGB, rather than clipping, which would saturate.
        a = (np.clip(np.asarray(im).astype(np.int64), 0, 65535) >> 8).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(a[:, :, None], 3, axis=2))
    if im.mode == "F":
        a = np.asarray(im, dtype=np.float64)
        lo, hi = float(a.min()), float(a.max())
        a = np.zeros_like(a) if hi <= lo else (a - lo) * (255.0 / (hi - lo))
        return np.repeat(np.rint(a).astype(np.uint8)[:, :, None], 3, axis=2)
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = np.asarray(im.convert("RGBA")).astype(np.uint16)
        rgb = (rgba[:, :, :3] * rgba[:, :, 3:] + 127) // 255  # over black
        return rgb.astype(np.uint8)
    if im.mode != "RGB":
        im = im.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV, RGBX
    return np.asarray(im, dtype=np.uint8).copy()
