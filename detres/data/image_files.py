"""Images given to a tool or a predictor: image files on a command line (tools/infer.py,
tools/infer_loc.py; folders searched recursively, and where each image's drawing goes under
the output folder), and a file or an array as the predictors take it (``load_image``)."""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image as PILImage

from detres.data.images import DatasetError, pil_to_rgb, read_image

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
# what the Predictor and the LocPredictor take (``load_image``)
Image = str | os.PathLike | np.ndarray | PILImage.Image | torch.Tensor


def is_one_image(x: object) -> bool:
    """Whether ``x`` is one image (a path, array, PIL image or tensor), not a list of them."""
    return isinstance(x, (str, os.PathLike, np.ndarray, PILImage.Image, torch.Tensor))
CHANNEL_ORDERS = ("rgb", "bgr")
ACCEPTED = ("an image file path; a PIL image; an (H, W, 3) uint8 numpy array in the channel "
            "order given (rgb by default, bgr for OpenCV's), (H, W) or (H, W, 1) grayscale, or "
            "(H, W, 4) with alpha (composited over black, as a file with alpha is read); a "
            "torch tensor (3, H, W) or (1, H, W) (torchvision's CHW), uint8 0..255 or float "
            "0..1; or a list of these")


def load_image(image: Image, channels: str = "rgb", index: int = 0) -> np.ndarray:
    """One image as an (H, W, 3) uint8 RGB array.

    A file: its pixels as stored, EXIF orientation ignored, as in training. A PIL image: as a
    file of its mode is read. Arrays and tensors (layouts in ``ACCEPTED``) hold their colour
    channels in the order ``channels`` says (``bgr``: OpenCV's); an RGB uint8 array is
    returned as it is. Anything else is a ValueError naming input ``index``, its type, shape
    and dtype, and what is accepted.
    """
    if channels not in CHANNEL_ORDERS:
        raise ValueError(f"channels must be one of {CHANNEL_ORDERS}, got {channels!r}")
    if isinstance(image, (str, os.PathLike)):
        return read_image(Path(image))
    if isinstance(image, PILImage.Image):
        return pil_to_rgb(image)
    if isinstance(image, torch.Tensor):
        return _from_tensor(image, channels, index)
    if isinstance(image, np.ndarray):
        return _from_array(image, channels, index)
    raise _refusal(image, index, "not an image")


def _from_array(a: np.ndarray, channels: str, index: int) -> np.ndarray:
    """(H, W[, 1|3|4]) uint8 in ``channels`` order -> (H, W, 3) uint8 RGB."""
    if a.dtype != np.uint8:
        raise _refusal(a, index, "arrays must be uint8 (0..255)")
    if a.ndim == 2:
        a = a[:, :, None]
    if a.ndim != 3 or a.shape[2] not in (1, 3, 4) or 0 in a.shape:
        raise _refusal(a, index, "not an (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) image")
    if a.shape[2] == 1:
        return np.ascontiguousarray(np.repeat(a, 3, axis=2))
    if channels == "bgr":   # BGR(A) -> RGB(A); a copy, as the resize needs positive strides
        a = np.ascontiguousarray(np.concatenate([a[:, :, 2::-1], a[:, :, 3:]], axis=2))
    if a.shape[2] == 4:
        return pil_to_rgb(PILImage.fromarray(a, "RGBA"))
    return a


def _from_tensor(t: torch.Tensor, channels: str, index: int) -> np.ndarray:
    """(3|1, H, W) uint8 0..255 or float 0..1 -> (H, W, 3) uint8 RGB."""
    if t.dim() != 3 or t.shape[0] not in (1, 3) or 0 in t.shape:
        raise _refusal(t, index, "tensors must be (3, H, W) or (1, H, W) (channels first)")
    t = t.detach().cpu()
    if t.is_floating_point():
        lo, hi = (float(v) for v in t.float().aminmax())
        if not (lo >= 0.0 and hi <= 1.0):   # also refuses NaN
            raise _refusal(t, index, f"float tensors must hold 0..1 (torchvision's to_tensor "
                                     f"convention), this one spans {lo:g}..{hi:g}; give 0..255 "
                                     f"as uint8")
        t = (t.float() * 255).round().to(torch.uint8)   # exact inverse of to_tensor's /255
    elif t.dtype != torch.uint8:
        raise _refusal(t, index, "tensors must be uint8 (0..255) or float (0..1)")
    return _from_array(np.ascontiguousarray(t.permute(1, 2, 0).numpy()), channels, index)


def _refusal(image: object, index: int, why: str) -> ValueError:
    shape = tuple(getattr(image, "shape", ())) or "-"
    kind = f"{type(image).__module__}.{type(image).__qualname__}"
    return ValueError(f"input {index}: {kind} of shape {shape} and dtype "
                      f"{getattr(image, 'dtype', '-')}: {why}; accepted: {ACCEPTED}")


def list_images(paths: Sequence[str | os.PathLike], out: Path) -> list[tuple[Path, str]]:
    """(file, name) of every image: a folder's images (recursively, sorted, none under ``out``)
    named by their path relative to it, an image file by its file name."""
    files: list[tuple[Path, str]] = []
    out_root = out.resolve()
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES
                           and f.is_file() and not f.resolve().is_relative_to(out_root))
            if not found:
                raise DatasetError(f"{p}: no images ({', '.join(IMAGE_SUFFIXES)}) found")
            files.extend((f, f.relative_to(p).as_posix()) for f in found)
        elif p.is_file():
            files.append((p, p.name))
        else:
            raise DatasetError(f"{p}: no such image file or folder")
    return files


def drawing_paths(images: Sequence[tuple[Path, str]], out: Path) -> list[Path]:
    """``out/<name>.png`` for each image (:func:`output_files`)."""
    return [files[0] for files in output_files(images, out, (".png",))]


def output_files(sources: Sequence[tuple[object, str]], out: Path, suffixes: Sequence[str]
                 ) -> list[tuple[Path, ...]]:
    """``out/<name><suffix>`` for each ``(source, name)`` and suffix; a DatasetError before
    any work when two sources share a name or a file would land outside ``out`` (through a
    symbolic link in it)."""
    root, first_of, paths = out.resolve(), {}, []
    for source, name in sources:
        files = tuple(out / f"{name}{suffix}" for suffix in suffixes)
        if name in first_of:
            raise DatasetError(f"{first_of[name]} and {source} would both be written as "
                               f"{files[0]}; give their common folder instead, rename one, or "
                               f"run them separately")
        for path in files:
            if not path.resolve().is_relative_to(root):
                raise DatasetError(f"{source}: its output {path} would be written outside "
                                   f"--out {out} (to {path.resolve()})")
        first_of[name] = source
        paths.append(files)
    return paths
