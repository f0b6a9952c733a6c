"""Built-in synthetic datasets, deterministic, made on first use (docs/architecture.md, Datasets).

They are written in the formats a user brings, so the ordinary loaders read them:

- ``shapes`` (detection): COCO JSON + JPEG images, read by ``COCODetection``::

      <cache>/shapes-<hash>/
        params.json                          the generator parameters
        annotations/instances_{train,val}.json
        train/000001.jpg ...   val/000001.jpg ...

  Five classes (circle, square, triangle, star, ring), 1-8 objects per image, random colour,
  rotation (square, triangle, star), ellipse stretch (circle, ring), partial occlusion (a
  later object may cover up to 30 % of an earlier one's pixels), and a textured, noisy
  background (gradient, blotches or stripes, plus Gaussian noise on everything). Promises,
  checked by tests/test_builtin.py: every box is at least ``min_object_size`` (10) px wide and
  high and lies inside the image; box areas fall in all three COCO ranges (small < 32^2,
  medium, large > 96^2; at 128 px about 45 / 45 / 10 %); every class occurs. Boxes are the
  tight box of the whole shape (also where another shape covers part of it); ``area`` is the
  box area w * h, which pycocotools uses for its small/medium/large split.

Every set lives in ``<cache>/<name>-<hash of its parameters and generator version>``, with
``<cache>`` = ``$DETRES_CACHE`` or ``~/.cache/detres``; changing a parameter or the generator
version makes a new folder. A set is generated into a temporary folder and renamed into place,
so a killed generation never leaves a half set, and ranks of a torchrun job racing to generate
it all end up with the same folder. The same parameters give byte-identical files: one numpy
generator per image seeded by (seed, split, index), fixed JPEG settings, JSON with sorted keys.

To add another built-in set (e.g. an ImageFolder classification set), write
``generate(out_dir: Path, **params)`` and call ``ensure_generated(name, params, generate)``.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Callable

import cv2
import numpy as np
from PIL import Image, ImageDraw

logger = logging.getLogger(__name__)

SHAPE_CLASSES = ("circle", "square", "triangle", "star", "ring")
SHAPES_VERSION = 1  # bump when the generator's output changes
JPEG_QUALITY = 92


def default_cache_root() -> Path:
    """``$DETRES_CACHE`` or ``~/.cache/detres``."""
    env = os.environ.get("DETRES_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "detres"


def ensure_generated(name: str, params: dict[str, Any], generate: Callable[..., None],
                     root: str | os.PathLike | None = None) -> Path:
    """Returns ``<root>/<name>-<hash(params)>``, running ``generate(tmp_dir, **params)`` first
    if it does not exist yet. ``params`` must be JSON-serialisable and include a version."""
    root = Path(root).expanduser() if root is not None else default_cache_root()
    key = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]
    folder = root / f"{name}-{key}"
    if folder.is_dir():
        return folder
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{folder.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    logger.info("generating built-in dataset %s into %s", name, folder)
    try:
        tmp.mkdir()
        generate(tmp, **params)
        (tmp / "params.json").write_text(json.dumps(params, sort_keys=True, indent=1) + "\n")
        try:
            os.rename(tmp, folder)
        except OSError:
            if not folder.is_dir():  # not a lost race with another process: a real error
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def ensure_builtin_shapes(root: str | os.PathLike | None = None, *, num_train: int = 1500,
                          num_val: int = 200, image_size: int = 128, seed: int = 0,
                          min_object_size: int = 10) -> Path:
    """The built-in shapes detection set, generated on first use; returns its folder.

    Use ``shapes_split(folder, "train")`` for the annotation file and image folder.
    """
    params = {"version": SHAPES_VERSION, "num_train": num_train, "num_val": num_val,
              "image_size": image_size, "seed": seed, "min_object_size": min_object_size}
    return ensure_generated("shapes", params, _generate_shapes, root)


def shapes_split(folder: str | os.PathLike, split: str) -> tuple[Path, Path]:
    """(annotation JSON, image folder) of a split (``"train"`` or ``"val"``) of a shapes set."""
    folder = Path(folder)
    return folder / "annotations" / f"instances_{split}.json", folder / split


def _generate_shapes(out: Path, *, version: int, num_train: int, num_val: int,
                     image_size: int, seed: int, min_object_size: int) -> None:
    del version  # part of the cache key only
    (out / "annotations").mkdir(parents=True, exist_ok=True)
    categories = [{"id": k + 1, "name": n, "supercategory": "shape"}
                  for k, n in enumerate(SHAPE_CLASSES)]
    for split_code, (split, n) in enumerate((("train", num_train), ("val", num_val))):
        (out / split).mkdir()
        images, annotations = [], []
        for i in range(n):
            rng = np.random.default_rng([seed, split_code, i])
            image, boxes, labels, _ = render_shapes_image(rng, image_size, min_object_size)
            file_name = f"{i + 1:06d}.jpg"
            Image.fromarray(image).save(out / split / file_name, format="JPEG",
                                        quality=JPEG_QUALITY, subsampling=0, optimize=False)
            images.append({"id": i + 1, "file_name": file_name, "width": image_size,
                           "height": image_size})
            for b, lab in zip(boxes.tolist(), labels.tolist()):
                w, h = b[2] - b[0], b[3] - b[1]
                annotations.append({"id": len(annotations) + 1, "image_id": i + 1,
                                    "category_id": lab + 1, "bbox": [b[0], b[1], w, h],
                                    "area": w * h, "iscrowd": 0})
        data = {"images": images, "annotations": annotations, "categories": categories,
                "info": {"description": f"detres built-in shapes, {split}, seed {seed}"},
                "licenses": []}
        (out / "annotations" / f"instances_{split}.json").write_text(
            json.dumps(data, sort_keys=True, separators=(",", ":")) + "\n")


def render_shapes_image(rng: np.random.Generator, image_size: int = 128,
                        min_object_size: int = 10
                        ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Draws one image of the shapes set.

    Returns:
        image (S, S, 3) uint8 RGB; boxes (M, 4) float32 xyxy, the tight box of each whole
        shape; labels (M,) int64 indexing ``SHAPE_CLASSES``; masks (M, S, S) bool, the pixels
        of each whole shape (before occlusion).
    """
    s = image_size
    image = _background(rng, s)
    n = int(rng.integers(1, 9))
    # Shape sizes log-uniform between the minimum and a cap that lets n objects fit; one image
    # in four also has one large shape (at 128 px, larger than COCO's 96 px "large" limit).
    hi = max(min(0.85 * s, 1.7 * s / np.sqrt(n)), 2.0 * min_object_size)
    sides = np.exp(rng.uniform(np.log(min_object_size + 4), np.log(hi), n))
    if rng.uniform() < 0.25:
        sides[0] = rng.uniform(0.8, 0.97) * s
    sides = np.sort(sides)[::-1]  # large first, so that small shapes are drawn on top
    masks: list[np.ndarray] = []
    visible: list[np.ndarray] = []  # pixels of each shape not covered by later ones
    boxes, labels = [], []
    for side in sides:
        placed = _place_shape(rng, s, float(side), min_object_size, masks, visible)
        if placed is None:
            continue
        label, (x1, y1), local = placed
        box = (slice(y1, y1 + local.shape[0]), slice(x1, x1 + local.shape[1]))
        for v in visible:
            v[box] &= ~local
        mask = np.zeros((s, s), bool)
        mask[box] = local
        masks.append(mask)
        visible.append(mask.copy())
        boxes.append([x1, y1, x1 + local.shape[1], y1 + local.shape[0]])
        labels.append(label)
        region = image[box]
        region[local] = _contrasting_colour(rng, region[local].mean(0))
    image += rng.standard_normal(image.shape, dtype=np.float32) * np.float32(rng.uniform(3, 10))
    image = np.clip(image, 0, 255).astype(np.uint8)
    return (image, np.asarray(boxes, np.float32).reshape(-1, 4), np.asarray(labels, np.int64),
            np.asarray(masks, bool).reshape(-1, s, s))


