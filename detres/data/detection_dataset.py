"""The detection datasets' base (``DetectionDataset``), their compact annotation index and
the skipper of unreadable images.

``DetectionDataset`` is the base of ``COCODetection`` and ``VOCDetection``: it holds the
annotations of N images and A boxes in a handful of numpy arrays (``AnnotationIndex``), never
in per-image Python dicts or lists. DataLoader workers fork the dataset; touching a Python
object writes its reference count and so copies its memory page into the worker, which makes
workers grow to the size of the whole annotation file (pytorch/pytorch#13246). Numpy arrays
are single objects, so their pages stay shared.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, TypeVar

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from detres.data.images import DatasetError, image_to_tensor, read_image
from detres.structures import SkippedImageTargets, Targets

logger = logging.getLogger(__name__)

# (image HWC uint8, boxes (M, 4) float32, labels (M,) int64) -> (image, boxes, labels, scale)
Transform = Callable[[np.ndarray, np.ndarray, np.ndarray], tuple]
T = TypeVar("T")


@dataclass(frozen=True)
class AnnotationIndex:
    """Annotations of N images with A boxes in all, as flat numpy arrays.

    Attributes:
        paths: (N,) bytes, ``os.fsencode`` of each image file's path.
        image_ids: (N,) int64, the dataset's image id (COCO ``id``; VOC: position in the split).
        sizes: (N, 2) int64, (h, w) as annotated; the decoded image must have this size.
        offsets: (N + 1,) int64; the boxes of image i are rows ``offsets[i]:offsets[i + 1]``.
        boxes: (A, 4) float32 xyxy, 0-based pixels of the original image, clipped to it.
        labels: (A,) int64 contiguous labels in [0, K).
        ignore: (A,) bool, a COCO crowd region or a VOC "difficult" object: kept for
            evaluation, not a training target unless the dataset says so.
    """

    paths: np.ndarray
    image_ids: np.ndarray
    sizes: np.ndarray
    offsets: np.ndarray
    boxes: np.ndarray
    labels: np.ndarray
    ignore: np.ndarray

    def __len__(self) -> int:
        return len(self.image_ids)

    @classmethod
    def from_lists(cls, paths: list[str], image_ids: list[int], sizes: list[tuple[int, int]],
                   boxes_per_image: list[np.ndarray], labels_per_image: list[np.ndarray],
                   ignore_per_image: list[np.ndarray]) -> AnnotationIndex:
        counts = np.array([len(b) for b in boxes_per_image], dtype=np.int64)
        return cls(
            paths=np.array([os.fsencode(p) for p in paths], dtype=np.bytes_),
            image_ids=np.asarray(image_ids, dtype=np.int64),
            sizes=np.asarray(sizes, dtype=np.int64).reshape(-1, 2),
            offsets=np.concatenate(([0], np.cumsum(counts))).astype(np.int64),
            boxes=_concat(boxes_per_image, (0, 4), np.float32),
            labels=_concat(labels_per_image, (0,), np.int64),
            ignore=_concat(ignore_per_image, (0,), np.bool_),
        )

    def select(self, keep: np.ndarray) -> AnnotationIndex:
        """The index restricted to images ``keep`` (bool mask or indices), in that order."""
        keep = np.flatnonzero(keep) if keep.dtype == np.bool_ else np.asarray(keep, np.int64)
        rows = [np.arange(self.offsets[i], self.offsets[i + 1]) for i in keep]
        rows = np.concatenate(rows) if rows else np.zeros(0, np.int64)
        counts = self.offsets[keep + 1] - self.offsets[keep]
        return AnnotationIndex(self.paths[keep], self.image_ids[keep], self.sizes[keep],
                               np.concatenate(([0], np.cumsum(counts))).astype(np.int64),
                               self.boxes[rows], self.labels[rows], self.ignore[rows])

    def count_boxes(self, keep_ignored: bool = False) -> np.ndarray:
        """(N,) int64 number of (training) boxes per image."""
        image_of_row = np.repeat(np.arange(len(self)), np.diff(self.offsets))
        rows = slice(None) if keep_ignored else ~self.ignore
        return np.bincount(image_of_row[rows], minlength=len(self)).astype(np.int64)

    def path(self, i: int) -> Path:
        return Path(os.fsdecode(bytes(self.paths[i])))

    def rows(self, i: int) -> slice:
        return slice(int(self.offsets[i]), int(self.offsets[i + 1]))


def filter_empty_images(index: AnnotationIndex, keep_ignored: bool,
                        source: str | os.PathLike, read: str = "") -> AnnotationIndex:
    """Drops the images without a training box (logged with the count). None left is a
    ``DatasetError`` saying what was read (``read``, e.g. "3 annotations read, none usable (2
    crowd, 1 under 1 px after clipping)"), instead of an empty sampler later."""
    has_box = index.count_boxes(keep_ignored) > 0
    if not has_box.any():
        raise DatasetError(f"{source}: no training box: {len(index)} images"
                           f"{' and ' + read if read else ''}; nothing to train on")
    if not has_box.all():
        logger.info("%s: %d of %d images have no training box and are skipped (filter_empty)",
                    source, int((~has_box).sum()), len(index))
    return index.select(has_box)


