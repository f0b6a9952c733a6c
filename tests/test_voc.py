"""VOC XML dataset on a tiny VOCdevkit written here: 1-based boxes, difficult, 07+12."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from detres.data.images import DatasetError
from detres.data.voc import VOC_CLASSES, VOCDetection


def _obj(name: str, box: tuple, difficult: int | None = 0, truncated: int = 0) -> str:
    diff = "" if difficult is None else f"<difficult>{difficult}</difficult>"
    return (f"<object><name>{name}</name><pose>Left</pose><truncated>{truncated}</truncated>"
            f"{diff}<bndbox><xmin>{box[0]}</xmin><ymin>{box[1]}</ymin><xmax>{box[2]}</xmax>"
            f"<ymax>{box[3]}</ymax></bndbox></object>")


def _image(root: Path, name: str, objects: list[str], size: tuple[int, int] = (60, 50),
           with_size: bool = True) -> None:
    w, h = size
    size_xml = (f"<size><width>{w}</width><height>{h}</height><depth>3</depth></size>"
                if with_size else "")
    (root / "Annotations" / f"{name}.xml").write_text(
        f"<annotation><folder>VOC</folder><filename>{name}.jpg</filename>{size_xml}"
        f"{''.join(objects)}</annotation>")
    Image.new("RGB", (w, h), (100, 50, 0)).save(root / "JPEGImages" / f"{name}.jpg")


def _devkit(tmp_path: Path, year: str, images: dict[str, list[str]], split: str = "trainval"
            ) -> Path:
    root = tmp_path / "VOCdevkit" / f"VOC{year}"
    for d in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / d).mkdir(parents=True, exist_ok=True)
    for name, objs in images.items():
        _image(root, name, objs)
    (root / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(images) + "\n")
    return root


@pytest.fixture
def voc07(tmp_path: Path) -> Path:
    return _devkit(tmp_path, "2007", {
        "000001": [_obj("dog", (1, 1, 10, 20)),                     # 1-based corner pixel
                   _obj("person", (5, 6, 60, 50), truncated=1),      # touches right/bottom
                   _obj("cat", (20, 20, 30, 30), difficult=1)],
        "000002": [_obj("car", (3, 4, 5, 9), difficult=None)],       # no <difficult> tag
        "000003": [_obj("bird", (10, 10, 20, 20), difficult=1)],     # only difficult
    })


def test_parsing_converts_1_based_boxes_and_keeps_flags(voc07):
    ds = VOCDetection((voc07, "trainval"))
    assert ds.class_names == list(VOC_CLASSES) and len(ds) == 3
    g = ds.get_annotations(0)
    np.testing.assert_array_equal(g["boxes"], [[0, 0, 10, 20], [4, 5, 60, 50], [19, 19, 30, 30]])
    # width x2 - x1 equals VOC's inclusive width xmax - xmin + 1
    assert g["boxes"][0, 2] - g["boxes"][0, 0] == 10 - 1 + 1
    assert [VOC_CLASSES[k] for k in g["labels"]] == ["dog", "person", "cat"]
    assert g["ignore"].tolist() == [False, False, True]
    assert ds.truncated[:3].tolist() == [False, True, False]
    assert ds.get_annotations(1)["ignore"].tolist() == [False]
    assert ds.image_names.tolist() == ["000001", "000002", "000003"]


def test_difficult_excluded_from_training_by_default(voc07):
    image, t = VOCDetection((voc07, "trainval"))[0]
    assert image.shape == (3, 50, 60) and t.orig_size == (50, 60) and t.image_id == 0
    assert t.labels.tolist() == [VOC_CLASSES.index("dog"), VOC_CLASSES.index("person")]
    np.testing.assert_array_equal(t.boxes.numpy(), [[0.0, 0, 10, 20], [4, 5, 60, 50]])
    _, t = VOCDetection((voc07, "trainval"), keep_difficult=True)[0]
    assert len(t) == 3


def test_filter_empty_drops_images_with_only_difficult_objects(voc07):
    train = VOCDetection((voc07, "trainval"), filter_empty=True)
    assert train.image_names.tolist() == ["000001", "000002"]
    assert train.image_ids.tolist() == [0, 1] and len(train.truncated) == 4
    assert len(VOCDetection((voc07, "trainval"), filter_empty=True, keep_difficult=True)) == 3


def test_07_plus_12_union(voc07, tmp_path):
    voc12 = _devkit(tmp_path, "2012", {"2008_000001": [_obj("horse", (2, 2, 40, 40))]})
    ds = VOCDetection([(voc07, "trainval"), (voc12, "trainval")])
    assert len(ds) == 4 and ds.image_ids.tolist() == [0, 1, 2, 3]
    assert ds.image_names[3] == "2008_000001"
    image, t = ds[3]
    assert t.labels.tolist() == [VOC_CLASSES.index("horse")]
    assert "VOC2012" in str(ds.index.path(3))


def test_xml_without_size_is_an_error(tmp_path):
    root = _devkit(tmp_path, "2007", {"000001": [_obj("dog", (1, 1, 10, 20))]})
    _image(root, "000001", [_obj("dog", (1, 1, 10, 20))], with_size=False)
    with pytest.raises(DatasetError, match=r"000001\.xml: image 000001 has no <size>"):
        VOCDetection((root, "trainval"))


def test_unknown_class_is_an_error(tmp_path):
    root = _devkit(tmp_path, "2007", {"000007": [_obj("dog", (1, 1, 9, 9)),
                                                 _obj("unicorn", (1, 1, 10, 20))]})
    with pytest.raises(DatasetError,
                       match=r"000007\.xml: image 000007 object #1 \(unicorn\): unknown class"):
        VOCDetection((root, "trainval"))


@pytest.mark.parametrize("box,words", [((10, 10, 5, 20), "xmax < xmin"),
                                       ((70, 10, 80, 20), "entirely outside")])
def test_impossible_boxes_are_errors(tmp_path, box, words):
    root = _devkit(tmp_path, "2007", {"000004": [_obj("cat", box)]})
    with pytest.raises(DatasetError, match=rf"000004\.xml: image 000004 object #0.*{words}"):
        VOCDetection((root, "trainval"))


def test_missing_split_and_annotation(tmp_path):
    root = _devkit(tmp_path, "2007", {"000001": [_obj("dog", (1, 1, 10, 20))]})
    with pytest.raises(DatasetError, match=r"Main/test\.txt: VOC split file not found"):
        VOCDetection((root, "test"))
    (root / "ImageSets" / "Main" / "val.txt").write_text("000009\n")
    with pytest.raises(DatasetError, match=r"000009\.xml: annotation of image 000009 not found"):
        VOCDetection((root, "val"))


def test_own_classes_and_png_images(tmp_path):
    """A VOC-style set of one's own: its class names, PNG files beside JPEGs."""
    root = _devkit(tmp_path, "2007", {"a": [_obj("gadget", (1, 1, 10, 20))],
                                      "b": [_obj("widget", (5, 5, 30, 30)),
                                            _obj("gadget", (2, 2, 8, 8))]})
    jpg = root / "JPEGImages" / "b.jpg"
    Image.open(jpg).save(root / "JPEGImages" / "b.png")
    jpg.unlink()
    with pytest.raises(DatasetError, match=r"a\.xml: image a object #0 \(gadget\): unknown "
                                           r"class 'gadget'.*; set class_names"):
        VOCDetection((root, "trainval"), image_extensions=[".jpg", ".png"])
    ds = VOCDetection((root, "trainval"), class_names=["widget", "gadget"],
                      image_extensions=[".jpg", "png"])
    assert ds.class_names == ["widget", "gadget"]
    assert [ds.path(i).name for i in range(2)] == ["a.jpg", "b.png"]
    assert ds[1][1].labels.tolist() == [0, 1] and ds[0][1].labels.tolist() == [1]
    with pytest.raises(DatasetError, match=r"1 of 2 image files are missing, e\.g\. .*b\.jpg"):
        VOCDetection((root, "trainval"), class_names=["widget", "gadget"])


