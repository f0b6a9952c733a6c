"""COCO-format dataset: the real coco128 subset, label maps, compact index, bad input."""
from __future__ import annotations

import json
import logging
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from detres.data.coco import COCODetection
from detres.data.images import DatasetError

COCO128 = Path(__file__).resolve().parents[2] / "shared" / "data" / "coco128"
needs_coco128 = pytest.mark.skipif(not (COCO128 / "annotations.json").is_file(),
                                   reason=f"real COCO subset not found at {COCO128}")


@pytest.fixture(scope="module")
def coco128_json() -> dict:
    return json.loads((COCO128 / "annotations.json").read_text())


@needs_coco128
def test_coco128_counts_match_the_json(coco128_json):
    ds = COCODetection(COCO128 / "annotations.json", COCO128 / "images")
    anns = coco128_json["annotations"]
    assert len(ds) == len(coco128_json["images"]) == 128
    assert int((~ds.index.ignore).sum()) == sum(not a["iscrowd"] for a in anns) == 929
    assert int(ds.index.ignore.sum()) == sum(a["iscrowd"] for a in anns) == 10
    assert ds.num_classes == 80 and ds.class_names[0] == "person"
    assert ds.annotation_file == COCO128 / "annotations.json"
    per_image = Counter(a["image_id"] for a in anns if not a["iscrowd"])
    for i in range(0, 128, 9):
        assert len(ds.get_annotations(i)["boxes"]) == sum(
            a["image_id"] == ds.image_ids[i] for a in anns)
        assert int((~ds.get_annotations(i)["ignore"]).sum()) == per_image[int(ds.image_ids[i])]


@needs_coco128
def test_coco128_labels_map_back_to_category_ids(coco128_json):
    ds = COCODetection(COCO128 / "annotations.json", COCO128 / "images")
    cats = sorted(c["id"] for c in coco128_json["categories"])
    assert ds.label_to_category_id == cats
    assert all(ds.label_to_category_id[ds.category_id_to_label[c]] == c for c in cats)
    # Every box, mapped back to (image id, category id, xywh), is one of the JSON's.
    theirs = Counter((a["image_id"], a["category_id"], *np.round(a["bbox"], 2))
                     for a in coco128_json["annotations"])
    ours = Counter()
    for i in range(len(ds)):
        g = ds.get_annotations(i)
        for (x1, y1, x2, y2), lab in zip(g["boxes"].astype(np.float64), g["labels"]):
            ours[(int(ds.image_ids[i]), ds.label_to_category_id[lab],
                  *np.round([x1, y1, x2 - x1, y2 - y1], 2))] += 1
    assert ours == theirs


@needs_coco128
def test_coco128_empty_images_and_grayscale(coco128_json):
    train = COCODetection(COCO128 / "annotations.json", COCO128 / "images", filter_empty=True)
    evals = COCODetection(COCO128 / "annotations.json", COCO128 / "images", filter_empty=False)
    name_of = {im["id"]: im["file_name"] for im in coco128_json["images"]}
    empty = {"000000000250.jpg", "000000000508.jpg"}
    assert len(train) == 126 and not empty & {name_of[int(i)] for i in train.image_ids}
    assert empty <= {name_of[int(i)] for i in evals.image_ids}
    k = [name_of[int(i)] for i in evals.image_ids].index("000000000250.jpg")
    image, targets = evals[k]
    assert len(targets) == 0 and targets.boxes.shape == (0, 4)
    for i in range(len(evals)):  # the one grayscale JPEG arrives as 3-channel RGB
        path = evals.index.path(i)
        with Image.open(path) as im:
            if im.mode == "L":
                image, targets = evals[i]
                assert image.shape[0] == 3 and image.dtype == torch.uint8
                assert (image[0] == image[1]).all() and (image[1] == image[2]).all()
                assert targets.orig_size == tuple(evals.image_sizes[i])
                break
    else:
        pytest.fail("coco128 should hold one grayscale image")


def test_index_is_compact_arrays(tmp_path):
    ds = COCODetection(*_write(tmp_path, _base()))
    for name, value in vars(ds.index).items():
        assert isinstance(value, np.ndarray), name
    for name, value in vars(ds).items():  # no per-image Python containers on the dataset
        assert not (isinstance(value, (list, dict)) and len(value) >= len(ds)
                    and name not in ("class_names", "label_to_category_id",
                                     "category_id_to_label")), name


