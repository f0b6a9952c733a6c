"""COCO-format detection dataset: any instances-style JSON plus a folder of images.

Labels are contiguous, 0..K-1 in the order of sorted category ids (``label_to_category_id``
and ``category_id_to_label`` map both ways; only ``data/`` and ``evaluation/`` see category
ids). Crowd regions (``iscrowd = 1``) are kept in the index for reference but are never
training targets: COCO evaluation reads them from ``annotation_file``.

Box handling. COCO boxes are ``[x, y, w, h]`` in 0-based pixels; they become xyxy, are
clipped to the image, and a non-crowd box whose clipped width or height is below
``min_box_size`` (1 px) is dropped and counted in the log. Images left without a training box
are dropped when ``filter_empty`` (training) and kept otherwise (evaluation).

Bad input, and what happens:
- not valid JSON, missing ``images``/``categories``, a malformed record, duplicate image or
  category ids: always a ``DatasetError`` naming the file and the id; a file without
  ``annotations`` (image info only, as COCO test-dev ships) loads as images without boxes
  (for inference and format-only evaluation; training on it is an error);
- boxes written as corners ``[x1, y1, x2, y2]``: a ``DatasetError`` from a plausibility check
  (``_check_xywh``), whatever ``bad_annotations`` says;
- an annotation for an unknown image or category, a bbox with NaN/infinite coordinates, with
  negative width or height, or entirely outside its image: a ``DatasetError`` naming the file,
  the annotation id and the image id; with ``bad_annotations="skip"`` such annotations are
  dropped instead and counted in a warning (for a large, slightly dirty set where training
  should go on); unknown category ids are listed beside the file's own;
- missing image files: a ``DatasetError`` before any work, with how many and the first few;
  an image whose decoded size differs from the JSON's: ``DatasetError`` when read; either a
  counted skip with ``skip_bad_images`` (see ``DetectionDataset``);
- an id (image, annotation, category) that is not a whole number from 0 to 2**63 - 1 (a string,
  null, true, 2**70), an ``iscrowd`` other than 0/1 (true/false), a ``file_name`` that leads
  out of the image folder (``..``, an absolute path; see ``io.file_in_folder``) unless
  ``allow_outside_paths``: a ``DatasetError`` naming the record and the value;
- a training set (``filter_empty``) left without a box: a ``DatasetError`` counting what was
  read and why none of it is usable (crowd, under ``min_box_size``, skipped).

The JSON is parsed with the standard library rather than ``pycocotools.COCO`` so that every
error can name what is wrong; pycocotools reads ``annotation_file`` at evaluation.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Literal

import numpy as np

from detres.data.detection_dataset import (AnnotationIndex, DetectionDataset, Transform,
                                           file_in_folder, filter_empty_images)
from detres.data.images import DatasetError

logger = logging.getLogger(__name__)

MAX_ID = 2**63 - 1      # ids are stored as int64
MAX_SIDE = 2**31 - 1
OUTSIDE_HINT = ("file names are relative to the image folder (data.train.images / "
                "data.val.images); set allow_outside_paths: true (data.train / data.val) if "
                "this annotation file is trusted to name files anywhere")


class COCODetection(DetectionDataset):
    """A COCO instances-format dataset.

    Args:
        annotation_file: the JSON file (``images``, ``annotations``, ``categories``).
        image_root: folder that ``file_name`` is relative to.
        transform: see ``DetectionDataset``.
        filter_empty: drop images without a training box (use True for training, False for
            evaluation).
        skip_bad_images: see ``DetectionDataset``.
        bad_annotations: ``"error"`` (default) or ``"skip"`` annotations with an unknown image
            or category or an impossible bbox.
        min_box_size: a box narrower or shorter than this after clipping is dropped.
        allow_outside_paths: read a ``file_name`` that leads out of ``image_root`` (``..``, an
            absolute path) instead of refusing the file.

    Attributes:
        class_names: K category names, by label.
        label_to_category_id: list, ``label_to_category_id[label]`` is the COCO category id.
        category_id_to_label: dict, the inverse.
        annotation_file, image_root: the paths given.
    """

    def __init__(self, annotation_file: str | os.PathLike, image_root: str | os.PathLike, *,
                 transform: Transform | None = None, filter_empty: bool = False,
                 skip_bad_images: bool = False,
                 bad_annotations: Literal["error", "skip"] = "error",
                 min_box_size: float = 1.0, allow_outside_paths: bool = False) -> None:
        if bad_annotations not in ("error", "skip"):
            raise ValueError(f"bad_annotations must be 'error' or 'skip', got {bad_annotations!r}")
        self.annotation_file = Path(annotation_file)
        self.image_root = Path(image_root)
        data = _load_json(self.annotation_file)
        #: False for an image-info-only file (COCO test-dev): no boxes, nothing to train on
        self.has_annotations = data["annotations"] is not None
        if filter_empty and not self.has_annotations:
            raise DatasetError(f"{self.annotation_file} has no 'annotations' (image info only, "
                               "as COCO test-dev ships): it serves inference and format-only "
                               "evaluation, not training")
        data["annotations"] = data["annotations"] or []
        cat_ids, names = _parse_categories(data["categories"], self.annotation_file)
        self.label_to_category_id: list[int] = cat_ids
        self.category_id_to_label: dict[int, int] = {c: k for k, c in enumerate(cat_ids)}
        index, read = _build_index(data, self.annotation_file, self.image_root, cat_ids,
                                   bad_annotations == "skip", min_box_size, allow_outside_paths)
        del data
        if filter_empty:
            index = filter_empty_images(index, keep_ignored=False, source=self.annotation_file,
                                        read=read)
        super().__init__(index, names, transform=transform, keep_ignored=False,
                         skip_bad_images=skip_bad_images, source=str(self.annotation_file))


def _load_json(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise DatasetError(f"{path}: annotation file not found") from None
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, 4300+ digits
        raise DatasetError(f"{path}: not valid JSON: {e}"[:300]) from None
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: a COCO annotation file is a JSON object, got "
                           f"{type(data).__name__}")
    missing = [k for k in ("images", "categories") if k not in data]
    if missing:
        raise DatasetError(f"{path}: missing {', '.join(repr(k) for k in missing)}; a COCO "
                           "instances file needs 'images' and 'categories' (and 'annotations' "
                           "to train or evaluate on it)")
    if "annotations" not in data:  # image info only, as COCO test-dev ships
        logger.info("%s: no 'annotations': %d images without boxes (for inference and "
                    "format-only evaluation)", path, len(data["images"]))
        data["annotations"] = None
    for k in ("images", "annotations", "categories"):
        if k == "annotations" and data[k] is None:
            continue
        if not isinstance(data[k], list):
            raise DatasetError(f"{path}: '{k}' must be a list, got {type(data[k]).__name__}")
    return data


def _field(rec: Any, key: str, kind: type | tuple, path: Path, what: str) -> Any:
    if not isinstance(rec, dict) or key not in rec:
        raise DatasetError(f"{path}: {what} has no '{key}'")
    v = rec[key]
    if not isinstance(v, kind) or isinstance(v, bool):
        raise DatasetError(f"{path}: {what} has '{key}' = {v!r} of the wrong type")
    return v


def _id(rec: Any, key: str, path: Path, what: str) -> int:
    """An id: a JSON whole number that numpy's int64 holds (strings, null, true and 2**70 are
    refused here rather than failing later as a TypeError or OverflowError)."""
    if not isinstance(rec, dict) or key not in rec:
        raise DatasetError(f"{path}: {what} has no '{key}'")
    v = rec[key]
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= MAX_ID:
        raise DatasetError(f"{path}: {what} has '{key}' = {v!r:.60}; ids are whole numbers from "
                           "0 to 2**63 - 1")
    return v


def _parse_categories(cats: list, path: Path) -> tuple[list[int], list[str]]:
    by_id: dict[int, str] = {}
    for n, c in enumerate(cats):
        cid = _id(c, "id", path, f"category #{n}")
        name = _field(c, "name", str, path, f"category id {cid}")
        if cid in by_id:
            raise DatasetError(f"{path}: duplicate category id {cid} ({by_id[cid]!r}, {name!r})")
        by_id[cid] = name
    if not by_id:
        raise DatasetError(f"{path}: 'categories' is empty")
    ids = sorted(by_id)
    return ids, [by_id[i] for i in ids]


def _parse_images(images: list, path: Path) -> tuple[np.ndarray, list[str], np.ndarray]:
    ids, names, sizes = [], [], []
    seen: dict[int, str] = {}
    for n, im in enumerate(images):
        iid = _id(im, "id", path, f"image #{n}")
        what = f"image id {iid}"
        name = _field(im, "file_name", str, path, what)
        w = _field(im, "width", int, path, what)
        h = _field(im, "height", int, path, what)
        if iid in seen:
            raise DatasetError(f"{path}: duplicate image id {iid} ({seen[iid]!r} and {name!r})")
        if not (0 < w <= MAX_SIDE and 0 < h <= MAX_SIDE):
            raise DatasetError(f"{path}: image id {iid} ({name}) has size {w}x{h}")
        seen[iid] = name
        ids.append(iid)
        names.append(name)
        sizes.append((h, w))
    return (np.asarray(ids, np.int64), names,
            np.asarray(sizes, np.int64).reshape(-1, 2))


def _parse_annotations(anns: list, path: Path) -> dict[str, np.ndarray]:
    ann_ids, image_ids, cat_ids, bboxes, crowd = [], [], [], [], []
    for n, a in enumerate(anns):
        # a missing id is allowed (-1 - n marks it); a present one must be an id
        aid = _id(a, "id", path, f"annotation #{n}") if isinstance(a, dict) and "id" in a \
            else -1 - n
        what = f"annotation id {aid}" if aid >= 0 else f"annotation #{n}"
        image_ids.append(_id(a, "image_id", path, what))
        cat_ids.append(_id(a, "category_id", path, what))
        b = _field(a, "bbox", list, path, what)
        if len(b) != 4 or not all(_is_coordinate(v) for v in b):
            raise DatasetError(f"{path}: {what} (image id {image_ids[-1]}): bbox {b!r:.200} is "
                               "not 4 numbers [x, y, w, h]")
        bboxes.append(b)
        # bool("no") is True: only 0/1 (true/false) say what COCO means by iscrowd
        flag = a.get("iscrowd", 0)
        if not isinstance(flag, (int, float)) or flag not in (0, 1):
            raise DatasetError(f"{path}: {what} (image id {image_ids[-1]}) has 'iscrowd' = "
                               f"{flag!r:.60}, not 0 or 1 (false or true)")
        crowd.append(bool(flag))
        ann_ids.append(aid)
    return {"id": np.asarray(ann_ids, np.int64), "image_id": np.asarray(image_ids, np.int64),
            "category_id": np.asarray(cat_ids, np.int64),
            "bbox": np.asarray(bboxes, np.float64).reshape(-1, 4),
            "crowd": np.asarray(crowd, np.bool_)}


def _is_coordinate(v: Any) -> bool:
    """A JSON number float64 holds (NaN and infinity pass here and are reported later)."""
    return isinstance(v, float) or (isinstance(v, int) and not isinstance(v, bool)
                                    and abs(v) <= MAX_ID)


def _lookup(sorted_keys: np.ndarray, order: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Positions of ``values`` among keys (``order`` sorts them), -1 where absent."""
    if len(sorted_keys) == 0:
        return np.full(len(values), -1, np.int64)
    pos = np.clip(np.searchsorted(sorted_keys, values), 0, len(sorted_keys) - 1)
    return np.where(sorted_keys[pos] == values, order[pos], -1)


