"""PASCAL VOC detection dataset (VOCdevkit layout), alone or as the paper's 07+12 union.

Layout of one year, e.g. ``datasets/VOCdevkit/VOC2007``::

    ImageSets/Main/{train,val,trainval,test}.txt   one image name per line
    Annotations/<name>.xml                         size, objects (name, difficult, bndbox)
    JPEGImages/<name>.jpg

Coordinates. VOC boxes are 1-based and inclusive: a box from ``xmin`` to ``xmax`` covers
``xmax - xmin + 1`` pixels. We convert to 0-based xyxy with exclusive right/bottom edges as

    x1, y1, x2, y2 = xmin - 1, ymin - 1, xmax, ymax

so that ``x2 - x1`` is VOC's width, and pixel column c (0-based) lies in [x1, x2) exactly when
VOC's column c + 1 lies in [xmin, xmax]. Boxes are then clipped to the image; a box narrower or
shorter than 1 px after clipping is dropped and counted in the log.

Difficult objects are kept in the index (``ignore``) for evaluation, which ignores them, and
are not training targets unless ``keep_difficult``. Truncated objects are ordinary targets.

Bad input: a split file, annotation or image that is missing, an XML that does not parse,
lacks ``size`` or a box, names an unknown class, or has a box with xmax < xmin or outside
the image: a ``DatasetError`` naming the XML file and the image name (a VOC set is curated, so
no skip option is offered for annotations; ``skip_bad_images`` still covers unreadable images).

The paper's "07+12" training set is ``VOCDetection([(voc2007, "trainval"),
(voc2012, "trainval")])``: one dataset, one index, with ``image_id`` = position in the union.
"""
from __future__ import annotations

import logging
import os
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Sequence

import numpy as np

from detres.data.io import (AnnotationIndex, DatasetError, DetectionDataset, Transform,
                            filter_empty_images)

logger = logging.getLogger(__name__)

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)


class VOCDetection(DetectionDataset):
    """One or more (VOC year folder, split) pairs as a single detection dataset.

    Args:
        sources: ``(root, split)`` pairs, root being e.g. ``VOCdevkit/VOC2007`` and split a
            name in ``ImageSets/Main`` (``trainval``, ``test``); a single pair is accepted too.
        transform: see ``DetectionDataset``.
        keep_difficult: make difficult objects training targets.
        filter_empty: drop images without a training box (True for training).
        skip_bad_images: see ``DetectionDataset``.
        class_names: the classes, in label order (default the 20 VOC classes).

    Attributes:
        image_names: (N,) the VOC image names (``"000005"``, ``"2008_000002"``) as str.
        truncated: (A,) bool, the ``truncated`` flag of each box in ``index`` order.
    """

    def __init__(self, sources: Sequence[tuple[str | os.PathLike, str]] | tuple[str, str], *,
                 transform: Transform | None = None, keep_difficult: bool = False,
                 filter_empty: bool = False, skip_bad_images: bool = False,
                 class_names: Sequence[str] = VOC_CLASSES) -> None:
        if len(sources) == 2 and isinstance(sources[1], str):
            sources = [sources]  # one (root, split) pair
        label_of = {c: k for k, c in enumerate(class_names)}
        paths, names, sizes, boxes, labels, difficult, truncated = [], [], [], [], [], [], []
        dropped = 0
        for root, split in sources:
            root = Path(root)
            for name in _read_split(root, split):
                xml = root / "Annotations" / f"{name}.xml"
                size, objs, n_drop = parse_voc_xml(xml, label_of)
                dropped += n_drop
                paths.append(root / "JPEGImages" / f"{name}.jpg")
                names.append(name)
                sizes.append(size)
                boxes.append(objs["boxes"])
                labels.append(objs["labels"])
                difficult.append(objs["difficult"])
                truncated.append(objs["truncated"])
        if dropped:
            logger.warning("%s: dropped %d boxes narrower or shorter than 1 px after clipping",
                           _describe(sources), dropped)
        index = AnnotationIndex.from_lists(
            [str(p) for p in paths], list(range(len(paths))), sizes, boxes, labels, difficult)
        self.truncated = np.concatenate(truncated) if truncated else np.zeros(0, bool)
        self.image_names = np.array(names, dtype=np.str_)
        if filter_empty:
            has_box = index.count_boxes(keep_difficult) > 0
            self.truncated = self.truncated[np.repeat(has_box, np.diff(index.offsets))]
            self.image_names = self.image_names[has_box]
            index = filter_empty_images(index, keep_difficult, _describe(sources))
        self.sources = [(Path(r), s) for r, s in sources]
        logger.info("%s: %d images, %d boxes (%d difficult)", _describe(sources), len(index),
                    len(index.boxes), int(index.ignore.sum()))
        super().__init__(index, list(class_names), transform=transform,
                         keep_ignored=keep_difficult, skip_bad_images=skip_bad_images,
                         source=_describe(sources))