def read_text_lines(f: Path) -> list[str]:
    """The lines of a list file (split files, the devkit's class map) as UTF-8; bytes that are
    not are a ``DatasetError`` naming the file."""
    try:
        return f.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise DatasetError(f"{f}: not a UTF-8 text file (byte {e.start}: {e.reason})") from None


def file_in_folder(folder: Path, name: str, allow_outside: bool, what: str, hint: str) -> Path:
    """``folder / name`` for a file name read from an annotation or split file, normalised
    (``a/../b`` -> ``b``), which is also the path read.

    A name that leads out of ``folder`` (an absolute path, or more ``..`` than folders before
    them) is a ``DatasetError`` (``what``: the file and record, ``hint``: how to allow it)
    unless ``allow_outside``. The check is on the name as written, not on where symbolic links
    lead: the folder and its links are the user's own (image folders are often linked in from
    elsewhere), only the annotation file is untrusted.
    """
    if "\0" in name:
        raise DatasetError(f"{what}, which contains a NUL character")
    name = os.path.normpath(name) if name else name
    if not allow_outside and (os.path.isabs(name) or name == os.pardir
                              or name.startswith(os.pardir + os.sep)):
        raise DatasetError(f"{what}, which leads outside the image folder {folder}; {hint}")
    return folder / name


def check_images_exist(index: AnnotationIndex, source: str | os.PathLike) -> None:
    """Raises ``DatasetError`` naming how many image files are missing, and the first few,
    before any work starts rather than at the first missing one, hours into training (one
    stat per image, 3 us on a local disk: 0.4 s for COCO train2017's 118k images)."""
    missing = [i for i in range(len(index)) if not os.path.isfile(index.paths[i])]
    if not missing:
        return
    first = ", ".join(f"{index.path(i)} (image id {int(index.image_ids[i])})" for i in missing[:3])
    folders = sorted({str(index.path(i).parent) for i in missing[:100]})[:2]
    raise DatasetError(
        f"{source}: {len(missing)} of {len(index)} image files are missing, e.g. {first}"
        f"{' ...' if len(missing) > 3 else ''}; check the image folder ({', '.join(folders)}: "
        "data.*.images for COCO-format sets, data.*.root for VOC) or set "
        "data.skip_bad_images: true to go on without them")


def _concat(parts: list[np.ndarray], empty_shape: tuple[int, ...], dtype) -> np.ndarray:
    parts = [np.asarray(p, dtype=dtype).reshape(-1, *empty_shape[1:]) for p in parts]
    return np.concatenate(parts) if parts else np.zeros(empty_shape, dtype)