def _place_shape(rng: np.random.Generator, s: int, side: float, min_size: int,
                 masks: list[np.ndarray], visible: list[np.ndarray]
                 ) -> tuple[int, tuple[int, int], np.ndarray] | None:
    """A shape of about ``side`` px that leaves >= 70 % of each earlier shape visible.

    Returns its label, the top-left corner (x1, y1) of its box, and its mask within the box.
    """
    label = int(rng.integers(len(SHAPE_CLASSES)))
    angle = float(rng.uniform(0, 2 * np.pi))
    stretch = float(rng.uniform(0.75, 1.0))
    for _ in range(20):
        local = _draw_shape(label, side, angle, stretch)
        ys, xs = np.nonzero(local)
        local = local[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
        bh, bw = local.shape
        if min(bh, bw) < min_size:
            side *= min_size / min(bh, bw) + 0.05
            continue
        if max(bh, bw) > s:
            side *= 0.9
            continue
        x1 = int(rng.integers(0, s - bw + 1))
        y1 = int(rng.integers(0, s - bh + 1))
        box = (slice(y1, y1 + bh), slice(x1, x1 + bw))
        if all((v[box] & local).sum() <= v.sum() - 0.7 * m.sum()
               for m, v in zip(masks, visible)):
            return label, (x1, y1), local
        side = max(side * 0.9, min_size)
    return None


def _draw_shape(label: int, side: float, angle: float, stretch: float) -> np.ndarray:
    """A bool mask of one shape, centred in a square patch."""
    r = side / 2.0
    size = int(np.ceil(side)) + 4
    c = size / 2.0
    im = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(im)
    name = SHAPE_CLASSES[label]
    if name in ("circle", "ring"):
        ry = r * stretch
        draw.ellipse([c - r, c - ry, c + r, c + ry], fill=255)
        if name == "ring":
            q = 0.55
            draw.ellipse([c - q * r, c - q * ry, c + q * r, c + q * ry], fill=0)
        if angle % np.pi > np.pi / 2:  # ellipses lie either way
            im = im.transpose(Image.Transpose.TRANSPOSE)
    else:
        if name == "square":
            radii, k = [r] * 4, 4
        elif name == "triangle":
            radii, k = [r] * 3, 3
        else:  # star: 5 outer points, inner radius 0.45 r
            radii, k = [r, 0.45 * r] * 5, 10
        t = angle + 2 * np.pi * np.arange(k) / k
        pts = [(c + rr * np.cos(a), c + rr * np.sin(a)) for rr, a in zip(radii, t)]
        draw.polygon(pts, fill=255)
    return np.asarray(im) > 0


def _background(rng: np.random.Generator, s: int) -> np.ndarray:
    """(s, s, 3) float32 textured background: gradient, blotches or stripes."""
    base = rng.uniform(30, 225, 3).astype(np.float32)
    kind = int(rng.integers(3))
    if kind == 0:    # linear gradient towards a second colour
        other = np.clip(base + rng.uniform(-60, 60, 3), 0, 255)
        a = rng.uniform(0, 2 * np.pi)
        yy, xx = np.mgrid[0:s, 0:s].astype(np.float32) / max(s - 1, 1)
        t = (np.cos(a) * xx + np.sin(a) * yy)
        t = (t - t.min()) / max(np.ptp(t), 1e-6)
        img = base + t[..., None] * (other - base)
    elif kind == 1:  # smooth blotches: a coarse random grid, upsampled
        g = int(rng.integers(3, 9))
        coarse = rng.uniform(-45, 45, (g, g, 3)).astype(np.float32)
        img = base + cv2.resize(coarse, (s, s), interpolation=cv2.INTER_CUBIC)
    else:            # stripes of random period and direction
        a = rng.uniform(0, np.pi)
        period = rng.uniform(6, 24)
        yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)
        wave = np.sin(2 * np.pi * (np.cos(a) * xx + np.sin(a) * yy) / period)
        img = base + wave[..., None] * rng.uniform(10, 35, 3).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.float32)


def _contrasting_colour(rng: np.random.Generator, behind: np.ndarray) -> np.ndarray:
    """A random colour at least 100 (RGB distance) away from the mean colour behind it."""
    for _ in range(30):
        colour = rng.uniform(0, 255, 3)
        if np.linalg.norm(colour - behind) >= 100:
            return colour
    return np.where(behind > 127, 20.0, 235.0)
