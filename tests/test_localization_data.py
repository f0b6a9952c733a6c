"""ImageNet localization data: ILSVRC XML layout, bad input, built-in set, transforms, collate."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import write_jpeg

from detres.data.builtin_loc import LOC_CLASSES, ensure_builtin_loc, ilsvrc_xml
from detres.data.classification import DatasetNotFoundError
from detres.data.images import DatasetError
from detres.data.loc_batches import collate_classifier, collate_rpn
from detres.data.loc_transforms import LocTrainTransform
from detres.data.localization import BOX_TOLERANCE, LocalizationDataset, loc_split_dirs
from detres.data.transforms import resize
from detres.data.voc import read_pascal_xml

A, B, C = "n01440764", "n01443537", "n01484850"
SMALL = {"num_train_per_class": 4, "num_val_per_class": 2, "image_size": 64}


def _xml(path: Path, objects: list[tuple], size: tuple[int, int] | None = (60, 40),
         raw: str | None = None) -> None:
    """ILSVRC-style file; objects are (name, xmin, ymin, xmax, ymax), size is (w, h)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if raw is not None:
        path.write_text(raw)
        return
    size_xml = (f"<size><width>{size[0]}</width><height>{size[1]}</height><depth>3</depth>"
                "</size>" if size else "")
    objs = "".join(f"<object><name>{n}</name><pose>Unspecified</pose><truncated>0</truncated>"
                   f"<difficult>0</difficult><bndbox><xmin>{x1}</xmin><ymin>{y1}</ymin>"
                   f"<xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>"
                   for n, x1, y1, x2, y2 in objects)
    path.write_text(f"<annotation><folder>x</folder><filename>{path.stem}</filename>"
                    f"<source><database>ILSVRC_2012</database></source>{size_xml}"
                    f"<segmented>0</segmented>{objs}</annotation>")


def _img(path: Path, size: tuple[int, int] = (60, 40)) -> None:
    write_jpeg(path, size, (90, 120, 30))


def split(root: Path, name: str, **kwargs) -> LocalizationDataset:
    """A split of a root as ``tasks/localization/build.py`` makes it."""
    return LocalizationDataset(*loc_split_dirs(root, name), **kwargs)


def read_ilsvrc_xml(xml: Path, label_of: dict[str, int]):
    """(h, w), boxes (M, 4), labels, dropped: one XML as the dataset reads it."""
    h, w, b, labels, _, dropped = read_pascal_xml(str(xml), label_of, tolerance=BOX_TOLERANCE)
    return (h, w), np.asarray(b, np.float32).reshape(-1, 4), labels, dropped


def doubled(image: np.ndarray, boxes: np.ndarray, labels: np.ndarray):  # a test transform
    return (*resize(image, boxes, 2.0), labels, 2.0)


@pytest.fixture
def ilsvrc(tmp_path: Path) -> Path:
    """Two train classes (nested XMLs, one train image without boxes), flat val XMLs."""
    r = tmp_path / "imagenet"
    _img(r / "train" / A / f"{A}_1.JPEG")
    _xml(r / "bbox" / "train" / A / f"{A}_1.xml", [(A, 1, 1, 10, 20), (A, 5, 6, 60, 40)])
    _img(r / "train" / A / f"{A}_2.JPEG")                      # no boxes (as most of ImageNet)
    _img(r / "train" / B / f"{B}_7.png")                       # any image extension
    _xml(r / "bbox" / "train" / B / f"{B}_7.xml", [(B, 0, 3, 61, 12)])  # 0 and w+1: tolerated
    (r / "train" / B / "notes.txt").write_text("not an image")
    _img(r / "val" / B / "ILSVRC2012_val_00000001.JPEG")
    _xml(r / "bbox" / "val" / "ILSVRC2012_val_00000001.xml", [(B, 2, 2, 2, 2)])  # one pixel
    return r