# --- small synthetic COCO files for the bad-input cases ------------------------------------

def _base() -> dict:
    return {
        "images": [{"id": 1, "file_name": "a.jpg", "width": 40, "height": 30},
                   {"id": 2, "file_name": "b.jpg", "width": 40, "height": 30}],
        "annotations": [
            {"id": 7, "image_id": 1, "category_id": 5, "bbox": [2, 3, 10, 12], "iscrowd": 0},
            {"id": 8, "image_id": 2, "category_id": 9, "bbox": [30, 20, 20, 20], "iscrowd": 0},
            {"id": 9, "image_id": 2, "category_id": 5, "bbox": [0, 0, 40, 30], "iscrowd": 1},
        ],
        "categories": [{"id": 9, "name": "nine"}, {"id": 5, "name": "five"}],
    }


def _write(tmp_path: Path, data: dict | str) -> tuple[Path, Path]:
    (tmp_path / "img").mkdir(exist_ok=True)
    for name in ("a.jpg", "b.jpg"):
        Image.new("RGB", (40, 30), (90, 120, 150)).save(tmp_path / "img" / name)
    path = tmp_path / "ann.json"
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path, tmp_path / "img"


def test_small_file_loads_with_clipping_and_contiguous_labels(tmp_path):
    ds = COCODetection(*_write(tmp_path, _base()))
    assert ds.class_names == ["five", "nine"] and ds.label_to_category_id == [5, 9]
    image, t = ds[1]
    assert t.image_id == 2 and t.orig_size == (30, 40) and t.scale == 1.0
    np.testing.assert_array_equal(t.boxes.numpy(), [[30.0, 20.0, 40.0, 30.0]])  # clipped
    assert t.labels.tolist() == [1]  # the crowd region is not a target


def test_degenerate_boxes_after_clipping_are_dropped_and_counted(tmp_path, caplog):
    data = _base()
    data["annotations"] += [
        {"id": 11, "image_id": 1, "category_id": 5, "bbox": [39.5, 3, 10, 12], "iscrowd": 0},
        {"id": 12, "image_id": 1, "category_id": 5, "bbox": [5, 5, 0, 4], "iscrowd": 0}]
    with caplog.at_level(logging.WARNING):
        ds = COCODetection(*_write(tmp_path, data))
    assert "dropped 2 boxes" in caplog.text and "11, 12" in caplog.text
    assert len(ds[0][1]) == 1


def _mutate(key: str, fn) -> dict:
    data = _base()
    fn(data[key])
    return data


BAD = [
    ("not json", '{"images": [', r"not valid JSON"),
    ("no categories", json.dumps({"images": [], "annotations": []}), r"missing 'categories'"),
    ("duplicate image", _mutate("images", lambda v: v.append(
        {"id": 2, "file_name": "c.jpg", "width": 4, "height": 4})), r"duplicate image id 2"),
    ("unknown image", _mutate("annotations", lambda v: v[0].update(image_id=99)),
     r"annotation id 7 \(image id 99.*unknown image id"),
    ("unknown category", _mutate("annotations", lambda v: v[1].update(category_id=3)),
     r"annotation id 8 \(image id 2, category id 3.*unknown category id"),
    ("negative width", _mutate("annotations", lambda v: v[0].update(bbox=[2, 3, -10, 12])),
     r"annotation id 7 \(image id 1.*negative width or height"),
    ("nan", _mutate("annotations", lambda v: v[1].update(bbox=[math.nan, 3, 10, 12])),
     r"annotation id 8 \(image id 2.*NaN"),
    ("outside", _mutate("annotations", lambda v: v[0].update(bbox=[45, 3, 10, 12])),
     r"annotation id 7 \(image id 1.*entirely outside"),
    ("bbox not 4 numbers", _mutate("annotations", lambda v: v[0].update(bbox=[1, 2, 3])),
     r"annotation id 7 \(image id 1\): bbox \[1, 2, 3\] is not 4 numbers"),
]


@pytest.mark.parametrize("case,data,pattern", BAD, ids=[b[0] for b in BAD])
def test_bad_annotation_files_name_file_and_id(tmp_path, case, data, pattern):
    ann, img = _write(tmp_path, data)
    with pytest.raises(DatasetError, match=pattern) as e:
        COCODetection(ann, img)
    assert str(ann) in str(e.value)


