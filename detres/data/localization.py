"""ImageNet localization data (He et al. 2015, Appendix C): class-folder images + ILSVRC boxes.

Layout (images as for classification, the ILSVRC2012 bounding-box XMLs beside them)::

    <root>/train/<wnid>/<stem>.JPEG       any image extension (IMAGE_EXTENSIONS)
    <root>/val/<wnid>/<stem>.JPEG         val sorted into class folders, as for classification
    <root>/bbox/train/<wnid>/<stem>.xml   ILSVRC2012_bbox_train_v2: one folder per class
    <root>/bbox/val/<stem>.xml            ILSVRC2012_bbox_val_v3: flat
                                          (bbox/val/<wnid>/<stem>.xml is accepted too)

``loc_split_dirs(root, split)`` gives the (image folder, XML folder) pair of a split. The XML of
image ``<stem>.JPEG`` is ``<stem>.xml``, looked up in ``<box_root>/<wnid>/`` and then in
``<box_root>/``. The XML is PASCAL-VOC-like: ``<size>`` (width, height) and one ``<object>``
per box with ``<name>`` (the wnid) and ``<bndbox>`` (xmin, ymin, xmax, ymax).

Coordinates. ILSVRC boxes follow PASCAL VOC: the devkit readme says "All bounding box
annotations are in PASCAL VOC format", and the devkit's ``compute_overlap.m`` (the CLS-LOC
evaluation) measures a box as ``xmax - xmin + 1`` pixels wide, i.e. both ends are pixels
inside the box, counted from 1 (Matlab). We convert as ``detres.data.voc`` does::

    x1, y1, x2, y2 = xmin - 1, ymin - 1, xmax, ymax

to float32 xyxy in continuous 0-based pixels (``x2 - x1`` is the ILSVRC width). Some ImageNet
boxes start at 0 or end one pixel past ``<size>`` (annotation tools that counted from 0), so a
box may leave the image by up to ``BOX_TOLERANCE`` (1 px) and is then clipped to it; a box
further out is an error. A box narrower or shorter than 1 px after clipping is dropped and
counted. Boxes keep the labels the XML gives (ILSVRC images normally have boxes of their own
class only); the image's class is its folder (``image_labels``).

Boxes for only part of ImageNet train exist (about 40 % of the images): with
``missing_boxes="skip"`` images without an XML are left out and counted, with ``"error"``
every image must have one. A class folder none of whose images has boxes is an error (it
would silently never be trained for localization) unless ``skip_unannotated_classes``.
All XMLs are parsed at construction (the class check and ``annotations(i)`` need them); the
annotations are kept in numpy arrays (``AnnotationIndex``), not per-image Python objects, so
forked DataLoader workers share them (see ``detres.data.io``).

Bad input raises a ``DatasetError`` naming the file: a missing split folder (a
``LocDatasetNotFoundError``, also a ``DatasetNotFoundError``, with where it looked and how to
get the data), a missing XML under ``missing_boxes="error"``, an XML that does not parse or
lacks ``<size>``/``<name>``/``<bndbox>``, a non-numeric coordinate, xmax < xmin, a box outside
its image, an unknown class name, an unannotated class. An XML whose ``<size>`` is not the
decoded image's size is found when the image is read (``__getitem__``), naming both files.

Transforms: ``LocTrainTransform`` is the paper's classification augmentation (Sec. 3.4,
Appendix C: shorter side drawn from [256, 480], random 224x224 crop, flip) carrying the boxes
along; ``LocTestTransform`` resizes the whole image (dense fully-convolutional testing).
``detres.data.loc_batches`` makes the batches of each training stage and of testing.
"""
from __future__ import annotations

import copy
import logging
import os
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from detres.data.classification import IMAGE_EXTENSIONS, DatasetNotFoundError
from detres.data.io import (AnnotationIndex, BadImageSkipper, DatasetError, Transform,
                            read_image)
from detres.data.transforms import TransformOutput, resize, resize_scale

logger = logging.getLogger(__name__)

