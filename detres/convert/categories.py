"""Class names and dataset ids for a converted detector: a detection checkpoint records both
(docs/architecture.md, Carriers). Weights carry only the class count, so they come from a
COCO-format file, a list of names, or, for 80 classes, COCO 2017's own categories.

Labels follow the sorted category ids, as in ``data/coco.py`` and detectron2's COCO metadata.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from detres.convert.pickles import ConversionError

# COCO 2017 detection categories (instances_val2017.json "categories"), by id
COCO_CATEGORY_IDS = (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22,
                     23, 24, 25, 27, 28, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44,
                     46, 47, 48, 49, 50, 51, 52, 53, 54, 55, 56, 57, 58, 59, 60, 61, 62, 63, 64,
                     65, 67, 70, 72, 73, 74, 75, 76, 77, 78, 79, 80, 81, 82, 84, 85, 86, 87, 88,
                     89, 90)
COCO_CLASS_NAMES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich",
    "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote",
    "keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book",
    "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush")


def categories_from_file(path: str | Path) -> tuple[list[str], list[int]]:
    """(names, ids) of a COCO-format JSON's ``categories``, sorted by id."""
    try:
        with open(path, encoding="utf-8") as f:
            categories = json.load(f)["categories"]
        pairs = sorted((int(c["id"]), str(c["name"])) for c in categories)
    except FileNotFoundError:
        raise ConversionError(f"{path}: no such file") from None
    except (ValueError, KeyError, TypeError) as e:
        raise ConversionError(f"{path}: not a COCO-format file with 'categories' "
                              f"({type(e).__name__}: {e})") from None
    return [n for _, n in pairs], [i for i, _ in pairs]


def class_list(num_classes: int, categories: str | Path | None = None,
               class_names: Sequence[str] | None = None) -> tuple[list[str], list[int]]:
    """(names, dataset ids) for ``num_classes`` labels.

    Args:
        num_classes: K, from the weights.
        categories: a COCO-format JSON whose ``categories`` name the classes.
        class_names: the names in label order (ids 1..K).
    """
    if categories is not None:
        names, ids = categories_from_file(categories)
        where = str(categories)
    elif class_names is not None:
        names, ids = list(class_names), list(range(1, len(class_names) + 1))
        where = "--class-names"
    elif num_classes == len(COCO_CLASS_NAMES):
        return list(COCO_CLASS_NAMES), list(COCO_CATEGORY_IDS)
    else:
        raise ConversionError(f"the weights detect {num_classes} classes, not COCO's 80: name "
                              f"them with --categories COCO.json or --class-names A,B,...")
    if len(names) != num_classes:
        raise ConversionError(f"{where} gives {len(names)} classes but the weights detect "
                              f"{num_classes}")
    return names, ids
