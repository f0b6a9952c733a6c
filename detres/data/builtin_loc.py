"""The built-in localization set: ImageNet's localization layout with synthetic shapes.

Generated deterministically on first use by ``ensure_generated`` (temporary folder + rename;
the same parameters give byte-identical files), in exactly the layout of
``detres.data.localization``, so ``LocalizationDataset`` reads it as it reads ImageNet::

    <cache>/loc-<hash>/
      params.json
      train/<class>/<class>_<i>.JPEG          i = 1 .. num_train_per_class
      val/<class>/val_<nnnnnnnn>.JPEG         val numbers interleave the classes, as ILSVRC's
      bbox/train/<class>/<class>_<i>.xml      nested per class (ILSVRC2012_bbox_train_v2)
      bbox/val/val_<nnnnnnnn>.xml             flat (ILSVRC2012_bbox_val_v3)

The class folder names are the class names (``LOC_CLASSES``), as wnids are ImageNet's.

Images. One class per image (its folder): one object three times in four, otherwise two or
three non-overlapping instances of the same class; each has a random colour that contrasts
with the textured, noisy background of ``detres.data.builtin`` and a random rotation (circle
and ring: a random ellipse stretch instead). Images are ``image_size`` on the longer side and
75-100 % of that on the shorter (landscape seven times in ten), like ImageNet's mixed aspect
ratios. Objects are large, as ImageNet's are: the longer side of a lone object's box is
about 42-88 % of the image's shorter side, that of each of several instances 32-48 %. Promised
(and checked by tests/test_localization_data.py): every box's longer side is 30-90 % of the
shorter image side, its shorter side at least 15 %, and it lies inside the image.

Boxes are the tight box of each whole shape, whole pixels by construction, written in the
ILSVRC convention (1-based, inclusive: ``xmin = x1 + 1, xmax = x2`` for the 0-based box
[x1, x2)); reading them back through ``LocalizationDataset`` returns them exactly. The XMLs
have ILSVRC's tags and layout (folder, filename without extension, source/database, size with
depth, segmented, object with name, pose, truncated, difficult, bndbox).

``train_box_fraction`` < 1 writes boxes for only that share of the train images (ImageNet has
them for about 40 %), to exercise ``missing_boxes="skip"``; the first image of each class
always has its box, so no class is left unannotated. Val images always have boxes.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from detres.data.builtin import (JPEG_QUALITY, SHAPE_CLASSES, _background, _contrasting_colour,
                                 _draw_shape, ensure_generated)
from detres.data.localization import loc_split_dirs

LOC_CLASSES = ("circle", "square", "triangle", "star", "ring",
               "cross", "crescent", "arrow", "heart", "ell")
LOC_VERSION = 1  # bump when the generator's output changes

SINGLE_SIZE = (0.42, 0.88)   # longer box side / shorter image side, one object
MULTI_SIZE = (0.32, 0.48)    # the same for each of 2-3 instances
SIZE_LIMITS = (0.30, 0.90)   # what is promised (the draws above leave room for rounding)
ASPECT = (0.75, 1.0)         # shorter image side / longer


def ensure_builtin_loc(root: str | os.PathLike | None = None, *, num_train_per_class: int = 120,
                       num_val_per_class: int = 30, image_size: int = 96, seed: int = 0,
                       train_box_fraction: float = 1.0) -> Path:
    """The built-in localization set, generated on first use; returns its folder, laid out
    as ImageNet's (``loc_split_dirs(folder, split)``: each split's images and box XMLs).

    Args:
        root: cache folder (default ``$DETRES_CACHE`` or ``~/.cache/detres``).
        num_train_per_class, num_val_per_class: images per class and split.
        image_size: longer side of every image.
        seed: generator seed; each image has its own generator seeded by (seed, split,
            class, index).
        train_box_fraction: share of train images that get a bounding-box file.
    """
    if image_size < 32:
        raise ValueError(f"image_size must be at least 32, got {image_size}")
    if not 0 < train_box_fraction <= 1:
        raise ValueError(f"train_box_fraction must be in (0, 1], got {train_box_fraction}")
    params = {"version": LOC_VERSION, "num_train_per_class": num_train_per_class,
              "num_val_per_class": num_val_per_class, "image_size": image_size, "seed": seed,
              "train_box_fraction": train_box_fraction, "classes": list(LOC_CLASSES)}
    return ensure_generated("loc", params, _generate, root)


def _generate(out: Path, *, version: int, num_train_per_class: int, num_val_per_class: int,
              image_size: int, seed: int, train_box_fraction: float, classes: list[str]) -> None:
    del version  # part of the cache key only
    k = len(classes)
    # ILSVRC numbers its val images across classes; a fixed permutation does the same here.
    val_numbers = np.random.default_rng([seed, 99]).permutation(k * num_val_per_class) + 1
    for split_code, split in enumerate(("train", "val")):
        image_dir, box_dir = loc_split_dirs(out, split)
        n = num_train_per_class if split == "train" else num_val_per_class
        for label, name in enumerate(classes):
            (image_dir / name).mkdir(parents=True)
            if split == "train":
                (box_dir / name).mkdir(parents=True)
            else:
                box_dir.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                rng = np.random.default_rng([seed, split_code, label, i])
                # drawn for every image, so the pixels do not depend on train_box_fraction
                has_box = rng.uniform() < train_box_fraction or split == "val" or i == 0
                image, boxes = render_loc_image(rng, label, image_size)
                if split == "train":
                    stem, folder, xml = f"{name}_{i + 1}", name, box_dir / name
                else:
                    stem = f"val_{int(val_numbers[label * n + i]):08d}"
                    folder, xml = "val", box_dir
                Image.fromarray(image).save(image_dir / name / f"{stem}.JPEG", format="JPEG",
                                            quality=JPEG_QUALITY, subsampling=0, optimize=False)
                if has_box:
                    (xml / f"{stem}.xml").write_text(
                        ilsvrc_xml(folder, stem, image.shape[:2], name, boxes))


def ilsvrc_xml(folder: str, stem: str, size: tuple[int, int], name: str,
               boxes: np.ndarray) -> str:
    """An ILSVRC bounding-box file: (h, w) ``size``, (M, 4) whole-pixel 0-based xyxy ``boxes``
    of class ``name``, written 1-based inclusive (xmin = x1 + 1, xmax = x2)."""
    h, w = size
    objects = "".join(
        f"\t<object>\n\t\t<name>{name}</name>\n\t\t<pose>Unspecified</pose>\n"
        f"\t\t<truncated>0</truncated>\n\t\t<difficult>0</difficult>\n\t\t<bndbox>\n"
        f"\t\t\t<xmin>{x1 + 1}</xmin>\n\t\t\t<ymin>{y1 + 1}</ymin>\n"
        f"\t\t\t<xmax>{x2}</xmax>\n\t\t\t<ymax>{y2}</ymax>\n\t\t</bndbox>\n\t</object>\n"
        for x1, y1, x2, y2 in np.rint(boxes).astype(np.int64).tolist())
    return (f"<annotation>\n\t<folder>{folder}</folder>\n\t<filename>{stem}</filename>\n"
            f"\t<source>\n\t\t<database>detres_builtin_loc</database>\n\t</source>\n"
            f"\t<size>\n\t\t<width>{w}</width>\n\t\t<height>{h}</height>\n"
            f"\t\t<depth>3</depth>\n\t</size>\n\t<segmented>0</segmented>\n"
            f"{objects}</annotation>\n")


def render_loc_image(rng: np.random.Generator, label: int, image_size: int = 96
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Draws one image of class ``label`` (index into ``LOC_CLASSES``).

    Returns:
        image (h, w, 3) uint8 RGB, max(h, w) = image_size; boxes (M, 4) float32 xyxy, whole
        pixels, the tight box of each instance.
    """
    long_side = image_size
    short = int(round(image_size * rng.uniform(*ASPECT)))
    h, w = (short, long_side) if rng.uniform() < 0.7 else (long_side, short)
    image = _background(rng, image_size)[:h, :w].copy()
    u = rng.uniform()
    n = 1 if u < 0.75 else (2 if u < 0.92 else 3)
    lo, hi = SINGLE_SIZE if n == 1 else MULTI_SIZE
    occupied = np.zeros((h, w), bool)
    boxes = []
    for _ in range(n):
        local = _sized_shape(rng, LOC_CLASSES[label], rng.uniform(lo, hi) * min(h, w), min(h, w))
        bh, bw = local.shape
        for _ in range(30):
            x1 = int(rng.integers(0, w - bw + 1))
            y1 = int(rng.integers(0, h - bh + 1))
            box = (slice(y1, y1 + bh), slice(x1, x1 + bw))
            if not (occupied[box] & local).any():
                break
        else:
            continue  # no free place for another instance: fewer instances
        occupied[box] |= local
        region = image[box]
        region[local] = _contrasting_colour(rng, region[local].mean(0))
        boxes.append([x1, y1, x1 + bw, y1 + bh])
    image += rng.standard_normal(image.shape, dtype=np.float32) * np.float32(rng.uniform(3, 10))
    image = np.clip(image, 0, 255).astype(np.uint8)
    return image, np.asarray(boxes, np.float32).reshape(-1, 4)