BOX_TOLERANCE = 1.0  # px a box may leave its image (0-based or rounded annotations)
MISSING_BOXES = ("skip", "error")
ILSVRC_HINT = (
    "ImageNet localization needs the ILSVRC2012 images and boxes from image-net.org: "
    "ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar (val sorted into class folders, as "
    "for classification) as <root>/train/<wnid>/ and <root>/val/<wnid>/, "
    "ILSVRC2012_bbox_train_v2.tar.gz as <root>/bbox/train/<wnid>/*.xml and "
    "ILSVRC2012_bbox_val_v3.tgz as <root>/bbox/val/*.xml. The built-in localization set "
    "(detres.data.builtin_loc.ensure_builtin_loc) needs nothing: it is generated on first use")


class LocDatasetNotFoundError(DatasetNotFoundError, DatasetError):
    """A localization split folder is absent (both a ``DatasetNotFoundError`` and a
    ``DatasetError``)."""


def loc_split_dirs(root: str | os.PathLike, split: str) -> tuple[Path, Path]:
    """(image folder, XML folder) of ``split`` ("train" or "val") under a localization root."""
    root = Path(root)
    return root / split, root / "bbox" / split


# ----------------------------------------------------------------------------- XML parsing
def _number(node: ET.Element, tag: str, xml: str, what: str) -> float:
    text = node.findtext(tag)
    if text is None:
        raise DatasetError(f"{xml}: {what} has no <{tag}>")
    try:
        return float(text)
    except ValueError:
        raise DatasetError(f"{xml}: {what} has <{tag}>{text.strip()}</{tag}>, not a number"
                           ) from None


def _read_xml(xml: str, label_of: dict[str, int]
              ) -> tuple[int, int, list[tuple[float, float, float, float]], list[int], int]:
    """``parse_ilsvrc_xml`` in plain Python: numpy per file would double the indexing time of
    ImageNet's 600k files. Returns h, w, kept boxes, their labels, number dropped."""
    try:
        with open(xml, "rb") as f:
            root = ET.fromstring(f.read())
    except FileNotFoundError:
        raise DatasetError(f"{xml}: bounding-box file not found") from None
    except ET.ParseError as e:
        raise DatasetError(f"{xml}: not valid XML: {e}") from None
    size = root.find("size")
    if size is None:
        raise DatasetError(f"{xml}: no <size> (width, height)")
    w = _number(size, "width", xml, "<size>")
    h = _number(size, "height", xml, "<size>")
    if w <= 0 or h <= 0 or w != int(w) or h != int(h):
        raise DatasetError(f"{xml}: <size> is {w:g}x{h:g}, not a positive whole size")
    w, h = int(w), int(h)
    t = BOX_TOLERANCE
    boxes, labels, dropped = [], [], 0
    for n, obj in enumerate(root.iter("object")):
        name = (obj.findtext("name") or "").strip()
        if not name:
            raise DatasetError(f"{xml}: object #{n} has no <name>")
        what = f"object #{n} ({name})"
        if name not in label_of:
            known = ", ".join(list(label_of)[:5]) + (" ..." if len(label_of) > 5 else "")
            raise DatasetError(f"{xml}: {what}: unknown class {name!r}; the {len(label_of)} "
                               f"classes are {known}")
        bb = obj.find("bndbox")
        if bb is None:
            raise DatasetError(f"{xml}: {what} has no <bndbox>")
        xmin, ymin, xmax, ymax = (_number(bb, tag, xml, what)
                                  for tag in ("xmin", "ymin", "xmax", "ymax"))
        raw = f"({xmin:g}, {ymin:g}, {xmax:g}, {ymax:g})"
        if xmax < xmin or ymax < ymin:
            raise DatasetError(f"{xml}: {what}: box {raw} has xmax < xmin or ymax < ymin")
        x1, y1, x2, y2 = xmin - 1, ymin - 1, xmax, ymax  # 1-based inclusive -> 0-based xyxy
        if x1 < -t or y1 < -t or x2 > w + t or y2 > h + t:
            raise DatasetError(f"{xml}: {what}: box {raw} (xmin, ymin, xmax, ymax; 1-based) "
                               f"lies outside the {w}x{h} image given by <size>")
        x1, x2 = min(max(x1, 0.0), w), min(max(x2, 0.0), w)
        y1, y2 = min(max(y1, 0.0), h), min(max(y2, 0.0), h)
        if x2 - x1 < 1 or y2 - y1 < 1:
            dropped += 1
            continue
        boxes.append((x1, y1, x2, y2))
        labels.append(label_of[name])
    return h, w, boxes, labels, dropped