class BadImageSkipper:
    """``skip_bad_images`` for any dataset: an image that cannot be read is logged, counted and
    replaced by the next readable one (training), or reported as missing (``substitute=False``,
    evaluation), instead of stopping the run.

    The flags live in shared memory, so skips made in DataLoader workers are seen (and
    reported) by the main process. With ``enabled`` False, reading errors pass through.

    Args:
        size: number of images.
        enabled: whether to skip at all.
        source: what to name in messages (a folder or annotation file).
        path_of: image index -> its file, for the up-front check and the report.
        errors: the exceptions that mean "this image is bad".
        hint: appended to a passing-through error (e.g. how to turn skipping on).
    """

    def __init__(self, size: int, enabled: bool, source: str, path_of: Callable[[int], Path],
                 errors: tuple[type[Exception], ...] = (DatasetError,), hint: str = "") -> None:
        self.size, self.enabled, self.source, self.path_of = size, enabled, source, path_of
        self.errors, self.hint = errors, hint
        self.bad = torch.zeros(size, dtype=torch.bool).share_memory_()
        if enabled:
            # Missing and empty files are found up front (one stat each), so they are skipped
            # without a warning per epoch; truncated or corrupt ones are found when read.
            for i in range(size):
                try:
                    self.bad[i] = path_of(i).stat().st_size == 0
                except OSError:
                    self.bad[i] = True
            if self.count:
                self.report()

    def read(self, i: int, read: Callable[[int], T], substitute: bool = True
             ) -> tuple[T | None, int]:
        """``(read(j), j)`` for the first readable image j from i on (i itself unless skipping).
        With ``substitute`` False a bad image i gives ``(None, i)`` (still counted)."""
        for k in range(self.size if substitute else 1):
            j = (i + k) % self.size
            if self.enabled and bool(self.bad[j]):
                continue
            try:
                return read(j), j
            except self.errors as e:
                if not self.enabled:
                    if self.hint:
                        raise type(e)(f"{e} ({self.hint})") from None
                    raise
                self.bad[j] = True
                logger.warning("skipping %s", e)
        if not substitute:
            return None, i
        raise DatasetError(f"{self.source}: none of the {self.size} images could be read")

    @property
    def count(self) -> int:
        """Images skipped so far, by any DataLoader worker."""
        return int(self.bad.sum())

    def report(self) -> int:
        """Logs how many images were skipped, and which; returns the count."""
        bad = np.flatnonzero(self.bad.numpy())
        if len(bad):
            names = ", ".join(str(self.path_of(int(i))) for i in bad[:10])
            logger.warning("%s: skipped %d of %d images that could not be read: %s%s",
                           self.source, len(bad), self.size, names,
                           " ..." if len(bad) > 10 else "")
        return len(bad)


