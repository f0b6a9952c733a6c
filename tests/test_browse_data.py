"""tools/browse_data.py on a tiny COCO-format set written here: the drawings are the
transformed images with the boxes where the transform puts them, crowd regions dashed."""
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import load_tool

from detres.visualize import class_colour, draw_ground_truth

browse = load_tool("browse_data")
CONFIG = Path(__file__).resolve().parents[1] / "configs" / "frcnn_r18_shapes.yaml"


@pytest.fixture
def tiny_coco(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for name, (h, w) in {"a.png": (40, 60), "b.png": (50, 30)}.items():
        Image.fromarray(np.full((h, w, 3), 40, np.uint8)).save(images / name)
    data = {"images": [{"id": 3, "file_name": "a.png", "height": 40, "width": 60},
                       {"id": 8, "file_name": "b.png", "height": 50, "width": 30}],
            "categories": [{"id": 5, "name": "apple"}, {"id": 9, "name": "pear"}],
            "annotations": [
                {"id": 1, "image_id": 3, "category_id": 5, "bbox": [5, 5, 20, 10],
                 "iscrowd": 0, "area": 200},
                {"id": 2, "image_id": 3, "category_id": 9, "bbox": [30, 2, 25, 30],
                 "iscrowd": 1, "area": 750},
                {"id": 3, "image_id": 8, "category_id": 9, "bbox": [2, 2, 10, 10],
                 "iscrowd": 0, "area": 100}]}
    (tmp_path / "ann.json").write_text(json.dumps(data))
    return ["data.train.type=coco", f"data.train.annotations={tmp_path / 'ann.json'}",
            f"data.train.images={images}", "data.min_size_train=[80]",
            "data.max_size_train=200"]


def run(overrides, out, *flags):
    return browse.main([str(CONFIG), *overrides, "--out", str(out),
                        *flags])


def test_boxes_follow_the_training_resize_and_flip(tiny_coco, tmp_path, capsys):
    drawn = run([*tiny_coco, "data.flip_prob=1.0"], tmp_path / "out")
    assert drawn == {"apple": 1, "pear": 1, "pear (crowd)": 1}
    assert "apple: 1 boxes" in capsys.readouterr().out
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert files == ["0000_a.png", "0001_b.png"]
    a = np.asarray(Image.open(tmp_path / "out" / "0000_a.png"))
    assert a.shape == (80, 120, 3)                          # shorter side 40 -> 80: scale 2
    # apple [5, 5, 25, 15] -> x2 -> [10, 10, 50, 30] -> flipped in a 120-wide image:
    # [70, 10, 110, 30]; its bottom edge is apple's colour, the unflipped place is not
    assert tuple(a[30, 90]) == class_colour(0)
    assert tuple(a[30, 30]) != class_colour(0)
    # the crowd pear [30, 2, 55, 32] -> [60, 4, 110, 64] -> flipped [10, 4, 60, 64]: dashed
    bottom = (a[64, 12:58] == class_colour(1)).all(axis=-1)
    assert 0.3 < bottom.mean() < 0.8
    b = np.asarray(Image.open(tmp_path / "out" / "0001_b.png"))
    assert b.shape == (133, 80, 3)                          # 50x30 -> scale 80/30


def test_before_transforms_draws_the_original_pixels(tiny_coco, tmp_path):
    run(tiny_coco, tmp_path / "out", "--before-transforms", "--n", "1")
    a = np.asarray(Image.open(tmp_path / "out" / "0000_a.png"))
    assert a.shape == (40, 60, 3)
    assert tuple(a[15, 15]) == class_colour(0)             # apple's bottom edge, y = 5 + 10
    assert len(list((tmp_path / "out").iterdir())) == 1


def test_ground_truth_drawing_marks_ignored_boxes_dashed():
    image = np.zeros((60, 80, 3), np.uint8)
    boxes = np.array([[10.0, 10.0, 70.0, 50.0], [20.0, 20.0, 40.0, 40.0]])
    out = np.asarray(draw_ground_truth(image, boxes, np.array([0, 1]), np.array([True, False]),
                                       ["a", "b"], "crowd"))
    solid = (out[40, 21:39] == class_colour(1)).all(axis=-1)
    dashed = (out[50, 11:69] == class_colour(0)).all(axis=-1)
    assert solid.all() and 0.3 < dashed.mean() < 0.8
    assert (image == 0).all()
