"""A dataset of one's own set up from the config alone: data.*.bad_annotations,
data.*.class_names and data.*.image_extensions reach the datasets that build_det_dataset makes."""
import json

import pytest
from PIL import Image

from helpers import ROOT

from detres.config import ConfigError, load_config
from detres.data.images import DatasetError
from detres.tasks.detection.build import build_det_dataset
from detres.tasks.detection.config import DetectionConfig


def _cfg(*overrides):
    return load_config(ROOT / "configs" / "frcnn_r18_shapes.yaml", list(overrides),
                       schema=DetectionConfig)


def _train_set(*overrides):
    cfg = _cfg(*overrides)
    return build_det_dataset(cfg.data.train, cfg.data, True, "data.train")


def _voc_style(tmp_path):
    """VOC layout, own classes, PNG images, one object of a class not in the list."""
    root = tmp_path / "devkit" / "VOC2024"
    for d in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / d).mkdir(parents=True)
    objects = {"p1": [("bolt", 3, 4, 30, 40)], "p2": [("nut", 10, 10, 50, 35),
                                                     ("washer", 1, 1, 9, 9)]}
    for name, objs in objects.items():
        Image.new("RGB", (64, 48), (20, 40, 60)).save(root / "JPEGImages" / f"{name}.png")
        xml = "".join(f"<object><name>{c}</name><bndbox><xmin>{a}</xmin><ymin>{b}</ymin>"
                      f"<xmax>{x}</xmax><ymax>{y}</ymax></bndbox></object>"
                      for c, a, b, x, y in objs)
        (root / "Annotations" / f"{name}.xml").write_text(
            f"<annotation><size><width>64</width><height>48</height></size>{xml}</annotation>")
    (root / "ImageSets" / "Main" / "train.txt").write_text("p1\np2\n")
    return tmp_path / "devkit"


def test_voc_style_set_from_config_keys(tmp_path):
    devkit = _voc_style(tmp_path)
    keys = ["data.train.type=voc", f"data.train.root={devkit}", "data.train.splits=[2024/train]",
            "data.train.class_names=[bolt, nut]", "data.train.image_extensions=[.png]"]
    with pytest.raises(DatasetError, match=r"p2\.xml: image p2 object #1 \(washer\): unknown "
                                           r"class 'washer'; the 2 classes are bolt, nut"):
        _train_set(*keys)
    ds = _train_set(*keys, "data.train.bad_annotations=skip")
    assert ds.class_names == ["bolt", "nut"] and ds.num_skipped_annotations == 1
    assert [ds.path(i).name for i in range(len(ds))] == ["p1.png", "p2.png"]
    assert ds.get_annotations(1)["labels"].tolist() == [1]


def test_coco_set_bad_annotations_from_config(tmp_path):
    (tmp_path / "img").mkdir()
    Image.new("RGB", (40, 30)).save(tmp_path / "img" / "a.jpg")
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps({
        "images": [{"id": 1, "file_name": "a.jpg", "width": 40, "height": 30}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [2, 2, 10, 10]},
                        {"id": 2, "image_id": 1, "category_id": 8, "bbox": [5, 5, 10, 10]}],
        "categories": [{"id": 1, "name": "thing"}]}))
    keys = ["data.train.type=coco", f"data.train.annotations={ann}",
            f"data.train.images={tmp_path / 'img'}"]
    with pytest.raises(DatasetError, match=r"category ids 8 are used by 1 annotations but "
                                           r"'categories' has ids 1; set bad_annotations: skip"):
        _train_set(*keys)
    ds = _train_set(*keys, "data.train.bad_annotations=skip")
    assert len(ds.index.boxes) == 1 and ds.class_names == ["thing"]
    with pytest.raises(ConfigError, match=r"data\.train\.class_names is for VOC-style sets"):
        _train_set(*keys, "data.train.class_names=[thing]")
    with pytest.raises(ConfigError, match=r"data\.train\.bad_annotations"):
        _cfg("data.train.bad_annotations=ignore")
