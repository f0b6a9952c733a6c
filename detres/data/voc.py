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
shorter than 1 px after clipping is dropped and counted in the log. ``read_pascal_xml`` is
the one parser of this format; ``detres.data.localization`` reads ILSVRC's boxes with it.

Difficult objects are kept in the index (``ignore``) for evaluation, which ignores them, and
are not training targets unless ``keep_difficult``. Truncated objects are ordinary targets.

Bad input: a split file, annotation or image that is missing, an XML that does not parse or
lacks ``size``: a ``DatasetError`` naming the file and the image name. An image name that leads
out of ``Annotations`` / ``JPEGImages`` (``..``, an absolute path): the same error unless
``allow_outside_paths`` (the XML's own ``<filename>`` is never read: the split file's name is
the image's). A training set left without a box: the same error, counting what was read. An
object without a name or box, of an unknown class (``class_names``), or with xmax < xmin or a
box outside the image: the same error, or with ``bad_annotations="skip"`` the object is left
out and counted. ``skip_bad_images`` covers unreadable images.

The paper's "07+12" training set is ``VOCDetection([(voc2007, "trainval"),
(voc2012, "trainval")])``: one dataset, one index, with ``image_id`` = position in the union.
"""
from __future__ import annotations

import logging
import os
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Callable, Literal, Sequence

import numpy as np

from detres.data.detection_dataset import (AnnotationIndex, DetectionDataset, Transform,
                                           file_in_folder, filter_empty_images, read_text_lines)
from detres.data.images import DatasetError

logger = logging.getLogger(__name__)

OUTSIDE_HINT = ("image names are relative to the year folder's Annotations and JPEGImages; set "
                "allow_outside_paths: true (data.train / data.val) if this split file is "
                "trusted to name files anywhere")

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
        class_names: the classes, in label order (default the 20 VOC classes); a VOC-style
            set of one's own lists its ``<name>`` values here.
        bad_annotations: ``"error"`` (default): an object with no name or box, an unknown
            class or an impossible box stops the load naming the XML file and the object;
            ``"skip"``: such objects are left out and counted in a warning.
        image_extensions: suffixes tried in order for ``JPEGImages/<name><suffix>``
            (default ``.jpg``; e.g. ``[".jpg", ".png"]`` for a mixed folder).
        allow_outside_paths: read an image name of a split file that leads out of the year
            folder's ``Annotations`` and ``JPEGImages`` instead of refusing it.

    Attributes:
        image_names: (N,) the VOC image names (``"000005"``, ``"2008_000002"``) as str.
        truncated: (A,) bool, the ``truncated`` flag of each box in ``index`` order.
        num_skipped_annotations: objects left out under ``bad_annotations="skip"``.
    """

    def __init__(self, sources: Sequence[tuple[str | os.PathLike, str]] | tuple[str, str], *,
                 transform: Transform | None = None, keep_difficult: bool = False,
                 filter_empty: bool = False, skip_bad_images: bool = False,
                 class_names: Sequence[str] = VOC_CLASSES,
                 bad_annotations: Literal["error", "skip"] = "error",
                 image_extensions: Sequence[str] = (".jpg",),
                 allow_outside_paths: bool = False) -> None:
        if len(sources) == 2 and isinstance(sources[1], str):
            sources = [sources]  # one (root, split) pair
        if bad_annotations not in ("error", "skip"):
            raise ValueError(f"bad_annotations must be 'error' or 'skip', got {bad_annotations!r}")
        if not class_names or len(set(class_names)) != len(class_names):
            raise DatasetError(f"{_describe(sources)}: class_names must be distinct names, got "
                               f"{list(class_names)}")
        suffixes = [e if e.startswith(".") else f".{e}" for e in image_extensions] or [".jpg"]
        label_of = {c: k for k, c in enumerate(class_names)}
        skipped: list[str] = []
        on_bad = skipped.append if bad_annotations == "skip" else _raise_with_hint
        paths, names, sizes, boxes, labels, difficult, truncated = [], [], [], [], [], [], []
        dropped = 0
        for root, split in sources:
            root = Path(root)
            for name in _read_split(root, split, allow_outside_paths):
                xml = root / "Annotations" / f"{name}.xml"
                size, objs, n_drop = parse_voc_xml(xml, label_of, on_bad)
                dropped += n_drop
                paths.append(_image_file(root / "JPEGImages", name, suffixes))
                names.append(name)
                sizes.append(size)
                boxes.append(objs["boxes"])
                labels.append(objs["labels"])
                difficult.append(objs["difficult"])
                truncated.append(objs["truncated"])
        if skipped:
            logger.warning("%s: skipped %d objects that could not be used (bad_annotations: "
                           "skip), e.g. %s", _describe(sources), len(skipped), skipped[0])
        if dropped:
            logger.warning("%s: dropped %d boxes narrower or shorter than 1 px after clipping",
                           _describe(sources), dropped)
        index = AnnotationIndex.from_lists(
            [str(p) for p in paths], list(range(len(paths))), sizes, boxes, labels, difficult)
        self.num_skipped_annotations = len(skipped)
        self.truncated = np.concatenate(truncated) if truncated else np.zeros(0, bool)
        self.image_names = np.array(names, dtype=np.str_)
        if filter_empty:
            has_box = index.count_boxes(keep_difficult) > 0
            self.truncated = self.truncated[np.repeat(has_box, np.diff(index.offsets))]
            self.image_names = self.image_names[has_box]
            read = (f"{len(index.boxes) + dropped + len(skipped)} objects read, none usable "
                    f"({int(index.ignore.sum())} difficult, {dropped} under 1 px after clipping"
                    + (f", {len(skipped)} dropped by bad_annotations: skip)" if skipped else ")"))
            index = filter_empty_images(index, keep_difficult, _describe(sources), read=read)
        self.sources = [(Path(r), s) for r, s in sources]
        logger.info("%s: %d images, %d boxes (%d difficult)", _describe(sources), len(index),
                    len(index.boxes), int(index.ignore.sum()))
        super().__init__(index, list(class_names), transform=transform,
                         keep_ignored=keep_difficult, skip_bad_images=skip_bad_images,
                         source=_describe(sources))