def parse_ilsvrc_xml(xml: str | os.PathLike, label_of: dict[str, int]
                     ) -> tuple[tuple[int, int], np.ndarray, np.ndarray, int]:
    """Reads one ILSVRC bounding-box file.

    Returns:
        (h, w) from ``<size>``; boxes (M, 4) float32 0-based xyxy, clipped to the image;
        labels (M,) int64 (``label_of[<name>]``); the number of boxes dropped as narrower or
        shorter than 1 px after clipping.

    Raises:
        DatasetError: naming the file, for the cases listed in the module docstring.
    """
    h, w, boxes, labels, dropped = _read_xml(os.fspath(xml), label_of)
    return ((h, w), np.asarray(boxes, np.float32).reshape(-1, 4),
            np.asarray(labels, np.int64), dropped)


# ----------------------------------------------------------------------------- dataset
class LocSample(NamedTuple):
    """One item of ``LocalizationDataset``."""

    image: np.ndarray        # (H, W, 3) uint8 RGB after the transform
    boxes: np.ndarray        # (M, 4) float32 xyxy, pixels of the transformed image
    labels: np.ndarray       # (M,) int64, aligned with boxes
    image_label: int         # the image's class (its folder)
    index: int               # dataset index of the image actually read (see skip_bad_images)
    scale: float             # resized / original; 1.0 without a resize
    orig_size: tuple[int, int]  # (h, w) of the image on disk