# ----------------------------------------------------------------------------- layout
def test_ilsvrc_layout_boxes_labels_and_val_class_list(ilsvrc):
    train = LocalizationDataset(ilsvrc / "train", ilsvrc / "bbox" / "train")
    assert train.class_names == [A, B] and train.num_classes == 2 and len(train) == 2
    assert train.num_images_without_boxes == 1
    np.testing.assert_array_equal(train.image_labels, [0, 1])
    assert train.path(1).name == f"{B}_7.png" and train.xml_path(0).name == f"{A}_1.xml"
    boxes, labels = (train.get_annotations(0)[k] for k in ("boxes", "labels"))
    # 1-based inclusive -> 0-based xyxy: x2 - x1 = xmax - xmin + 1
    np.testing.assert_array_equal(boxes, [[0, 0, 10, 20], [4, 5, 60, 40]])
    assert boxes.dtype == np.float32 and labels.tolist() == [0, 0]
    boxes, labels = (train.get_annotations(1)[k] for k in ("boxes", "labels"))
    np.testing.assert_array_equal(boxes, [[0, 2, 60, 12]])  # (-1, 2, 61, 12) clipped
    np.testing.assert_array_equal(train.image_sizes, [[40, 60], [40, 60]])

    # val lacks class A: with the train list, B keeps label 1
    val = split(ilsvrc, "val", class_names=train.class_names, missing_boxes="error")
    assert val.class_names == [A, B] and len(val) == 1 and val.image_labels.tolist() == [1]
    boxes, labels = (val.get_annotations(0)[k] for k in ("boxes", "labels"))
    np.testing.assert_array_equal(boxes, [[1, 1, 2, 2]])
    assert labels.tolist() == [1]
    alone = split(ilsvrc, "val")
    assert alone.class_names == [B] and alone.get_annotations(0)["labels"].tolist() == [0]


def test_val_accepts_nested_xml_folders(ilsvrc):
    (ilsvrc / "bbox" / "val" / "ILSVRC2012_val_00000001.xml").unlink()
    _xml(ilsvrc / "bbox" / "val" / B / "ILSVRC2012_val_00000001.xml", [(B, 3, 4, 30, 40)])
    val = split(ilsvrc, "val", class_names=[A, B], missing_boxes="error")
    np.testing.assert_array_equal(val.get_annotations(0)["boxes"], [[2, 3, 30, 40]])


def test_getitem_returns_the_sample_in_original_pixels(ilsvrc):
    ds = split(ilsvrc, "train")
    s = ds[1]
    assert s.image.shape == (40, 60, 3) and s.image.dtype == np.uint8
    assert s.image_label == 1 and s.index == 1 and s.scale == 1.0 and s.orig_size == (40, 60)
    np.testing.assert_array_equal(s.boxes, [[0, 2, 60, 12]])
    assert s.labels.dtype == np.int64 and s.labels.tolist() == [1]


def test_the_builtin_xml_writer_reads_back(tmp_path):
    boxes = np.array([[0, 0, 5, 7], [10, 3, 64, 48]], np.float32)
    (tmp_path / "a.xml").write_text(ilsvrc_xml("val", "a", (48, 64), "ring", boxes))
    size, b, labels, dropped = read_ilsvrc_xml(tmp_path / "a.xml", {"ring": 4})
    assert size == (48, 64) and dropped == 0 and labels == [4, 4]
    np.testing.assert_array_equal(b, boxes)


# ----------------------------------------------------------------------------- bad input
def test_missing_split_folder_says_where_and_how(tmp_path):
    with pytest.raises(DatasetNotFoundError) as e:
        split(tmp_path / "nowhere", "train")
    assert isinstance(e.value, DatasetError)
    msg = str(e.value)
    assert str(tmp_path / "nowhere" / "train") in msg and "ILSVRC2012_bbox_train_v2" in msg
    assert "built-in" in msg
    (tmp_path / "r" / "train" / A).mkdir(parents=True)
    with pytest.raises(DatasetNotFoundError, match="bbox"):  # images but no bbox folder
        split(tmp_path / "r", "train")


def test_missing_xml_is_an_error_or_counted(ilsvrc, caplog):
    with pytest.raises(DatasetError, match=f"{A}_2.xml.*not found"):
        split(ilsvrc, "train", missing_boxes="error")
    with caplog.at_level(logging.INFO):
        ds = split(ilsvrc, "train", missing_boxes="skip")
    assert ds.num_images_without_boxes == 1 and "1 of 3 images without boxes" in caplog.text
    with pytest.raises(ValueError, match="missing_boxes"):
        split(ilsvrc, "train", missing_boxes="ignore")


BAD_XML = {
    "not_xml": (dict(raw="<annotation><size>"), "not valid XML"),
    "no_size": (dict(objects=[(A, 1, 1, 5, 5)], size=None), "no <size>"),
    "no_name": (dict(raw="<annotation><size><width>60</width><height>40</height></size>"
                         "<object><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>5</xmax>"
                         "<ymax>5</ymax></bndbox></object></annotation>"), "no <name>"),
    "no_bndbox": (dict(raw=f"<annotation><size><width>60</width><height>40</height></size>"
                           f"<object><name>{A}</name></object></annotation>"), "no <bndbox>"),
    "not_number": (dict(objects=[(A, "1O", 1, 5, 5)]), "<xmin>1O</xmin>, not a number"),
    "inverted": (dict(objects=[(A, 9, 1, 5, 5)]), "xmax < xmin"),
    "outside": (dict(objects=[(A, 1, 1, 62, 5)]), "outside the 60x40 image"),
    "unknown_class": (dict(objects=[("n99999999", 1, 1, 5, 5)]), "unknown class 'n99999999'"),
}