def _build_index(data: dict, path: Path, image_root: Path, cat_ids: list[int], skip: bool,
                 min_box_size: float, allow_outside: bool) -> tuple[AnnotationIndex, str]:
    """The index, and what was read for the "no training box" error of ``filter_empty``."""
    ids, names, sizes = _parse_images(data["images"], path)
    paths = [os.fsencode(file_in_folder(image_root, n, allow_outside, f"{path}: image id {i} "
                                        f"has file_name {n!r:.200}", OUTSIDE_HINT))
             for i, n in zip(ids.tolist(), names)]
    a = _parse_annotations(data["annotations"], path)
    order = np.argsort(ids, kind="stable")
    img = _lookup(ids[order], order, a["image_id"])                       # (A,) image position
    label = _lookup(np.asarray(cat_ids), np.arange(len(cat_ids)), a["category_id"])
    x, y, w, h = a["bbox"].T
    size = sizes[np.maximum(img, 0)]                                      # (A, 2) h, w
    with np.errstate(invalid="ignore"):
        problems = [
            (img < 0, "refers to an unknown image id"),
            (label < 0, "has an unknown category id"),
            (~np.isfinite(a["bbox"]).all(1), "has NaN or infinite bbox coordinates"),
            ((w < 0) | (h < 0), "has a bbox with negative width or height"),
            ((x >= size[:, 1]) | (y >= size[:, 0]) | (x + w <= 0) | (y + h <= 0),
             "has a bbox entirely outside its image"),
        ]
    bad = np.zeros(len(img), bool)
    for mask, msg in problems:
        mask = mask & ~bad
        if mask.any():
            _report_bad(path, a, mask, msg, data["annotations"], skip, cat_ids)
        bad |= mask
    good = ~bad
    _check_xywh(path, a, size, good & ~a["crowd"], data["annotations"])
    img, label, crowd = img[good], label[good], a["crowd"][good]
    x1, y1 = np.maximum(x[good], 0), np.maximum(y[good], 0)
    x2 = np.minimum(x[good] + w[good], size[good, 1])
    y2 = np.minimum(y[good] + h[good], size[good, 0])
    boxes = np.stack([x1, y1, x2, y2], 1).astype(np.float32)
    small = ~crowd & (((x2 - x1) < min_box_size) | ((y2 - y1) < min_box_size))
    if small.any():
        logger.warning("%s: dropped %d boxes narrower or shorter than %g px after clipping to "
                       "the image (annotation ids %s)", path, int(small.sum()), min_box_size,
                       _first_ids(a["id"][good][small]))
    keep = ~small
    img, label, crowd, boxes = img[keep], label[keep], crowd[keep], boxes[keep]
    by_image = np.argsort(img, kind="stable")                             # group rows by image
    counts = np.bincount(img, minlength=len(ids))
    index = AnnotationIndex(
        paths=np.array(paths, dtype=np.bytes_),
        image_ids=ids, sizes=sizes,
        offsets=np.concatenate(([0], np.cumsum(counts))).astype(np.int64),
        boxes=boxes[by_image].reshape(-1, 4), labels=label[by_image].astype(np.int64),
        ignore=crowd[by_image])
    logger.info("%s: %d images, %d boxes (%d crowd) of %d categories", path, len(ids),
                int((~index.ignore).sum()), int(index.ignore.sum()), len(cat_ids))
    read = f"{len(bad)} annotations read"
    if len(bad):
        read += (f", none usable ({int(crowd.sum())} crowd, {int(small.sum())} under "
                 f"{min_box_size:g} px after clipping"
                 + (f", {int(bad.sum())} dropped by bad_annotations: skip)" if bad.any() else ")"))
    return index, read