class DetectionDataset(Dataset):
    """A detection dataset over an ``AnnotationIndex``.

    ``dataset[i]`` is ``(image, targets)``: image (3, H, W) uint8 RGB after the transform,
    ``Targets`` with boxes in the transformed image's pixels, the dataset's image id, the
    transform's scale and the original (h, w). Ignored boxes (crowd, difficult) are left out
    of the targets unless ``keep_ignored``.

    Args:
        index: the annotations.
        class_names: K names; label k is ``class_names[k]``.
        transform: ``(image, boxes, labels) -> (image, boxes, labels, scale)``, e.g.
            ``detres.data.transforms.DetectionTransform``; None keeps the original image.
        keep_ignored: make ignored boxes training targets too.
        skip_bad_images: an image that cannot be decoded, or whose size is not the annotated
            one, is logged, counted and replaced by the next good image instead of raising.
            Without it, missing image files are an error at construction
            (:func:`check_images_exist`).
            ``num_skipped_images`` and ``report_skipped_images()`` tell how many at the end.
        source: what to name in messages (the annotation file or dataset folder).
        substitute_bad_images: with ``skip_bad_images``, replace a bad image by the next good
            one (training). False (a test set, as ``build_det_dataset`` builds it): a bad image
            gives a black placeholder of its annotated size (transformed) with
            ``SkippedImageTargets`` under its own id, which evaluation scores as "no detections".
    """

    def __init__(self, index: AnnotationIndex, class_names: list[str], *,
                 transform: Transform | None = None, keep_ignored: bool = False,
                 skip_bad_images: bool = False, source: str = "",
                 substitute_bad_images: bool = True) -> None:
        self.index = index
        self.class_names = list(class_names)
        self.transform = transform
        self.keep_ignored = keep_ignored
        self.skip_bad_images = skip_bad_images
        self.substitute_bad_images = substitute_bad_images
        self.source = source
        if not skip_bad_images:
            check_images_exist(index, source)
        self.skipper = BadImageSkipper(len(index), skip_bad_images, source, index.path)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_ids(self) -> np.ndarray:
        """(N,) int64 image ids."""
        return self.index.image_ids

    @property
    def image_sizes(self) -> np.ndarray:
        """(N, 2) int64 (h, w) of each original image, read from the annotations."""
        return self.index.sizes

    def __len__(self) -> int:
        return len(self.index)

    def path(self, i: int) -> Path:
        return self.index.path(i)

    def get_annotations(self, i: int) -> dict[str, np.ndarray]:
        """All boxes of image i in original pixels: ``boxes`` (M, 4) float32 xyxy, ``labels``
        (M,) int64, ``ignore`` (M,) bool (crowd / difficult)."""
        r = self.index.rows(i)
        return {"boxes": self.index.boxes[r].copy(), "labels": self.index.labels[r].copy(),
                "ignore": self.index.ignore[r].copy()}

    def read_image(self, i: int) -> np.ndarray:
        """The original image i, (h, w, 3) uint8 RGB; checks its size against the annotations."""
        path = self.index.path(i)
        image = read_image(path)
        h, w = (int(v) for v in self.index.sizes[i])
        if image.shape[:2] != (h, w):
            hint = (" (width and height swapped: detres reads the pixels as stored, ignoring "
                    "the EXIF orientation as COCO does; if the annotations were made on the "
                    "image as a viewer shows it, rotate the file's pixels, e.g. exiftran -ai)"
                    ) if image.shape[:2] == (w, h) else ""
            raise DatasetError(f"{path}: image id {int(self.index.image_ids[i])} is "
                               f"{image.shape[1]}x{image.shape[0]} (w x h) but "
                               f"{self.size_source(i)} says {w}x{h}{hint}")
        return image

    def size_source(self, i: int) -> str:
        """What gave image i's annotated size, for the size-mismatch message."""
        return self.source

    def __getitem__(self, item: int | tuple[int, int]) -> tuple[Tensor, Targets]:
        """Image ``item``, or ``(index, seed)`` from a training sampler: the seed then drives
        the transform's augmentation (``DetectionTransform``)."""
        i, seed = (int(item[0]), int(item[1])) if isinstance(item, tuple) else (int(item), None)
        image, i = self.skipper.read(i, self.read_image, self.substitute_bad_images)
        if image is None:
            return self._placeholder(i)
        r = self.index.rows(i)
        keep = slice(None) if self.keep_ignored else ~self.index.ignore[r]
        boxes = self.index.boxes[r][keep]
        labels = self.index.labels[r][keep]
        orig_size = (image.shape[0], image.shape[1])
        scale = 1.0
        if self.transform is not None:
            image, boxes, labels, scale = (self.transform(image, boxes, labels) if seed is None
                                           else self.transform(image, boxes, labels, seed=seed))
        tensor = image_to_tensor(image)
        targets = Targets(boxes=torch.as_tensor(np.asarray(boxes, np.float32).reshape(-1, 4)),
                          labels=torch.as_tensor(np.asarray(labels, np.int64)),
                          image_id=int(self.index.image_ids[i]), scale=float(scale),
                          orig_size=orig_size)
        return tensor, targets

    def _placeholder(self, i: int) -> tuple[Tensor, Targets]:
        """Image i could not be read (evaluation): black, of its annotated size after the
        transform, with ``SkippedImageTargets`` (its own id, no boxes)."""
        h, w = (int(v) for v in self.index.sizes[i])
        image, scale = np.zeros((h, w, 3), np.uint8), 1.0
        if self.transform is not None:
            image, _, _, scale = self.transform(image, np.zeros((0, 4), np.float32),
                                                np.zeros((0,), np.int64))
        return image_to_tensor(image), SkippedImageTargets(
            boxes=torch.zeros((0, 4)), labels=torch.zeros((0,), dtype=torch.int64),
            image_id=int(self.index.image_ids[i]), scale=float(scale), orig_size=(h, w))

    @property
    def num_skipped_images(self) -> int:
        """How many images were skipped so far (by any DataLoader worker) as unreadable."""
        return self.skipper.count

    def report_skipped_images(self) -> int:
        """Logs how many images were skipped as unreadable, and which; returns the count."""
        return self.skipper.report()