def _raise_with_hint(message: str) -> None:
    raise DatasetError(f"{message}; set class_names (data.train / data.val) to the set's own "
                       "classes if they are not VOC's, or bad_annotations: skip to drop such "
                       "objects")


def _image_file(folder: Path, name: str, suffixes: Sequence[str]) -> Path:
    """``folder/<name><suffix>`` for the first suffix whose file exists (the first suffix when
    none does: the dataset's missing-file check then names it)."""
    if len(suffixes) > 1:
        for suffix in suffixes:
            if (folder / f"{name}{suffix}").is_file():
                return folder / f"{name}{suffix}"
    return folder / f"{name}{suffixes[0]}"


def _describe(sources: Sequence[tuple]) -> str:
    return " + ".join(f"{Path(r)}:{s}" for r, s in sources)


def _read_split(root: Path, split: str, allow_outside: bool) -> list[str]:
    f = root / "ImageSets" / "Main" / f"{split}.txt"
    if not f.is_file():
        raise DatasetError(f"{f}: VOC split file not found (expected the VOCdevkit layout "
                           f"<root>/ImageSets/Main/{split}.txt with root e.g. "
                           "datasets/VOCdevkit/VOC2007)")
    names = [line.split()[0] for line in read_text_lines(f) if line.strip()]
    for n in names:  # a name leads into both Annotations/ and JPEGImages/
        file_in_folder(root / "JPEGImages", n, allow_outside, f"{f}: image name {n!r:.200}",
                       OUTSIDE_HINT)
    names = [os.path.normpath(n) for n in names]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise DatasetError(f"{f}: image {dup} is listed twice")
    return names


def _number(node: ET.Element, tag: str, xml: str, what: str) -> float:
    text = node.findtext(tag)
    if text is None:
        raise DatasetError(f"{xml}: {what} has no <{tag}>")
    try:
        return float(text)
    except ValueError:
        raise DatasetError(f"{xml}: {what} has <{tag}>{text.strip()}</{tag}>, not a number"
                           ) from None


def _root(xml: str, image: str) -> ET.Element:
    try:
        with open(xml, "rb") as f:
            return ET.fromstring(f.read())
    except FileNotFoundError:
        raise DatasetError(f"{xml}: annotation of image {image} not found") from None
    except ET.ParseError as e:
        raise DatasetError(f"{xml}: image {image}: not valid XML: {e}") from None


def _size(root: ET.Element, xml: str, image: str) -> tuple[int, int]:
    size = root.find("size")
    if size is None:
        raise DatasetError(f"{xml}: image {image} has no <size> (width, height)")
    w = _number(size, "width", xml, f"image {image} <size>")
    h = _number(size, "height", xml, f"image {image} <size>")
    if w <= 0 or h <= 0 or w != int(w) or h != int(h):
        raise DatasetError(f"{xml}: image {image} <size> is {w:g}x{h:g}, not a positive "
                           f"whole size")
    return int(h), int(w)


