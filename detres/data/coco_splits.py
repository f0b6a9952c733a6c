"""COCO's released splits by name, and several splits as one training set.

The paper trains on the 80k ``train2014`` images and reports ``val2014`` (Table 8), and for
test-dev trains on train2014 + val2014 (Table 9, "using validation data"); detectron's
``valminusminival2014`` / ``minival2014`` hold 5k val2014 images out, and 2017's train/val
are that split renamed. Test-dev files carry image info only (no ``annotations``).
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from detres.data.coco import COCODetection
from detres.data.detection_dataset import AnnotationIndex, DetectionDataset
from detres.data.images import DatasetError

# split name -> (annotation file under annotations/, image folder)
COCO_SPLITS = {
    "train2014": ("instances_train2014.json", "train2014"),
    "val2014": ("instances_val2014.json", "val2014"),
    "minival2014": ("instances_minival2014.json", "val2014"),
    "valminusminival2014": ("instances_valminusminival2014.json", "val2014"),
    "train2017": ("instances_train2017.json", "train2017"),
    "val2017": ("instances_val2017.json", "val2017"),
    "test-dev2015": ("image_info_test-dev2015.json", "test2015"),
    "test-dev2017": ("image_info_test-dev2017.json", "test2017"),
}
# the names the presets used before splits were named by year
COCO_SPLIT_ALIASES = {"train": "train2017", "val": "val2017"}


def coco_split_files(root: Path, split: str) -> tuple[Path, Path]:
    """(annotation file, image folder) of a released split under the COCO folder ``root``;
    ValueError listing the known names for another name."""
    name = COCO_SPLIT_ALIASES.get(split, split)
    if name not in COCO_SPLITS:
        raise ValueError(f"unknown COCO split {split!r}; known: {', '.join(COCO_SPLITS)} "
                         f"(or set annotations/images for a set of your own)")
    annotations, images = COCO_SPLITS[name]
    return root / "annotations" / annotations, root / images


def image_ids_of(annotation_file: Path) -> set[int]:
    """The image ids listed in a COCO-format file (its ``images``)."""
    try:
        with open(annotation_file, "rb") as f:
            return {int(im["id"]) for im in json.load(f)["images"]}
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as e:
        raise DatasetError(f"{annotation_file}: cannot read its image ids ({e})") from None


class MergedCOCODetection(DetectionDataset):
    """Several COCO-format splits of one category list as one set, optionally without the
    images of a held-out split (e.g. train2014 + val2014 minus minival2014).

    Attributes:
        parts: the splits, as loaded.
        class_names, label_to_category_id, category_id_to_label: shared by every part.
        num_held_out: images left out because the held-out split lists them.
    """

    def __init__(self, parts: Sequence[COCODetection], exclude_ids: set[int] = frozenset()
                 ) -> None:
        first = parts[0]
        for part in parts[1:]:
            if part.label_to_category_id != first.label_to_category_id \
                    or part.class_names != first.class_names:
                raise DatasetError(f"{part.annotation_file} has other categories than "
                                   f"{first.annotation_file}; merged splits need one list")
        index = concat_indexes([p.index for p in parts])
        ids, counts = np.unique(index.image_ids, return_counts=True)
        if (counts > 1).any():
            raise DatasetError(f"image ids {ids[counts > 1][:5].tolist()} appear in more than "
                               f"one of {', '.join(str(p.annotation_file) for p in parts)}")
        keep = ~np.isin(index.image_ids, np.fromiter(exclude_ids, np.int64, len(exclude_ids)))
        self.num_held_out = int((~keep).sum())
        self.parts = list(parts)
        self.label_to_category_id = list(first.label_to_category_id)
        self.category_id_to_label = dict(first.category_id_to_label)
        self.has_annotations = all(p.has_annotations for p in parts)
        super().__init__(index.select(keep), first.class_names, transform=first.transform,
                         skip_bad_images=first.skip_bad_images,
                         source=" + ".join(str(p.annotation_file) for p in parts))


def concat_indexes(indexes: Sequence[AnnotationIndex]) -> AnnotationIndex:
    """The images of each index in turn, as one index."""
    offsets, start = [np.zeros(1, np.int64)], 0
    for index in indexes:
        offsets.append(index.offsets[1:] + start)
        start += int(index.offsets[-1])
    return AnnotationIndex(
        paths=np.concatenate([i.paths for i in indexes]),
        image_ids=np.concatenate([i.image_ids for i in indexes]),
        sizes=np.concatenate([i.sizes for i in indexes]),
        offsets=np.concatenate(offsets),
        boxes=np.concatenate([i.boxes for i in indexes]),
        labels=np.concatenate([i.labels for i in indexes]),
        ignore=np.concatenate([i.ignore for i in indexes]))