def test_bad_annotations_can_be_skipped_with_a_count(tmp_path, caplog):
    data = _base()
    data["annotations"][0]["bbox"] = [2, 3, -10, 12]
    data["annotations"][1]["image_id"] = 99
    with caplog.at_level(logging.WARNING):
        ds = COCODetection(*_write(tmp_path, data), bad_annotations="skip")
    assert "skipped 1 annotations that refer to an unknown image id" in caplog.text
    assert "skipped 1 annotations that have a bbox with negative width" in caplog.text
    assert len(ds.index.boxes) == 1 and ds.index.ignore.all()


def test_unknown_category_ids_are_listed_beside_the_known_ones(tmp_path):
    data = _base()
    data["annotations"][0]["category_id"] = 3
    data["annotations"][1]["category_id"] = 4
    data["annotations"][2]["category_id"] = 3
    with pytest.raises(DatasetError, match=r"category ids 3, 4 are used by 3 annotations but "
                                           r"'categories' has ids 5, 9; set bad_annotations: "
                                           r"skip"):
        COCODetection(*_write(tmp_path, data))


def test_file_without_annotations_loads_as_images_without_boxes(tmp_path):
    """COCO test-dev ships image info only: it loads for inference and format-only use."""
    data = _base()
    del data["annotations"]
    ds = COCODetection(*_write(tmp_path, data))
    assert not ds.has_annotations and len(ds) == 2 and ds.class_names == ["five", "nine"]
    assert ds.image_ids.tolist() == [1, 2]
    image, t = ds[1]
    assert tuple(image.shape) == (3, 30, 40) and t.image_id == 2 and len(t) == 0
    with pytest.raises(DatasetError, match=r"ann\.json has no 'annotations' .* not training"):
        COCODetection(*_write(tmp_path, data), filter_empty=True)
    assert COCODetection(*_write(tmp_path, _base())).has_annotations


def _as_corners(coco: dict) -> dict:
    coco = json.loads(json.dumps(coco))
    for a in coco["annotations"]:
        x, y, w, h = a["bbox"]
        a["bbox"] = [x, y, x + w, y + h]
    return coco


@needs_coco128
def test_coco128_written_as_corners_is_refused(tmp_path, coco128_json):
    """Real boxes: as xywh none runs past its image; as corners 738 of 929 do."""
    ann = tmp_path / "corners.json"
    ann.write_text(json.dumps(_as_corners(coco128_json)))
    with pytest.raises(DatasetError, match=r"corners\.json: 738 of 929 boxes run past their "
                                           r"image .* 929 are valid \[x1, y1, x2, y2\] boxes .*"
                                           r"write them as \[x1, y1, x2 - x1, y2 - y1\]"):
        COCODetection(ann, COCO128 / "images", bad_annotations="skip")


def _boxes_file(tmp_path: Path, boxes: list) -> tuple[Path, Path]:
    data = {"images": [{"id": 1, "file_name": "a.jpg", "width": 40, "height": 30}],
            "annotations": [{"id": k + 1, "image_id": 1, "category_id": 1, "bbox": b}
                            for k, b in enumerate(boxes)],
            "categories": [{"id": 1, "name": "thing"}]}
    return _write(tmp_path, data)


@pytest.mark.parametrize("boxes,refused", [
    # corners [x1, y1, x2, y2]: 3 of 4 run past the 40x30 image as xywh
    ([[2, 3, 12, 15], [20, 10, 38, 28], [25, 2, 39, 12], [5, 16, 20, 29]], True),
    # two boxes past the edge, both also valid corners: fewer than 3, clipped, not refused
    ([[12, 3, 30, 20], [20, 10, 25, 25], [1, 1, 5, 5]], False),
    # 3 of 4 past the edge, but two cannot be corners (w <= x): xywh with sloppy boxes
    ([[30, 20, 15, 15], [35, 2, 10, 5], [3, 3, 39, 28], [2, 2, 5, 5]], False),
])
def test_corner_boxes_are_told_apart_from_boxes_past_the_edge(tmp_path, boxes, refused):
    if refused:
        with pytest.raises(DatasetError, match=r"3 of 4 boxes run past .* annotation id 2, "
                                               r"image id 1: bbox \[20, 10, 38, 28\] in a 40x30"):
            COCODetection(*_boxes_file(tmp_path, boxes))
    else:
        ds = COCODetection(*_boxes_file(tmp_path, boxes))
        assert ds.index.boxes[:, 2].max() <= 40 and ds.index.boxes[:, 3].max() <= 30