def read_pascal_xml(xml: str, label_of: dict[str, int], *, tolerance: float | None = None,
                    flags: bool = False, on_bad: Callable[[str], None] | None = None
                    ) -> tuple[int, int, list, list[int], list, int]:
    """Reads one PASCAL-VOC-style annotation file (VOC and ILSVRC) in plain Python: numpy per
    file would double the indexing time of ImageNet's ~540k files.

    Boxes go from 1-based inclusive to 0-based xyxy (module docstring) and are clipped to the
    image. ``tolerance`` None (VOC) rejects only a box entirely outside the image; a number
    (ILSVRC: 1 px) rejects a box leaving the image by more than that. ``flags`` also reads
    ``difficult`` and ``truncated``. An object that cannot be used (no name or box, an
    unknown class, an impossible box) raises ``DatasetError``, or, with ``on_bad``, is passed
    to it as that error's message and left out.

    Returns:
        h, w from ``<size>``; the kept boxes as (x1, y1, x2, y2) tuples; their labels; their
        (difficult, truncated) pairs (empty unless ``flags``); the number of boxes dropped as
        narrower or shorter than 1 px after clipping.
    """
    image = os.path.splitext(os.path.basename(xml))[0]
    root = _root(xml, image)
    h, w = _size(root, xml, image)
    boxes, labels, box_flags, dropped = [], [], [], 0
    for n, obj in enumerate(root.iter("object")):
        try:
            box, label = _read_object(obj, n, xml, image, label_of, h, w, tolerance)
        except DatasetError as e:
            if on_bad is None:
                raise
            on_bad(str(e))
            continue
        if box is None:
            dropped += 1
            continue
        boxes.append(box)
        labels.append(label)
        if flags:
            box_flags.append((obj.findtext("difficult", "0").strip() == "1",
                              obj.findtext("truncated", "0").strip() == "1"))
    return h, w, boxes, labels, box_flags, dropped


def _read_object(obj: ET.Element, n: int, xml: str, image: str, label_of: dict[str, int],
                 h: int, w: int, tolerance: float | None
                 ) -> tuple[tuple[float, float, float, float] | None, int]:
    """One <object>: its clipped 0-based xyxy box (None when narrower or shorter than 1 px
    after clipping) and label; a ``DatasetError`` naming it when it cannot be used."""
    name = (obj.findtext("name") or "").strip()
    if not name:
        raise DatasetError(f"{xml}: image {image} object #{n} has no <name>")
    what = f"image {image} object #{n} ({name})"
    if name not in label_of:
        known = ", ".join(list(label_of)[:20]) + (" ..." if len(label_of) > 20 else "")
        raise DatasetError(f"{xml}: {what}: unknown class {name!r}; the {len(label_of)} "
                           f"classes are {known}")
    bb = obj.find("bndbox")
    if bb is None:
        raise DatasetError(f"{xml}: {what} has no <bndbox>")
    xmin, ymin, xmax, ymax = (_number(bb, tag, xml, what)
                              for tag in ("xmin", "ymin", "xmax", "ymax"))
    raw = f"box ({xmin:g}, {ymin:g}, {xmax:g}, {ymax:g}) (xmin, ymin, xmax, ymax; 1-based)"
    if xmax < xmin or ymax < ymin:
        raise DatasetError(f"{xml}: {what}: {raw} has xmax < xmin or ymax < ymin")
    x1, y1, x2, y2 = xmin - 1, ymin - 1, xmax, ymax  # 1-based inclusive -> 0-based xyxy
    _check_inside(x1, y1, x2, y2, h, w, tolerance, f"{xml}: {what}: {raw}")
    x1, x2 = min(max(x1, 0.0), w), min(max(x2, 0.0), w)
    y1, y2 = min(max(y1, 0.0), h), min(max(y2, 0.0), h)
    if x2 - x1 < 1 or y2 - y1 < 1:
        return None, label_of[name]
    return (x1, y1, x2, y2), label_of[name]


def _check_inside(x1: float, y1: float, x2: float, y2: float, h: int, w: int,
                  tolerance: float | None, box: str) -> None:
    if tolerance is None:
        if x1 > w - 1 or y1 > h - 1 or x2 < 1 or y2 < 1:  # VOC: xmin > w, ..., xmax < 1
            raise DatasetError(f"{box} lies entirely outside the {w}x{h} image")
    elif x1 < -tolerance or y1 < -tolerance or x2 > w + tolerance or y2 > h + tolerance:
        raise DatasetError(f"{box} lies outside the {w}x{h} image given by <size> by more "
                           f"than {tolerance:g} px")


def parse_voc_xml(xml: Path, label_of: dict[str, int],
                  on_bad: Callable[[str], None] | None = None
                  ) -> tuple[tuple[int, int], dict, int]:
    """Reads one VOC annotation file.

    Returns:
        (h, w) from ``<size>``; a dict of ``boxes`` (M, 4) float32 0-based xyxy clipped to the
        image, ``labels`` (M,) int64, ``difficult`` (M,) bool, ``truncated`` (M,) bool; and the
        number of boxes dropped as narrower or shorter than 1 px after clipping. ``on_bad``:
        see :func:`read_pascal_xml`.
    """
    h, w, boxes, labels, box_flags, dropped = read_pascal_xml(os.fspath(xml), label_of,
                                                              flags=True, on_bad=on_bad)
    box_flags = np.asarray(box_flags, bool).reshape(-1, 2)
    objs = {"boxes": np.asarray(boxes, np.float32).reshape(-1, 4),
            "labels": np.asarray(labels, np.int64),
            "difficult": box_flags[:, 0].copy(), "truncated": box_flags[:, 1].copy()}
    return (h, w), objs, dropped
