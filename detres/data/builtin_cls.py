"""The built-in classification set: small synthetic images, generated on first use.

Ten classes of shapes and textures (disk, square, triangle, ring, cross; horizontal, vertical
and diagonal stripes, checkerboard, dots). Colours, sizes, positions, stripe periods and
pixel noise vary at random, so colour alone never tells the class: the network must learn
shape and texture. Images are 32x32 RGB PNGs in ImageFolder layout
(``<root>/{train,val}/<class>/<index>.png``), read by the same loader as ImageNet.

Generation is deterministic (one seed per image) and takes a few seconds; the folder is
written under a temporary name and renamed, so concurrent first uses (torchrun ranks, test
workers) never see a half-written set.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

VERSION = "v1"
CLASS_NAMES = ("disk", "square", "triangle", "ring", "cross",
               "hstripes", "vstripes", "diagonal", "checker", "dots")
IMAGE_SIZE = 32
SPLIT_SIZES = {"train": 500, "val": 100}   # images per class
SUPERSAMPLE = 4                            # draw at 4x, then downsample: anti-aliased edges


def cache_root() -> Path:
    """``$DETRES_CACHE`` or ``~/.cache/detres``."""
    return Path(os.environ.get("DETRES_CACHE") or Path.home() / ".cache" / "detres")


def default_root() -> Path:
    return cache_root() / f"builtin_cls_{VERSION}"


def ensure_builtin_cls(root: str | Path | None = None) -> Path:
    """Returns the folder holding ``train/`` and ``val/``, generating it when absent."""
    root = Path(root) if root is not None else default_root()
    if (root / "train").is_dir() and (root / "val").is_dir():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=root.parent))
    try:
        for split, per_class in SPLIT_SIZES.items():
            for label, name in enumerate(CLASS_NAMES):
                folder = tmp / split / name
                folder.mkdir(parents=True)
                for i in range(per_class):
                    seed = (0 if split == "train" else 1_000_000) + label * 10_000 + i
                    Image.fromarray(render(label, seed)).save(folder / f"{i:04d}.png")
        try:
            os.rename(tmp, root)
        except OSError:  # another process finished first; its copy is identical
            if not (root / "val").is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def _colours(rng: np.random.Generator) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """A foreground and background colour at least 80 grey levels apart in luminance."""
    while True:
        fg, bg = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
        lum = np.array([0.299, 0.587, 0.114])
        if abs(float(fg @ lum - bg @ lum)) >= 80:
            return tuple(int(v) for v in fg), tuple(int(v) for v in bg)


def render(label: int, seed: int) -> np.ndarray:
    """One (32, 32, 3) uint8 image of class ``label``."""
    rng = np.random.default_rng(seed)
    fg, bg = _colours(rng)
    s = IMAGE_SIZE * SUPERSAMPLE
    image = Image.new("RGB", (s, s), bg)
    draw = ImageDraw.Draw(image)
    name = CLASS_NAMES[label]
    if label < 5:
        _draw_shape(draw, name, rng, fg, s)
    else:
        _draw_texture(draw, name, rng, fg, s)
    small = image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR)
    pixels = np.asarray(small, dtype=np.float32) + rng.normal(0, 8, (IMAGE_SIZE, IMAGE_SIZE, 3))
    return np.clip(pixels, 0, 255).astype(np.uint8)


def _draw_shape(draw: ImageDraw.ImageDraw, name: str, rng: np.random.Generator,
                fg: tuple[int, ...], s: int) -> None:
    r = rng.uniform(0.22, 0.36) * s                              # half size
    cx, cy = rng.uniform(r + 2, s - r - 2, 2)
    box = (cx - r, cy - r, cx + r, cy + r)
    if name == "disk":
        draw.ellipse(box, fill=fg)
    elif name == "square":
        draw.rectangle(box, fill=fg)
    elif name == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fg)
    elif name == "ring":
        draw.ellipse(box, outline=fg, width=int(rng.uniform(0.22, 0.32) * r))
    elif name == "cross":
        w = rng.uniform(0.25, 0.4) * r
        draw.rectangle((cx - r, cy - w, cx + r, cy + w), fill=fg)
        draw.rectangle((cx - w, cy - r, cx + w, cy + r), fill=fg)


def _draw_texture(draw: ImageDraw.ImageDraw, name: str, rng: np.random.Generator,
                  fg: tuple[int, ...], s: int) -> None:
    period = rng.uniform(0.16, 0.3) * s
    width = period * rng.uniform(0.35, 0.6)
    phase = rng.uniform(0, period)
    starts = np.arange(-period + phase, 2 * s, period)
    if name == "hstripes":
        for y in starts:
            draw.rectangle((0, y, s, y + width), fill=fg)
    elif name == "vstripes":
        for x in starts:
            draw.rectangle((x, 0, x + width, s), fill=fg)
    elif name == "diagonal":
        for x in np.arange(-s - period + phase, 2 * s, period):  # 45-degree bands
            draw.polygon([(x, 0), (x + width, 0), (x + width - s, s), (x - s, s)], fill=fg)
    elif name == "checker":
        for i, y in enumerate(starts):
            for j, x in enumerate(starts):
                if (i + j) % 2 == 0:
                    draw.rectangle((x, y, x + period, y + period), fill=fg)
    elif name == "dots":
        r = width / 2
        for y in starts:
            for x in starts:
                draw.ellipse((x - r, y - r, x + r, y + r), fill=fg)