@pytest.mark.parametrize("case", sorted(BAD_XML))
def test_bad_xml_raises_naming_the_file(ilsvrc, case):
    kwargs, message = BAD_XML[case]
    xml = ilsvrc / "bbox" / "train" / A / f"{A}_1.xml"
    _xml(xml, **{"objects": [], **kwargs})
    with pytest.raises(DatasetError) as e:
        split(ilsvrc, "train")
    assert str(xml) in str(e.value) and message in str(e.value)


def test_box_within_one_pixel_outside_is_clipped(tmp_path):
    xml = tmp_path / "a.xml"
    _xml(xml, [(A, 0, 0, 61, 41)])
    size, boxes, _, _ = read_ilsvrc_xml(xml, {A: 0})
    np.testing.assert_array_equal(boxes, [[0, 0, 60, 40]])
    _xml(xml, [(A, -1, 0, 5, 5)])   # x1 = -2: more than 1 px out
    with pytest.raises(DatasetError, match="outside"):
        read_ilsvrc_xml(xml, {A: 0})


def test_unannotated_class_is_an_error_unless_skipped(ilsvrc, caplog):
    _img(ilsvrc / "train" / C / f"{C}_1.JPEG")
    with pytest.raises(DatasetError) as e:
        split(ilsvrc, "train")
    assert str(ilsvrc / "train" / C) in str(e.value) and "skip_unannotated_classes" in str(e.value)
    with caplog.at_level(logging.INFO):
        ds = split(ilsvrc, "train", skip_unannotated_classes=True)
    assert ds.class_names == [A, B, C] and len(ds) == 2 and ds.skipped_classes == [C]
    assert f"1 classes have no boxes and are left out: {C}" in caplog.text


def test_folder_outside_the_class_list_and_empty_class(ilsvrc):
    with pytest.raises(DatasetError, match=f"{B}.*not one of the 1 classes"):
        split(ilsvrc, "train", class_names=[A])
    (ilsvrc / "train" / C).mkdir()
    with pytest.raises(DatasetError, match="holds no images"):
        split(ilsvrc, "train")


def test_size_mismatch_names_both_files_or_is_skipped(ilsvrc):
    _img(ilsvrc / "train" / A / f"{A}_1.JPEG", size=(50, 40))
    ds = split(ilsvrc, "train")
    with pytest.raises(DatasetError) as e:
        ds[0]
    assert f"{A}_1.JPEG" in str(e.value) and f"{A}_1.xml" in str(e.value)
    assert "50x40" in str(e.value) and "60x40" in str(e.value)
    ds = split(ilsvrc, "train", skip_bad_images=True)
    s = ds[0]
    assert s.index == 1 and s.image_label == 1 and ds.num_skipped_images == 1


def test_unreadable_image_is_replaced_by_the_next_and_counted(ilsvrc):
    (ilsvrc / "train" / B / f"{B}_7.png").write_bytes(b"\x89PNG broken")
    ds = split(ilsvrc, "train", skip_bad_images=True)
    assert ds[1].index == 0 and ds.num_skipped_images == 1
    with pytest.raises(DatasetError, match=f"{B}_7.png"):
        split(ilsvrc, "train")[1]


# ----------------------------------------------------------------------------- built-in set
def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_builtin_is_deterministic(tmp_path, monkeypatch):
    monkeypatch.setenv("DETRES_CACHE", str(tmp_path / "cache"))
    a = ensure_builtin_loc(**SMALL)
    assert a.parent == tmp_path / "cache"
    b = ensure_builtin_loc(tmp_path / "other", **SMALL)
    fa, fb = _files(a), _files(b)
    assert a.name == b.name and fa.keys() == fb.keys()
    xmls = [k for k in fa if k.endswith(".xml")]
    assert len(xmls) == 10 * (4 + 2) and all(fa[k] == fb[k] for k in xmls)
    jpegs = [k for k in fa if k.endswith(".JPEG")]
    assert len(jpegs) == 10 * (4 + 2) and all(fa[k] == fb[k] for k in jpegs[::7])
    assert ensure_builtin_loc(**SMALL) == a  # reused from the cache
    c = ensure_builtin_loc(**{**SMALL, "seed": 1})
    assert c != a and _files(c)[jpegs[0]] != fa[jpegs[0]]