def _first_ids(ids: np.ndarray, n: int = 5) -> str:
    s = ", ".join(str(int(i)) if i >= 0 else f"#{-1 - int(i)}" for i in ids[:n])
    return s + (", ..." if len(ids) > n else "")


def _report_bad(path: Path, a: dict, mask: np.ndarray, msg: str, raw: list, skip: bool,
                cat_ids: list[int]) -> None:
    rows = np.flatnonzero(mask)
    first = int(rows[0])
    aid = int(a["id"][first])
    name = f"annotation id {aid}" if aid >= 0 else f"annotation #{first}"
    detail = (f"{name} (image id {int(a['image_id'][first])}, category id "
              f"{int(a['category_id'][first])}, bbox {raw[first].get('bbox')}) {msg}")
    if "category" in msg:  # the usual cause: ids renumbered in one place and not the other
        unknown = np.unique(a["category_id"][rows])
        detail += (f"; category ids {_first_ids(unknown, 10)} are used by {len(rows)} "
                   f"annotations but 'categories' has ids {_first_ids(np.asarray(cat_ids), 10)}")
    if not skip:
        more = f" ({len(rows) - 1} more like it)" if len(rows) > 1 and "category" not in msg \
            else ""
        raise DatasetError(f"{path}: {detail}{more}; set bad_annotations: skip (data.train / "
                           "data.val) to drop such annotations")
    logger.warning("%s: skipped %d annotations that %s, e.g. %s (annotation ids %s)", path,
                   len(rows), msg.replace("has", "have").replace("refers", "refer"), detail,
                   _first_ids(a["id"][rows]))


