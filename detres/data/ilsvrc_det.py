"""ImageNet detection (ILSVRC DET, 200 classes) in the ILSVRC layout:

    <root>/Data/DET/{train,val}/<name>.JPEG
    <root>/Annotations/DET/{train,val}/<name>.xml   PASCAL-VOC XML, <name> a WordNet id
    <root>/ImageSets/DET/<split>.txt                lines "<name> <index>"
    <root>/Data/DET/test/<name>.JPEG                the test images (no annotations)
    <root>/devkit/data/map_det.txt                  lines "<wnid> <DET id> <name>" (devkit)

He et al. 2015 (Appendix B, "ImageNet Detection", Table 12) fine-tune on DET train + val1 and
validate on val2, val1/val2 being R-CNN's halves of val (Girshick et al. 2014), given as
``ImageSets/DET/val1.txt`` / ``val2.txt`` in the same line format. A split's images live
under ``train/`` or ``val/`` by its name (``train*`` or ``val*``). Without a class list the
classes are the WordNet ids found in the split's annotations, sorted (the 200 DET synsets
for the full sets).

The test split (``test``, 40,152 images for ILSVRC 2015) has no public boxes: it is read from
its split file alone, image ids are the file's indices (the ``<image_index>`` of the server's
results format), sizes come from the image headers, and the classes are the devkit's 200
synsets, sorted. ``label_to_category_id`` is each class's devkit DET id (``map_det.txt``)
when the devkit is beside the data, for the results file of the evaluation server.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np

from detres.data.detection_dataset import (AnnotationIndex, DetectionDataset, Transform,
                                           filter_empty_images, read_text_lines)
from detres.data.images import DatasetError, ImageDecodeError, read_image_size
from detres.data.voc import read_pascal_xml

logger = logging.getLogger(__name__)


class _Vocabulary(dict):
    """A class map that admits every name, numbering them in order of appearance."""

    def __contains__(self, name: object) -> bool:
        return True

    def __missing__(self, name: str) -> int:
        self[name] = len(self)
        return self[name]


def split_subfolder(split: str) -> str:
    for prefix in ("train", "val", "test"):
        if split.startswith(prefix):
            return prefix
    raise DatasetError(f"ILSVRC DET split {split!r}: its name must start with train, val or "
                       f"test (the folder under Data/DET and Annotations/DET)")


def read_split_file(root: Path, split: str) -> list[tuple[str, int | None]]:
    """(image name, index or None where the line has none) per line of the split file."""
    f = root / "ImageSets" / "DET" / f"{split}.txt"
    if not f.is_file():
        raise DatasetError(f"{f}: ILSVRC DET split file not found (expected the ILSVRC layout "
                           f"<root>/ImageSets/DET/{split}.txt, root e.g. datasets/ILSVRC; "
                           f"val1/val2 are R-CNN's halves of val)")
    entries = []
    for n, line in enumerate(read_text_lines(f), 1):
        fields = line.split()
        if not fields:
            continue
        name = fields[0]
        if Path(name).is_absolute() or ".." in Path(name).parts or "\0" in name:
            raise DatasetError(f"{f}, line {n}: {name!r} is not a name inside the split's "
                               f"folder")
        index = None
        if len(fields) > 1:
            if not (fields[1].isascii() and fields[1].isdigit()) or int(fields[1]) >= 2**31:
                raise DatasetError(f"{f}, line {n}: the image index {fields[1]!r} is not a "
                                   f"whole number below 2^31")
            index = int(fields[1])
        entries.append((name, index))
    if len({name for name, _ in entries}) != len(entries):
        raise DatasetError(f"{f}: an image is listed twice")
    return entries


def read_det_map(root: Path) -> dict[str, int] | None:
    """WordNet id -> the devkit's DET id (1..200) from ``devkit/data/map_det.txt``; None when
    the file is absent."""
    f = root / "devkit" / "data" / "map_det.txt"
    if not f.is_file():
        return None
    out: dict[str, int] = {}
    for n, line in enumerate(read_text_lines(f), 1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) < 2 or not (fields[1].isascii() and fields[1].isdigit()) \
                or int(fields[1]) >= 2**31:
            raise DatasetError(f"{f}, line {n}: expected '<wnid> <DET id> <name>', got "
                               f"{line[:80]!r}")
        if fields[0] in out:
            raise DatasetError(f"{f}, line {n}: {fields[0]} is listed twice")
        out[fields[0]] = int(fields[1])
    return out


def _header_size(path: Path, skip_bad_images: bool) -> tuple[int, int]:
    try:
        return read_image_size(path)
    except ImageDecodeError as e:
        if skip_bad_images:
            return 1, 1         # read again, and skipped, when decoded
        raise DatasetError(f"{e}; data.skip_bad_images=true skips it") from None


class ILSVRCDetection(DetectionDataset):
    """One or more ILSVRC DET splits as one detection dataset.

    Args:
        root: the ILSVRC folder (``Data``, ``Annotations``, ``ImageSets`` inside).
        splits: split names, e.g. ``["train", "val1"]``.
        class_names: the WordNet ids in label order; None: those found, sorted.
        transform, skip_bad_images: see ``DetectionDataset``.
        filter_empty: drop images without a box (DET train has negative images).
        bad_annotations: ``"error"`` or ``"skip"`` unusable objects (counted in a warning).
    """

    def __init__(self, root: str | os.PathLike, splits: Sequence[str], *,
                 class_names: Sequence[str] | None = None, transform: Transform | None = None,
                 filter_empty: bool = False, skip_bad_images: bool = False,
                 bad_annotations: Literal["error", "skip"] = "error") -> None:
        root = Path(root)
        det_map = read_det_map(root)
        tests = [split_subfolder(split) == "test" for split in splits]
        if any(tests) and not all(tests):
            raise DatasetError(f"ILSVRC DET splits {list(splits)}: the test split has no boxes "
                               f"and cannot be read with annotated splits")
        self.has_annotations = not any(tests)
        if class_names is None and not self.has_annotations:
            if det_map is None:
                raise DatasetError(f"{root / 'devkit' / 'data' / 'map_det.txt'}: not found; "
                                   f"the test split takes its 200 classes from the ILSVRC "
                                   f"devkit's map_det.txt (or give data.val.class_names)")
            class_names = sorted(det_map)
        label_of = _Vocabulary() if class_names is None else {c: k for k, c in
                                                               enumerate(class_names)}
        skipped: list[str] = []
        on_bad = skipped.append if bad_annotations == "skip" else None
        paths, ids, sizes, boxes, labels = [], [], [], [], []
        for split in splits:
            sub = split_subfolder(split)
            for name, index in read_split_file(root, split):
                path = root / "Data" / "DET" / sub / f"{name}.JPEG"
                paths.append(str(path))
                if sub == "test":   # the server knows the images by their split-file index
                    if index is None:
                        raise DatasetError(f"{root}/ImageSets/DET/{split}.txt: {name} has no "
                                           f"image index (lines '<name> <index>')")
                    ids.append(index)
                    sizes.append(_header_size(path, skip_bad_images))
                    boxes.append(np.zeros((0, 4), np.float32))
                    labels.append(np.zeros(0, np.int64))
                    continue
                xml = root / "Annotations" / "DET" / sub / f"{name}.xml"
                h, w, b, lab, _, _ = read_pascal_xml(str(xml), label_of, tolerance=1.0,
                                                     on_bad=on_bad)
                ids.append(len(ids))
                sizes.append((h, w))
                boxes.append(np.asarray(b, np.float32).reshape(-1, 4))
                labels.append(np.asarray(lab, np.int64))
        if len(set(ids)) != len(ids):
            raise DatasetError(f"{root}: ILSVRC DET splits {list(splits)} give two images "
                               f"the same index")
        if skipped:
            logger.warning("%s: skipped %d objects that could not be used (bad_annotations: "
                           "skip), e.g. %s", root, len(skipped), skipped[0])
        if class_names is None:  # number the synsets in sorted order
            names = sorted(label_of)
            order = np.array([names.index(n) for n in label_of], np.int64)
            labels = [order[lab] if len(lab) else lab for lab in labels]
            class_names = names
        index = AnnotationIndex.from_lists(paths, ids, sizes, boxes, labels,
                                           [np.zeros(len(b), np.bool_) for b in boxes])
        source = f"{root}:{'+'.join(splits)}"
        if filter_empty:
            index = filter_empty_images(index, keep_ignored=False, source=source)
        super().__init__(index, list(class_names), transform=transform,
                         skip_bad_images=skip_bad_images, source=source)
        self.label_to_category_id: list[int] = []
        if det_map is not None and all(c in det_map for c in self.class_names):
            self.label_to_category_id = [det_map[c] for c in self.class_names]
