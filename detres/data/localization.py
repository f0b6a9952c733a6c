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
All XMLs are parsed at construction (the class check and ``get_annotations(i)`` need them); the
annotations are kept in numpy arrays (``AnnotationIndex``), not per-image Python objects, so
forked DataLoader workers share them (see ``detres.data.detection_dataset``). With ``cache_dir`` the parsed
index is kept in a compact file there and read back while its source is unchanged
(``detres.data.loc_index``): ImageNet's ~540k XMLs cost about a minute to parse.

Bad input raises a ``DatasetError`` naming the file (with ``bad_annotations="skip"`` a
malformed XML is instead left out with its image, logged and counted): a missing split folder (a
``LocDatasetNotFoundError``, also a ``DatasetNotFoundError``, with where it looked and how to
get the data), a missing XML under ``missing_boxes="error"``, an XML that does not parse or
lacks ``<size>``/``<name>``/``<bndbox>``, a non-numeric coordinate, xmax < xmin, a box outside
its image, an unknown class name, an unannotated class. An XML whose ``<size>`` is not the
decoded image's size is found when the image is read (``__getitem__``), naming both files.

The transforms and the test-time views are in ``detres.data.loc_transforms``;
``detres.data.loc_batches`` makes the batches of each training stage and of testing.
"""
from __future__ import annotations

import copy
import logging
import os
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np

from tqdm import tqdm

from detres.data import loc_index
from detres.data.classification import IMAGE_EXTENSIONS, DatasetNotFoundError
from detres.data.detection_dataset import AnnotationIndex, DetectionDataset, Transform
from detres.data.images import DatasetError
from detres.data.voc import read_pascal_xml

logger = logging.getLogger(__name__)

BOX_TOLERANCE = 1.0  # px a box may leave its image (0-based or rounded annotations)
MISSING_BOXES = ("skip", "error")
BAD_ANNOTATIONS = ("error", "skip")
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


class LocSample(NamedTuple):
    """One item of ``LocalizationDataset``."""

    image: np.ndarray        # (H, W, 3) uint8 RGB after the transform
    boxes: np.ndarray        # (M, 4) float32 xyxy, pixels of the transformed image
    labels: np.ndarray       # (M,) int64, aligned with boxes
    image_label: int         # the image's class (its folder)
    index: int               # dataset index of the image actually read (see skip_bad_images)
    scale: float             # resized / original; 1.0 without a resize
    orig_size: tuple[int, int]  # (h, w) of the image on disk


class LocalizationDataset(DetectionDataset):
    """Images in class folders with ILSVRC bounding-box XMLs (see the module docstring); a
    ``DetectionDataset`` (index, image reading with its size check, skipping, accessors) whose
    items are ``LocSample`` s.

    Args:
        image_root: the split's class-folder directory (``<root>/train``).
        box_root: the split's XML directory (``<root>/bbox/train``), nested per class or flat.
        transform: ``(image, boxes, labels) -> (image, boxes, labels, scale)``
            (``LocTrainTransform``); None keeps the original image (the test pipeline
            makes its own views of it, ``detres.data.loc_transforms``).
        class_names: the classes in label order; default the sorted class folders of
            ``image_root``. Build val with the train split's list so the labels agree; a class
            missing from the folder is allowed, a folder not in the list is an error.
        missing_boxes: ``"skip"`` leaves out (and counts) images without an XML; ``"error"``
            requires every image to have one.
        skip_bad_images: see ``DetectionDataset`` (a size mismatch names the XML).
        skip_unannotated_classes: with ``missing_boxes="skip"``, leave out (and count) a
            class folder none of whose images has boxes instead of raising.
        bad_annotations: ``"error"`` raises on a malformed XML; ``"skip"`` leaves it and its
            image out, logged and counted (``bad_annotation_files``).
        cache_dir: keep the parsed index in a file there (``detres.data.loc_index``); None:
            parse every time.

    Attributes (besides ``DetectionDataset``'s):
        xml_paths: (N,) bytes, the XML of each image.
        image_labels: (N,) int64, the class folder of each image.
        num_images_without_boxes: images left out for having no XML or no box.
        skipped_classes: class folders left out by ``skip_unannotated_classes``.
        num_dropped_boxes: boxes dropped as < 1 px after clipping.
        bad_annotation_files: the malformed XMLs left out under ``bad_annotations="skip"``.
    """

    def __init__(self, image_root: str | os.PathLike, box_root: str | os.PathLike,
                 transform: Transform | None = None, class_names: Sequence[str] | None = None,
                 *, missing_boxes: str = "skip", skip_bad_images: bool = False,
                 skip_unannotated_classes: bool = False, bad_annotations: str = "error",
                 cache_dir: str | os.PathLike | None = None) -> None:
        if missing_boxes not in MISSING_BOXES:
            raise ValueError(f"missing_boxes must be one of {MISSING_BOXES}, got "
                             f"{missing_boxes!r}")
        if bad_annotations not in BAD_ANNOTATIONS:
            raise ValueError(f"bad_annotations must be one of {BAD_ANNOTATIONS}, got "
                             f"{bad_annotations!r}")
        self.bad_annotations = bad_annotations
        self.image_root = Path(image_root)
        self.box_root = Path(box_root)
        self.missing_boxes = missing_boxes
        for what, folder in (("image", self.image_root), ("bounding-box", self.box_root)):
            if not folder.is_dir():
                raise LocDatasetNotFoundError(
                    f"{folder}: localization {what} folder not found (looked for "
                    f"{folder.resolve()}). {ILSVRC_HINT}")
        folders = sorted(e.name for e in os.scandir(self.image_root) if e.is_dir())
        self.class_names = list(folders if class_names is None else class_names)
        if not self.class_names:
            raise DatasetError(f"{self.image_root}: no class folders; expected "
                               f"<split>/<wnid>/<image> as for classification")
        unknown = sorted(set(folders) - set(self.class_names))
        if unknown:
            raise DatasetError(f"{self.image_root / unknown[0]}: class folder {unknown[0]!r} "
                               f"is not one of the {len(self.class_names)} classes given "
                               f"(build val with the train split's class_names)")
        index = self._index_files(set(folders), skip_unannotated_classes, cache_dir)
        super().__init__(index, self.class_names, transform=transform,
                         skip_bad_images=skip_bad_images, source=str(self.image_root))

    def _index_files(self, folders: set[str], skip_unannotated_classes: bool,
                     cache_dir: str | os.PathLike | None) -> AnnotationIndex:
        listing = self._list_files(folders)
        options = {"missing_boxes": self.missing_boxes, "bad_annotations": self.bad_annotations,
                   "skip_unannotated_classes": skip_unannotated_classes}
        arrays, path, fp = None, None, ""
        if cache_dir is not None:
            path = loc_index.cache_file(cache_dir, self.image_root, self.box_root)
            fp = loc_index.fingerprint(self.image_root, self.box_root, self.class_names, options,
                                       (item for items in listing.values() for item in items))
            arrays = loc_index.load_index(path, fp)
            if arrays is not None:
                logger.info("%s: index read from %s", self.image_root, path)
        if arrays is None:
            arrays = self._parse_files(listing, skip_unannotated_classes)
            if path is not None:
                loc_index.save_index(path, fp, arrays)
        self.xml_paths, self.image_labels = arrays["xml_paths"], arrays["image_labels"]
        self.skipped_classes = [os.fsdecode(bytes(c)) for c in arrays["skipped_classes"]]
        self.bad_annotation_files = [os.fsdecode(bytes(c)) for c in arrays["bad_annotations"]]
        self.num_images_without_boxes, self.num_dropped_boxes, num_found = (
            int(c) for c in arrays["counts"])
        self._log_index(len(arrays["paths"]), len(arrays["boxes"]), num_found)
        return AnnotationIndex(
            paths=arrays["paths"], image_ids=np.arange(len(arrays["paths"]), dtype=np.int64),
            sizes=arrays["sizes"], offsets=arrays["offsets"], boxes=arrays["boxes"],
            labels=arrays["labels"], ignore=np.zeros(len(arrays["labels"]), bool))

    def _list_files(self, folders: set[str]) -> dict[int, list[tuple[str, str | None]]]:
        """Per class label, (image path, XML path or None) of each image of its folder."""
        flat_xml, nested = {}, set()
        for e in os.scandir(self.box_root):
            if e.is_dir():
                nested.add(e.name)
            elif e.name.endswith(".xml"):
                flat_xml[e.name[:-4]] = e.path
        listing: dict[int, list[tuple[str, str | None]]] = {}
        for label, name in enumerate(self.class_names):
            if name not in folders:
                continue  # e.g. a val subset without this class
            class_xml = {}  # <box_root>/<wnid>/<stem>.xml, looked up before the flat folder
            if name in nested:
                class_xml = {e.name[:-4]: e.path for e in os.scandir(self.box_root / name)
                             if e.name.endswith(".xml")}
            folder = self.image_root / name
            images = sorted((e.name, e.path) for e in os.scandir(folder)
                            if e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS))
            if not images:
                raise DatasetError(f"{folder}: class folder '{name}' holds no images "
                                   f"({', '.join(IMAGE_EXTENSIONS)})")
            listing[label] = []
            for file_name, path in images:
                stem = os.path.splitext(file_name)[0]
                xml = class_xml.get(stem) or flat_xml.get(stem)
                if xml is None and self.missing_boxes == "error":
                    where = self.box_root / name if name in nested else self.box_root
                    raise DatasetError(f"{where / (stem + '.xml')}: bounding-box file of "
                                       f"{path} not found (missing_boxes='error'; use "
                                       f"'skip' to train on the images that have boxes)")
                listing[label].append((path, xml))
        return listing

    def _parse_files(self, listing: dict[int, list[tuple[str, str | None]]],
                     skip_unannotated_classes: bool) -> dict[str, np.ndarray]:
        """Reads every listed XML (the slow part); returns the arrays ``loc_index`` stores."""
        rows: dict[str, list] = {k: [] for k in ("paths", "xmls", "sizes", "counts", "boxes",
                                                  "labels", "image_labels")}
        without = dropped = 0
        skipped_classes: list[str] = []
        bad: list[str] = []
        label_of = {c: k for k, c in enumerate(self.class_names)}
        total = sum(len(v) for v in listing.values())
        bar = tqdm(total=total, desc=f"index {self.image_root.name}", dynamic_ncols=True,
                   disable=total < 20000)   # a bar only where indexing takes a while
        for label, items in listing.items():
            start = len(rows["paths"])
            for path, xml in items:
                bar.update()
                if xml is None:
                    without += 1
                    continue
                try:
                    h, w, b, lab, _, n = read_pascal_xml(xml, label_of, tolerance=BOX_TOLERANCE)
                except DatasetError as e:
                    if self.bad_annotations == "error":
                        raise DatasetError(f"{e} (set bad_annotations: skip to leave such "
                                           f"files out, counted)") from None
                    logger.warning("skipping %s", e)
                    bad.append(xml)
                    continue
                dropped += n
                if not b:
                    if self.missing_boxes == "error":
                        raise DatasetError(f"{xml}: no box (no <object>, or all narrower than "
                                           f"1 px) for {path}")
                    without += 1
                    continue
                for key, value in (("paths", path), ("xmls", xml), ("sizes", (h, w)),
                                   ("counts", len(b)), ("image_labels", label)):
                    rows[key].append(value)
                rows["boxes"] += b
                rows["labels"] += lab
            if len(rows["paths"]) == start:
                self._unannotated_class(label, len(items), skip_unannotated_classes)
                skipped_classes.append(self.class_names[label])
        bar.close()
        if not rows["paths"]:
            raise DatasetError(f"{self.image_root}: no image has a bounding box in "
                               f"{self.box_root}")
        # flat lists made numpy once: per-image arrays would slow indexing ImageNet down
        return {"paths": _bytes(rows["paths"]), "xml_paths": _bytes(rows["xmls"]),
                "sizes": np.asarray(rows["sizes"], np.int64).reshape(-1, 2),
                "offsets": np.concatenate(([0], np.cumsum(rows["counts"]))).astype(np.int64),
                "boxes": np.asarray(rows["boxes"], np.float32).reshape(-1, 4),
                "labels": np.asarray(rows["labels"], np.int64),
                "image_labels": np.asarray(rows["image_labels"], np.int64),
                "skipped_classes": _bytes(skipped_classes), "bad_annotations": _bytes(bad),
                "counts": np.array([without, dropped, total], np.int64)}

    def _unannotated_class(self, label: int, num_images: int, skip: bool) -> None:
        """A class folder none of whose images has boxes: an error unless ``skip``."""
        name = self.class_names[label]
        if not skip:
            raise DatasetError(
                f"{self.image_root / name}: none of the {num_images} images of class "
                f"'{name}' has a bounding box (looked for <stem>.xml in "
                f"{self.box_root / name} and {self.box_root}); add the boxes or set "
                f"skip_unannotated_classes=True")

    def _log_index(self, num_images: int, num_boxes: int, num_found: int) -> None:
        logger.info("%s: %d images with %d boxes, %d classes; %d of %d images without boxes "
                    "left out", self.image_root, num_images, num_boxes, self.num_classes,
                    self.num_images_without_boxes, num_found)
        if self.num_dropped_boxes:
            logger.warning("%s: dropped %d boxes narrower or shorter than 1 px after clipping",
                           self.box_root, self.num_dropped_boxes)
        if self.skipped_classes:
            logger.warning("%s: %d classes have no boxes and are left out: %s",
                           self.image_root, len(self.skipped_classes),
                           ", ".join(self.skipped_classes[:10]))
        if self.bad_annotation_files:
            logger.warning("%s: %d malformed bounding-box files skipped "
                           "(bad_annotations: skip), e.g. %s", self.box_root,
                           len(self.bad_annotation_files),
                           ", ".join(self.bad_annotation_files[:5]))

    def xml_path(self, i: int) -> Path:
        return Path(os.fsdecode(bytes(self.xml_paths[i])))

    def size_source(self, i: int) -> str:
        return f"its bounding-box file {self.xml_path(i)}"

    def with_transform(self, transform: Transform | None) -> LocalizationDataset:
        """The same images and boxes under another transform, without indexing them again
        (the copy shares the index and the skip flags)."""
        other = copy.copy(self)
        other.transform = transform
        return other

    def __getitem__(self, i: int) -> LocSample:
        image, i = self.skipper.read(int(i), self.read_image)
        r = self.index.rows(i)
        boxes, labels = self.index.boxes[r].copy(), self.index.labels[r].copy()
        orig_size = (int(image.shape[0]), int(image.shape[1]))
        scale = 1.0
        if self.transform is not None:
            image, boxes, labels, scale = self.transform(image, boxes, labels)
        return LocSample(np.ascontiguousarray(image), np.asarray(boxes, np.float32).reshape(-1, 4),
                         np.asarray(labels, np.int64), int(self.image_labels[i]), i,
                         float(scale), orig_size)


def _bytes(items: Sequence[str]) -> np.ndarray:
    return np.array([os.fsencode(p) for p in items], dtype=np.bytes_)