def test_builtin_layout_round_trip_and_promised_sizes(tmp_path):
    root = ensure_builtin_loc(tmp_path, num_train_per_class=6, num_val_per_class=3,
                              image_size=96)
    assert sorted(p.name for p in (root / "train").iterdir()) == sorted(LOC_CLASSES)
    assert sorted(p.name for p in (root / "bbox" / "train").iterdir()) == sorted(LOC_CLASSES)
    assert all(p.suffix == ".xml" for p in (root / "bbox" / "val").iterdir())  # flat
    assert loc_split_dirs(root, "val") == (root / "val", root / "bbox" / "val")
    train = split(root, "train", missing_boxes="error")
    val = split(root, "val", class_names=train.class_names, missing_boxes="error")
    assert train.class_names == sorted(LOC_CLASSES) and len(train) == 60 and len(val) == 30
    assert set(train.image_labels.tolist()) == set(range(10)) == set(val.image_labels.tolist())
    counts = np.diff(train.index.offsets)
    assert counts.min() >= 1 and counts.max() <= 3 and (counts == 1).mean() >= 0.5
    for ds in (train, val):
        # every box is labelled with its image's class
        per_box_class = np.repeat(ds.image_labels, np.diff(ds.index.offsets))
        np.testing.assert_array_equal(ds.index.labels, per_box_class)
        for i in range(0, len(ds), 3):
            s = ds[i]
            h, w = s.orig_size
            assert max(h, w) == 96 and 0.74 * 96 <= min(h, w) <= 96
            b = s.boxes
            assert (b[:, :2] >= 0).all() and (b[:, 2] <= w).all() and (b[:, 3] <= h).all()
            sides = np.stack([b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]], 1) / min(h, w)
            assert (sides.max(1) >= 0.3).all() and (sides.max(1) <= 0.9).all(), sides
            assert (sides.min(1) >= 0.15).all(), sides
    xml = (root / "bbox" / "train" / "heart" / "heart_1.xml").read_text()
    for tag in ("<folder>heart</folder>", "<filename>heart_1</filename>", "<database>",
                "<depth>3</depth>", "<segmented>0</segmented>", "<pose>Unspecified</pose>",
                "<truncated>0</truncated>", "<difficult>0</difficult>", "<bndbox>"):
        assert tag in xml


def test_builtin_boxes_round_trip_exactly(tmp_path):
    from detres.data.builtin_loc import render_loc_image
    root = ensure_builtin_loc(tmp_path, num_train_per_class=3, num_val_per_class=1,
                              image_size=64, seed=5)
    ds = split(root, "train", missing_boxes="error")
    for i in range(len(ds)):
        label, k = int(ds.image_labels[i]), int(ds.path(i).stem.rsplit("_", 1)[1]) - 1
        rng = np.random.default_rng([5, 0, LOC_CLASSES.index(ds.class_names[label]), k])
        rng.uniform()  # the train_box_fraction draw
        _, boxes = render_loc_image(rng, LOC_CLASSES.index(ds.class_names[label]), 64)
        np.testing.assert_array_equal(ds.get_annotations(i)["boxes"], boxes)  # whole pixels: exact


def test_builtin_partial_train_boxes_are_skipped_and_counted(tmp_path):
    root = ensure_builtin_loc(tmp_path, num_train_per_class=8, num_val_per_class=1,
                              image_size=48, train_box_fraction=0.4)
    ds = split(root, "train")
    assert 10 <= len(ds) < 80 and ds.num_images_without_boxes == 80 - len(ds)
    assert set(ds.image_labels.tolist()) == set(range(10))  # the first image of each has boxes
    with pytest.raises(DatasetError, match="not found"):
        split(root, "train", missing_boxes="error")


# ----------------------------------------------------------------------------- transforms
def _rect_image(h: int = 120, w: int = 160, box=(30, 20, 110, 90)) -> tuple[np.ndarray, np.ndarray]:
    image = np.zeros((h, w, 3), np.uint8)
    x1, y1, x2, y2 = box
    image[y1:y2, x1:x2] = 255
    return image, np.array([box], np.float32)


def _drawn_box(image: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(image[:, :, 0] > 127)
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float32)


def test_train_crop_keeps_boxes_on_the_drawn_pixels():
    t = LocTrainTransform(scale_range=(100, 140), crop_size=96, flip_prob=0.5, seed=0)
    image, boxes = _rect_image()
    kept = 0
    for _ in range(30):
        out, b, labels, scale = t(image, boxes, np.array([7]))
        assert out.shape == (96, 96, 3) and out.dtype == np.uint8
        assert 100 / 120 <= scale <= 140 / 120
        if len(b):
            kept += 1
            assert labels.tolist() == [7]
            np.testing.assert_allclose(b[0], _drawn_box(out), atol=1.5)
            assert (b >= 0).all() and (b <= 96).all()
        else:
            assert labels.shape == (0,)
    assert kept >= 20