def _sized_shape(rng: np.random.Generator, name: str, target: float, short_side: int
                 ) -> np.ndarray:
    """The mask of one shape, cropped to its tight box, whose longer side is about ``target``
    px and within SIZE_LIMITS of ``short_side``."""
    angle = float(rng.uniform(0, 2 * np.pi))
    stretch = float(rng.uniform(0.75, 1.0))
    lo, hi = SIZE_LIMITS[0] * short_side, SIZE_LIMITS[1] * short_side
    side = target
    for _ in range(8):
        local = _tight(shape_mask(name, side, angle, stretch))
        m = max(local.shape)
        if lo <= m <= hi and abs(m - target) <= 1.5:
            break
        side *= target / m  # the tight box of a rotated shape is smaller than its side
    return local


def _tight(mask: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(mask)
    return mask[ys.min():ys.max() + 1, xs.min():xs.max() + 1]


def _polygon(name: str) -> np.ndarray:
    """(P, 2) vertices of a polygon class, centred, at most 1 from the centre."""
    if name == "cross":
        a = 0.3
        pts = [(-a, -1), (a, -1), (a, -a), (1, -a), (1, a), (a, a), (a, 1), (-a, 1), (-a, a),
               (-1, a), (-1, -a), (-a, -a)]
    elif name == "arrow":  # shaft and a wide head, pointing along +x
        pts = [(-1, -0.22), (0.1, -0.22), (0.1, -0.62), (1, 0), (0.1, 0.62), (0.1, 0.22),
               (-1, 0.22)]
    elif name == "ell":    # a square with one quadrant (about 30 % of it) cut away
        pts = [(-1, -1), (1, -1), (1, -0.1), (-0.1, -0.1), (-0.1, 1), (-1, 1)]
    elif name == "heart":
        t = np.linspace(0, 2 * np.pi, 72, endpoint=False)
        x = 16 * np.sin(t) ** 3
        y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
        pts = np.stack([x, y], 1)
    else:
        raise ValueError(f"{name!r} is not a polygon class")
    pts = np.asarray(pts, np.float64)
    pts -= (pts.min(0) + pts.max(0)) / 2
    return pts / np.linalg.norm(pts, axis=1).max()


def shape_mask(name: str, side: float, angle: float, stretch: float) -> np.ndarray:
    """A bool mask of one shape of class ``name`` in a square patch, within a circle of
    diameter ``side`` around the patch centre, rotated by ``angle``."""
    if name in SHAPE_CLASSES:  # circle, square, triangle, star, ring: the detection set's
        return _draw_shape(SHAPE_CLASSES.index(name), side, angle, stretch)
    r = side / 2.0
    size = int(np.ceil(side)) + 4
    c = size / 2.0
    if name == "crescent":  # a disc minus an offset smaller disc, the horns along -angle
        yy, xx = np.mgrid[0:size, 0:size] + 0.5 - c
        d = np.array([np.cos(angle), np.sin(angle)]) * 0.45 * r
        return ((xx ** 2 + yy ** 2 <= r * r)
                & ((xx - d[0]) ** 2 + (yy - d[1]) ** 2 > (0.8 * r) ** 2))
    pts = _polygon(name)
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    pts = pts @ rot.T * r + c
    im = Image.new("L", (size, size), 0)
    ImageDraw.Draw(im).polygon([tuple(p) for p in pts.tolist()], fill=255)
    return np.asarray(im) > 0