def test_bad_objects_can_be_skipped_with_a_count(tmp_path, caplog):
    root = _devkit(tmp_path, "2007", {"000005": [_obj("dog", (1, 1, 10, 20)),
                                                 _obj("unicorn", (1, 1, 10, 20)),
                                                 _obj("cat", (10, 10, 5, 20)),
                                                 _obj("cat", (70, 10, 80, 20))]})
    with caplog.at_level(logging.WARNING):
        ds = VOCDetection((root, "trainval"), bad_annotations="skip")
    assert ds.num_skipped_annotations == 3
    assert "skipped 3 objects" in caplog.text and "unknown class 'unicorn'" in caplog.text
    assert ds.get_annotations(0)["labels"].tolist() == [VOC_CLASSES.index("dog")]
    with pytest.raises(DatasetError, match=r"object #1 \(unicorn\): unknown class .* or "
                                           r"bad_annotations: skip to drop such objects"):
        VOCDetection((root, "trainval"))


def test_a_split_file_that_is_not_utf8_is_named(tmp_path):
    root = _devkit(tmp_path, "2007", {"000001": [_obj("dog", (1, 1, 10, 20))]})
    (root / "ImageSets" / "Main" / "val.txt").write_bytes(b"000001\n\xff\xfe\n")
    with pytest.raises(DatasetError, match=r"Main/val\.txt: not a UTF-8 text file"):
        VOCDetection((root, "val"))