def _describe(sources: Sequence[tuple]) -> str:
    return " + ".join(f"{Path(r)}:{s}" for r, s in sources)


def _read_split(root: Path, split: str) -> list[str]:
    f = root / "ImageSets" / "Main" / f"{split}.txt"
    if not f.is_file():
        raise DatasetError(f"{f}: VOC split file not found (expected the VOCdevkit layout "
                           f"<root>/ImageSets/Main/{split}.txt with root e.g. "
                           "datasets/VOCdevkit/VOC2007)")
    names = [line.split()[0] for line in f.read_text().splitlines() if line.strip()]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise DatasetError(f"{f}: image {dup} is listed twice")
    return names


def _int_or_float(node: ET.Element | None, tag: str, xml: Path, what: str) -> float:
    text = node.findtext(tag) if node is not None else None
    if text is None:
        raise DatasetError(f"{xml}: {what} has no <{tag}>")
    try:
        return float(text)
    except ValueError:
        raise DatasetError(f"{xml}: {what} has <{tag}>{text}</{tag}>, not a number") from None


def parse_voc_xml(xml: Path, label_of: dict[str, int]) -> tuple[tuple[int, int], dict, int]:
    """Reads one VOC annotation file.

    Returns:
        (h, w) from ``<size>``; a dict of ``boxes`` (M, 4) float32 0-based xyxy clipped to the
        image, ``labels`` (M,) int64, ``difficult`` (M,) bool, ``truncated`` (M,) bool; and the
        number of boxes dropped as narrower or shorter than 1 px after clipping.
    """
    name = xml.stem
    try:
        root = ET.parse(xml).getroot()
    except FileNotFoundError:
        raise DatasetError(f"{xml}: annotation of image {name} not found") from None
    except ET.ParseError as e:
        raise DatasetError(f"{xml}: image {name}: not valid XML: {e}") from None
    size = root.find("size")
    if size is None:
        raise DatasetError(f"{xml}: image {name} has no <size> (width, height)")
    w = _int_or_float(size, "width", xml, f"image {name} <size>")
    h = _int_or_float(size, "height", xml, f"image {name} <size>")
    if w <= 0 or h <= 0 or w != int(w) or h != int(h):
        raise DatasetError(f"{xml}: image {name} has size {w}x{h}")
    w, h = int(w), int(h)
    boxes, labels, difficult, truncated = [], [], [], []
    for n, obj in enumerate(root.iter("object")):
        cls = (obj.findtext("name") or "").strip()
        what = f"image {name} object #{n} ({cls or 'no name'})"
        if cls not in label_of:
            raise DatasetError(f"{xml}: {what}: unknown class {cls!r}; the classes are "
                               f"{', '.join(label_of)}")
        bb = obj.find("bndbox")
        if bb is None:
            raise DatasetError(f"{xml}: {what} has no <bndbox>")
        xmin, ymin, xmax, ymax = (_int_or_float(bb, t, xml, what)
                                  for t in ("xmin", "ymin", "xmax", "ymax"))
        if xmax < xmin or ymax < ymin:
            raise DatasetError(f"{xml}: {what}: box ({xmin}, {ymin}, {xmax}, {ymax}) has "
                               "xmax < xmin or ymax < ymin")
        if xmin > w or ymin > h or xmax < 1 or ymax < 1:
            raise DatasetError(f"{xml}: {what}: box ({xmin}, {ymin}, {xmax}, {ymax}) lies "
                               f"entirely outside the {w}x{h} image")
        boxes.append((xmin - 1, ymin - 1, xmax, ymax))  # 1-based inclusive -> 0-based xyxy
        labels.append(label_of[cls])
        difficult.append(obj.findtext("difficult", "0").strip() == "1")
        truncated.append(obj.findtext("truncated", "0").strip() == "1")
    b = np.asarray(boxes, np.float32).reshape(-1, 4)
    b[:, 0::2] = b[:, 0::2].clip(0, w)
    b[:, 1::2] = b[:, 1::2].clip(0, h)
    keep = ((b[:, 2] - b[:, 0]) >= 1) & ((b[:, 3] - b[:, 1]) >= 1)
    objs = {"boxes": b[keep], "labels": np.asarray(labels, np.int64)[keep],
            "difficult": np.asarray(difficult, bool)[keep],
            "truncated": np.asarray(truncated, bool)[keep]}
    return (h, w), objs, int((~keep).sum())