def test_train_transform_pads_small_images_and_is_seeded():
    image, boxes = _rect_image(40, 30, (5, 5, 25, 35))
    t = LocTrainTransform(scale_range=(30, 30), crop_size=64, flip_prob=0.0, seed=1)
    out, b, labels, scale = t(image, boxes, np.array([2]))
    assert out.shape == (64, 64, 3) and scale == 1.0
    assert (out[40:] == 0).all() and (out[:, 30:] == 0).all()
    np.testing.assert_array_equal(b, [[5, 5, 25, 35]])
    t1, t2 = (LocTrainTransform((40, 80), 32, seed=3) for _ in range(2))
    for _ in range(5):
        a, c = t1(image, boxes, np.array([1])), t2(image, boxes, np.array([1]))
        np.testing.assert_array_equal(a.image, c.image)
        np.testing.assert_array_equal(a.boxes, c.boxes)


def test_flip_mirrors_boxes():
    image, boxes = _rect_image(64, 64, (4, 10, 20, 50))
    kw = dict(scale_range=(64, 64), crop_size=64, seed=0)
    plain = LocTrainTransform(flip_prob=0.0, **kw)(image, boxes, np.array([0]))
    flipped = LocTrainTransform(flip_prob=1.0, **kw)(image, boxes, np.array([0]))
    np.testing.assert_array_equal(plain.boxes, [[4, 10, 20, 50]])
    np.testing.assert_array_equal(flipped.boxes, [[44, 10, 60, 50]])
    np.testing.assert_array_equal(flipped.image, plain.image[:, ::-1])
    np.testing.assert_array_equal(_drawn_box(flipped.image), flipped.boxes[0])


def test_boxes_mostly_outside_the_crop_are_dropped():
    image = np.zeros((100, 100, 3), np.uint8)
    # a 100x100 image cropped to 50x50: the big box always keeps >= 25 %...
    boxes = np.array([[0, 0, 100, 100], [0, 0, 50, 50], [60, 60, 61, 61]], np.float32)
    t = LocTrainTransform((100, 100), 50, flip_prob=0.0, seed=0)
    seen_drop = False
    for _ in range(20):
        out, b, labels, _ = t(image, boxes, np.array([0, 1, 2]))
        assert len(b) == len(labels)
        # box 0 keeps 25 % of its area (< 30 %): always dropped; box 1 only when mostly visible
        assert 0 not in labels.tolist()
        if 1 in labels.tolist():
            r = b[labels.tolist().index(1)]
            assert (r[2] - r[0]) * (r[3] - r[1]) >= 0.3 * 2500
        seen_drop |= 1 not in labels.tolist()
    assert seen_drop


# ----------------------------------------------------------------------------- collate
def test_collate_pads_to_a_multiple_of_32(ilsvrc):
    ds = split(ilsvrc, "train", transform=doubled)
    loader = torch.utils.data.DataLoader(ds, batch_size=2, collate_fn=collate_rpn)
    images, targets = next(iter(loader))
    assert images.tensor.shape == (2, 3, 96, 128) and images.tensor.dtype == torch.float32
    assert images.sizes == [(80, 120), (80, 120)]
    assert (images.tensor[:, :, 80:] == 0).all() and (images.tensor[:, :, :, 120:] == 0).all()
    assert images.tensor[0, :, :80, :120].max() > 0
    t = targets[1]
    assert t.image_id == 1 and t.scale == 2.0 and t.orig_size == (40, 60)
    assert t.boxes.dtype == torch.float32 and t.labels.tolist() == [1]
    assert len(targets[0].boxes) == 2
    crops, image_labels = collate_classifier([ds[0], ds[1]])
    assert crops.shape == (2, 3, 80, 120) and image_labels.tolist() == [0, 1]


def test_with_transform_shares_the_index_and_leaves_the_original_alone(ilsvrc):
    ds = split(ilsvrc, "train")
    scaled = ds.with_transform(doubled)
    assert scaled.index is ds.index and scaled.skipper is ds.skipper
    assert ds[0].scale == 1.0 and ds[0].image.shape == (40, 60, 3)
    s = scaled[0]         # the transform applied
    assert s.image.shape == (80, 120, 3) and s.scale == 2.0 and s.orig_size == (40, 60)
    np.testing.assert_array_equal(s.boxes, [[0, 0, 20, 40], [8, 10, 120, 80]])