class LocalizationDataset(Dataset):
    """Images in class folders with ILSVRC bounding-box XMLs (see the module docstring).

    Args:
        image_root: the split's class-folder directory (``<root>/train``).
        box_root: the split's XML directory (``<root>/bbox/train``), nested per class or flat.
        transform: ``(image, boxes, labels) -> (image, boxes, labels, scale)``
            (``LocTrainTransform``, ``LocTestTransform``); None keeps the original image.
        class_names: the classes in label order; default the sorted class folders of
            ``image_root``. Build val with the train split's list so the labels agree; a class
            missing from the folder is allowed, a folder not in the list is an error.
        missing_boxes: ``"skip"`` leaves out (and counts) images without an XML; ``"error"``
            requires every image to have one.
        skip_bad_images: an image that cannot be decoded, or whose size is not its XML's, is
            logged, counted and replaced by the next good image instead of raising.
        skip_unannotated_classes: with ``missing_boxes="skip"``, leave out (and count) a
            class folder none of whose images has boxes instead of raising.

    Attributes:
        class_names, num_classes.
        index: the ``AnnotationIndex`` (paths, sizes (h, w) from the XMLs, boxes, labels).
        image_paths: (N,) bytes, ``os.fsencode`` of each image path (``path(i)`` decodes).
        xml_paths: (N,) bytes, the XML of each image.
        image_labels: (N,) int64, the class folder of each image.
        num_images_without_boxes: images left out for having no XML or no box.
        skipped_classes: class folders left out by ``skip_unannotated_classes``.
        num_dropped_boxes: boxes dropped as < 1 px after clipping.
    """

    def __init__(self, image_root: str | os.PathLike, box_root: str | os.PathLike,
                 transform: Transform | None = None, class_names: Sequence[str] | None = None,
                 *, missing_boxes: str = "skip", skip_bad_images: bool = False,
                 skip_unannotated_classes: bool = False) -> None:
        if missing_boxes not in MISSING_BOXES:
            raise ValueError(f"missing_boxes must be one of {MISSING_BOXES}, got "
                             f"{missing_boxes!r}")
        self.image_root = Path(image_root)
        self.box_root = Path(box_root)
        self.transform = transform
        self.missing_boxes = missing_boxes
        self.skip_bad_images = skip_bad_images
        for what, folder in (("image", self.image_root), ("bounding-box", self.box_root)):
            if not folder.is_dir():
                raise LocDatasetNotFoundError(
                    f"{folder}: localization {what} folder not found (looked for "
                    f"{folder.resolve()}). {ILSVRC_HINT}")
        folders = sorted(e.name for e in os.scandir(self.image_root) if e.is_dir())
        if class_names is None:
            class_names = folders
        self.class_names = list(class_names)
        if not self.class_names:
            raise DatasetError(f"{self.image_root}: no class folders; expected "
                               f"<split>/<wnid>/<image> as for classification")
        unknown = sorted(set(folders) - set(self.class_names))
        if unknown:
            raise DatasetError(f"{self.image_root / unknown[0]}: class folder {unknown[0]!r} "
                               f"is not one of the {len(self.class_names)} classes given "
                               f"(build val with the train split's class_names)")
        label_of = {c: k for k, c in enumerate(self.class_names)}
        self._index_files(label_of, set(folders), skip_unannotated_classes)
        # Shared memory, so the flags that DataLoader workers set are seen by the main process.
        self.skipper = BadImageSkipper(len(self), skip_bad_images, str(self.image_root),
                                       self.path)

    def _index_files(self, label_of: dict[str, int], folders: set[str],
                     skip_unannotated_classes: bool) -> None:
        flat_xml, nested = {}, set()
        for e in os.scandir(self.box_root):
            if e.is_dir():
                nested.add(e.name)
            elif e.name.endswith(".xml"):
                flat_xml[e.name[:-4]] = e.path
        paths, xmls, sizes, counts, boxes, labels, image_labels = [], [], [], [], [], [], []
        self.num_images_without_boxes = 0
        self.num_dropped_boxes = 0
        self.skipped_classes: list[str] = []
        num_found = 0
        for label, name in enumerate(self.class_names):
            if name not in folders:
                continue  # e.g. a val subset without this class
            folder = self.image_root / name
            images = sorted((e.name, e.path) for e in os.scandir(folder)
                            if e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS))
            if not images:
                raise DatasetError(f"{folder}: class folder '{name}' holds no images "
                                   f"({', '.join(IMAGE_EXTENSIONS)})")
            num_found += len(images)
            class_xml = {}  # <box_root>/<wnid>/<stem>.xml, looked up before the flat folder
            if name in nested:
                class_xml = {e.name[:-4]: e.path for e in os.scandir(self.box_root / name)
                             if e.name.endswith(".xml")}
            start = len(paths)
            missing = 0
            for file_name, path in images:
                stem = os.path.splitext(file_name)[0]
                xml = class_xml.get(stem) or flat_xml.get(stem)
                if xml is None:
                    if self.missing_boxes == "error":
                        where = self.box_root / name if name in nested else self.box_root
                        raise DatasetError(f"{where / (stem + '.xml')}: bounding-box file of "
                                           f"{path} not found (missing_boxes='error'; use "
                                           f"'skip' to train on the images that have boxes)")
                    missing += 1
                    continue
                h, w, b, lab, dropped = _read_xml(xml, label_of)
                self.num_dropped_boxes += dropped
                if not b:
                    if self.missing_boxes == "error":
                        raise DatasetError(f"{xml}: no box (no <object>, or all narrower than "
                                           f"1 px) for {path}")
                    missing += 1
                    continue
                paths.append(path)
                xmls.append(xml)
                sizes.append((h, w))
                counts.append(len(b))
                boxes += b
                labels += lab
                image_labels.append(label)
            if len(paths) == start:  # only reachable with missing_boxes="skip"
                if not skip_unannotated_classes:
                    raise DatasetError(
                        f"{folder}: none of the {len(images)} images of class '{name}' has a "
                        f"bounding box (looked for <stem>.xml in {self.box_root / name} and "
                        f"{self.box_root}); add the boxes or set "
                        f"skip_unannotated_classes=True")
                self.skipped_classes.append(name)
            self.num_images_without_boxes += missing
        if not paths:
            raise DatasetError(f"{self.image_root}: no image has a bounding box in "
                               f"{self.box_root}")
        self.index = AnnotationIndex(
            paths=np.array([os.fsencode(p) for p in paths], dtype=np.bytes_),
            image_ids=np.arange(len(paths), dtype=np.int64),
            sizes=np.asarray(sizes, np.int64).reshape(-1, 2),
            offsets=np.concatenate(([0], np.cumsum(counts))).astype(np.int64),
            boxes=np.asarray(boxes, np.float32).reshape(-1, 4),
            labels=np.asarray(labels, np.int64),
            ignore=np.zeros(len(labels), bool))
        self.xml_paths = np.array([os.fsencode(p) for p in xmls], dtype=np.bytes_)
        self.image_labels = np.asarray(image_labels, np.int64)
        logger.info("%s: %d images with %d boxes, %d classes; %d of %d images without boxes "
                    "left out", self.image_root, len(paths), len(self.index.boxes),
                    self.num_classes, self.num_images_without_boxes, num_found)
        if self.num_dropped_boxes:
            logger.warning("%s: dropped %d boxes narrower or shorter than 1 px after clipping",
                           self.box_root, self.num_dropped_boxes)
        if self.skipped_classes:
            logger.warning("%s: %d classes have no boxes and are left out: %s",
                           self.image_root, len(self.skipped_classes),
                           ", ".join(self.skipped_classes[:10]))

    # ------------------------------------------------------------------ accessors
    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_paths(self) -> np.ndarray:
        return self.index.paths

    @property
    def image_sizes(self) -> np.ndarray:
        """(N, 2) int64 (h, w) of each original image, from the XMLs (no decoding)."""
        return self.index.sizes

    def __len__(self) -> int:
        return len(self.index)

    def path(self, i: int) -> Path:
        return self.index.path(i)

    def xml_path(self, i: int) -> Path:
        return Path(os.fsdecode(bytes(self.xml_paths[i])))

    def annotations(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Boxes (M, 4) float32 xyxy in original pixels and labels (M,) int64 of image i."""
        r = self.index.rows(i)
        return self.index.boxes[r].copy(), self.index.labels[r].copy()

    def read_image(self, i: int) -> np.ndarray:
        """The original image i, (h, w, 3) uint8 RGB; checks its size against its XML."""
        path = self.path(i)
        image = read_image(path)
        h, w = (int(v) for v in self.index.sizes[i])
        if image.shape[:2] != (h, w):
            hint = (" (the EXIF orientation rotates it: the boxes seem to be made on the "
                    "unrotated pixels)") if image.shape[:2] == (w, h) else ""
            raise DatasetError(f"{path}: image is {image.shape[1]}x{image.shape[0]} (w x h) "
                               f"but its bounding-box file {self.xml_path(i)} says "
                               f"{w}x{h}{hint}")
        return image

    def with_transform(self, transform: Transform | None) -> LocalizationDataset:
        """The same images and boxes under another transform, without indexing them again
        (the copy shares the index and the skip flags)."""
        other = copy.copy(self)
        other.transform = transform
        return other

    def __getitem__(self, i: int) -> LocSample:
        image, i = self.skipper.read(int(i), self.read_image)
        boxes, labels = self.annotations(i)
        orig_size = (int(image.shape[0]), int(image.shape[1]))
        scale = 1.0
        if self.transform is not None:
            image, boxes, labels, scale = self.transform(image, boxes, labels)
        return LocSample(np.ascontiguousarray(image), np.asarray(boxes, np.float32).reshape(-1, 4),
                         np.asarray(labels, np.int64), int(self.image_labels[i]), i,
                         float(scale), orig_size)

    # ------------------------------------------------------------------ skip reports
    @property
    def num_skipped_images(self) -> int:
        """Images skipped so far (by any DataLoader worker) as unreadable or mis-sized."""
        return self.skipper.count

    def report_skipped_images(self) -> int:
        """Logs how many images were skipped as unreadable, and which; returns the count."""
        return self.skipper.report()

    def report_skipped(self, log: logging.Logger | None = None) -> dict[str, int]:
        """Logs every count of left-out data (end of a run); returns the counts."""
        log = log or logger
        counts = {"images_without_boxes": self.num_images_without_boxes,
                  "unannotated_classes": len(self.skipped_classes),
                  "dropped_boxes": self.num_dropped_boxes,
                  "bad_images": self.num_skipped_images}
        if any(counts.values()):
            log.info("%s: left out %d images without boxes, %d classes without boxes%s, "
                     "%d boxes < 1 px; skipped %d unreadable images", self.image_root,
                     counts["images_without_boxes"], counts["unannotated_classes"],
                     f" ({', '.join(self.skipped_classes[:10])})" if self.skipped_classes
                     else "", counts["dropped_boxes"], counts["bad_images"])
        return counts

    @classmethod
    def from_root(cls, root: str | os.PathLike, split: str, **kwargs) -> LocalizationDataset:
        """The ``split`` ("train"/"val") of a localization root (see ``loc_split_dirs``)."""
        image_root, box_root = loc_split_dirs(root, split)
        return cls(image_root, box_root, **kwargs)


# ----------------------------------------------------------------------------- transforms
class _PerProcessRng:
    """A numpy generator re-seeded once per process from ``seed`` and the DataLoader worker's
    seed (as ``DetectionTransform``), so workers do not repeat each other's draws."""

    def __init__(self, seed: int | None) -> None:
        self.seed = seed
        self._pid: int | None = None
        self._rng = np.random.default_rng(seed)

    def get(self) -> np.random.Generator:
        if self._pid != os.getpid():
            self._pid = os.getpid()
            info = torch.utils.data.get_worker_info()
            entropy = self.seed if info is None else [self.seed or 0, info.seed % 2**63]
            self._rng = np.random.default_rng(entropy)
        return self._rng


class LocTrainTransform:
    """Scale augmentation, random square crop, horizontal flip (Sec. 3.4, Appendix C).

    The shorter side is drawn uniformly from ``scale_range`` (inclusive) and the image resized
    with ``detres.data.transforms.resize`` (boxes times the recorded ``scale``); then a
    ``crop_size`` square is cut at a uniform random position (an image smaller than that is
    zero-padded at the bottom/right first) and flipped with ``flip_prob``. Boxes are shifted
    and clipped to the crop; a box whose visible part is narrower or shorter than 1 px, or
    keeps less than ``min_visible`` (30 %) of its area in the resized image, is dropped along
    with its label. Returns ``(image, boxes, labels, scale)``; ``scale`` is resized/original
    (the crop does not change it).
    """

    def __init__(self, scale_range: tuple[int, int] = (256, 480), crop_size: int = 224,
                 flip_prob: float = 0.5, seed: int | None = None, *,
                 min_visible: float = 0.3) -> None:
        lo, hi = (int(v) for v in scale_range)
        if not 0 < lo <= hi:
            raise ValueError(f"scale_range must be 0 < lo <= hi, got {scale_range!r}")
        if crop_size <= 0:
            raise ValueError(f"crop_size must be positive, got {crop_size}")
        self.scale_range = (lo, hi)
        self.crop_size = int(crop_size)
        self.flip_prob = float(flip_prob)
        self.min_visible = float(min_visible)
        self.seed = seed
        self._rng = _PerProcessRng(seed)

    def __call__(self, image: np.ndarray, boxes: np.ndarray, labels: np.ndarray
                 ) -> TransformOutput:
        rng = self._rng.get()
        labels = np.asarray(labels, np.int64)
        h, w = image.shape[:2]
        short = int(rng.integers(self.scale_range[0], self.scale_range[1] + 1))
        scale = resize_scale(h, w, short, None)
        image, boxes = resize(image, boxes, scale)
        c = self.crop_size
        h, w = image.shape[:2]
        if h < c or w < c:
            padded = np.zeros((max(h, c), max(w, c), 3), np.uint8)
            padded[:h, :w] = image
            image = padded
        top = int(rng.integers(image.shape[0] - c + 1))
        left = int(rng.integers(image.shape[1] - c + 1))
        image = image[top:top + c, left:left + c]
        area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        boxes = boxes - np.array([left, top, left, top], np.float32)
        boxes = boxes.clip(0, c)  # the crop is square
        bw, bh = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
        keep = (bw >= 1) & (bh >= 1) & (bw * bh >= self.min_visible * area)
        boxes, labels = boxes[keep], labels[keep]
        if self.flip_prob > 0 and rng.uniform() < self.flip_prob:
            image = image[:, ::-1]
            boxes = np.stack([c - boxes[:, 2], boxes[:, 1], c - boxes[:, 0], boxes[:, 3]], 1)
        return TransformOutput(np.ascontiguousarray(image),
                               np.ascontiguousarray(boxes, np.float32).reshape(-1, 4),
                               labels, float(scale))


class LocTestTransform:
    """Deterministic shorter-side resize of the whole image (for dense testing); the longer
    side is capped at ``max_size`` if given. Returns ``(image, boxes, labels, scale)``."""

    def __init__(self, short_side: int, max_size: int | None = None) -> None:
        if short_side <= 0:
            raise ValueError(f"short_side must be positive, got {short_side}")
        self.short_side = int(short_side)
        self.max_size = max_size

    def __call__(self, image: np.ndarray, boxes: np.ndarray, labels: np.ndarray
                 ) -> TransformOutput:
        scale = resize_scale(image.shape[0], image.shape[1], self.short_side, self.max_size)
        image, boxes = resize(image, boxes, scale)
        return TransformOutput(np.ascontiguousarray(image), boxes,
                               np.asarray(labels, np.int64), float(scale))
