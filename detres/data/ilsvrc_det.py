"""ImageNet detection (ILSVRC DET, 200 classes) in the ILSVRC layout:

    <root>/Data/DET/{train,val}/<name>.JPEG
    <root>/Annotations/DET/{train,val}/<name>.xml   PASCAL-VOC XML, <name> a WordNet id
    <root>/ImageSets/DET/<split>.txt                lines "<name> <index>"

He et al. 2015 (Appendix B, "ImageNet Detection", Table 12) fine-tune on DET train + val1 and
validate on val2, val1/val2 being R-CNN's halves of val (Girshick et al. 2014), given as
``ImageSets/DET/val1.txt`` / ``val2.txt`` in the same line format. A split's images live
under ``train/`` or ``val/`` by its name (``train*`` or ``val*``). Without a class list the
classes are the WordNet ids found in the split's annotations, sorted (the 200 DET synsets
for the full sets).
"""
from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np

from detres.data.detection_dataset import (AnnotationIndex, DetectionDataset, Transform,
                                           filter_empty_images)
from detres.data.images import DatasetError
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
    for prefix in ("train", "val"):
        if split.startswith(prefix):
            return prefix
    raise DatasetError(f"ILSVRC DET split {split!r}: its name must start with train or val "
                       f"(the folder under Data/DET and Annotations/DET)")


def read_split_file(root: Path, split: str) -> list[str]:
    f = root / "ImageSets" / "DET" / f"{split}.txt"
    if not f.is_file():
        raise DatasetError(f"{f}: ILSVRC DET split file not found (expected the ILSVRC layout "
                           f"<root>/ImageSets/DET/{split}.txt, root e.g. datasets/ILSVRC; "
                           f"val1/val2 are R-CNN's halves of val)")
    names = [line.split()[0] for line in f.read_text().splitlines() if line.strip()]
    if len(set(names)) != len(names):
        raise DatasetError(f"{f}: an image is listed twice")
    return names


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
        label_of = _Vocabulary() if class_names is None else {c: k for k, c in
                                                               enumerate(class_names)}
        skipped: list[str] = []
        on_bad = skipped.append if bad_annotations == "skip" else None
        paths, ids, sizes, boxes, labels = [], [], [], [], []
        for split in splits:
            sub = split_subfolder(split)
            for name in read_split_file(root, split):
                xml = root / "Annotations" / "DET" / sub / f"{name}.xml"
                h, w, b, lab, _, _ = read_pascal_xml(str(xml), label_of, tolerance=1.0,
                                                     on_bad=on_bad)
                paths.append(str(root / "Data" / "DET" / sub / f"{name}.JPEG"))
                ids.append(len(ids))
                sizes.append((h, w))
                boxes.append(np.asarray(b, np.float32).reshape(-1, 4))
                labels.append(np.asarray(lab, np.int64))
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