def _check_xywh(path: Path, a: dict, size: np.ndarray, rows: np.ndarray, raw: list) -> None:
    """Refuses a file whose boxes look like corners [x1, y1, x2, y2] rather than COCO's
    [x, y, width, height].

    Read as xywh, a corner box runs past the right or bottom edge whenever its centre lies in
    the right or bottom half of the image, so about 3 boxes in 4 do; read as corners, all of
    them are valid boxes inside the image (x2 > x1, y2 > y1, x2 <= width, y2 <= height). Real
    xywh annotations almost never run past the image by more than a pixel, and only boxes
    wider than their left offset and taller than their top offset (large, or near the top-left
    corner) satisfy w > x and h > y: on coco128, 0 and 14% of 929. So the file is refused when at
    least 3 boxes and 20% of them run past the image by more than 1 px while 98% or more read
    as valid corner boxes; a file with fewer than 3 such boxes is never refused.
    """
    x, y, w, h = a["bbox"][rows].T
    height, width = size[rows].T
    past = (x + w > width + 1) | (y + h > height + 1)
    corners = (w > x) & (h > y) & (w <= width + 1) & (h <= height + 1)
    if past.sum() < 3 or past.mean() < 0.2 or corners.mean() < 0.98:
        return
    first = int(np.flatnonzero(rows)[np.flatnonzero(past)[0]])
    raise DatasetError(
        f"{path}: {int(past.sum())} of {len(past)} boxes run past their image when read as "
        f"COCO's [x, y, width, height] (e.g. annotation id {int(a['id'][first])}, image id "
        f"{int(a['image_id'][first])}: bbox {raw[first].get('bbox')} in a "
        f"{int(size[first, 1])}x{int(size[first, 0])} image), while {int(corners.sum())} are "
        "valid [x1, y1, x2, y2] boxes inside their image: the boxes seem to be corners; write "
        "them as [x1, y1, x2 - x1, y2 - y1]")
