"""Image decoding: every format to RGB uint8, EXIF orientation, clear errors on bad files."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from detres.data.coco import COCODetection
from detres.data.images import DatasetError, ImageDecodeError, read_image


def _gradient(h: int = 24, w: int = 32) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    return np.stack([xx * 7 % 256, yy * 9 % 256, (xx + yy) * 3 % 256], -1).astype(np.uint8)


@pytest.mark.parametrize("fmt,ext", [("PNG", "png"), ("BMP", "bmp"), ("WEBP", "webp"),
                                     ("JPEG", "jpg")])
def test_rgb_formats_decode_to_hwc_uint8(tmp_path, fmt, ext):
    rgb = _gradient()
    path = tmp_path / f"x.{ext}"
    Image.fromarray(rgb).save(path, format=fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    out = read_image(path)
    assert out.dtype == np.uint8 and out.shape == (24, 32, 3)
    if fmt != "JPEG":  # lossless formats round-trip exactly
        np.testing.assert_array_equal(out, rgb)


def test_grayscale_palette_rgba_16bit(tmp_path):
    gray = _gradient()[:, :, 0]
    Image.fromarray(gray, "L").save(tmp_path / "g.png")
    out = read_image(tmp_path / "g.png")
    assert out.shape == (24, 32, 3) and (out == gray[:, :, None]).all()

    Image.fromarray(_gradient()).convert("P").save(tmp_path / "p.png")
    assert read_image(tmp_path / "p.png").shape == (24, 32, 3)

    rgba = np.dstack([np.full((24, 32, 3), 200, np.uint8), np.full((24, 32), 0, np.uint8)])
    rgba[:, 16:, 3] = 255
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    out = read_image(tmp_path / "a.png")
    assert (out[:, :16] == 0).all() and (out[:, 16:] == 200).all()  # composited over black

    g16 = (np.arange(24 * 32, dtype=np.uint16).reshape(24, 32) * 80)
    Image.fromarray(g16).save(tmp_path / "g16.png")
    out = read_image(tmp_path / "g16.png")
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out[:, :, 0], (g16 >> 8).astype(np.uint8))


def test_exif_orientation_is_ignored(tmp_path):
    """Pixels as stored, as COCO's boxes are (README, Datasets)."""
    rgb = _gradient(20, 40)
    im = Image.fromarray(rgb)
    exif = im.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    im.save(tmp_path / "o.jpg", exif=exif, quality=95)
    out = read_image(tmp_path / "o.jpg")
    assert out.shape == (20, 40, 3)
    assert np.abs(out.astype(int) - rgb).mean() < 8


def test_bad_files_raise_naming_the_path(tmp_path):
    good = tmp_path / "good.jpg"
    Image.fromarray(_gradient(64, 64)).save(good, quality=90)
    data = good.read_bytes()
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "trunc.jpg").write_bytes(data[: len(data) // 2])
    (tmp_path / "junk.png").write_bytes(b"this is not an image at all")
    for name, words in [("missing.jpg", "not found"), ("empty.jpg", "empty"),
                        ("trunc.jpg", "truncated"), ("junk.png", "not a readable image")]:
        with pytest.raises(ImageDecodeError, match=words) as e:
            read_image(tmp_path / name)
        assert str(tmp_path / name) in str(e.value)
        assert isinstance(e.value, DatasetError) and isinstance(e.value, ValueError)


def _tiny_coco(tmp_path: Path, n: int = 4) -> Path:
    (tmp_path / "img").mkdir()
    images, anns = [], []
    for i in range(1, n + 1):
        Image.fromarray(_gradient(30, 40)).save(tmp_path / "img" / f"{i}.jpg")
        images.append({"id": i, "file_name": f"{i}.jpg", "width": 40, "height": 30})
        anns.append({"id": 10 + i, "image_id": i, "category_id": 1, "bbox": [2, 3, 10, 12],
                     "iscrowd": 0, "area": 120})
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps({"images": images, "annotations": anns,
                               "categories": [{"id": 1, "name": "thing"}]}))
    return ann


def test_size_mismatch_is_an_error_naming_file_and_id(tmp_path):
    ann = _tiny_coco(tmp_path)
    Image.fromarray(_gradient(31, 40)).save(tmp_path / "img" / "3.jpg")
    ds = COCODetection(ann, tmp_path / "img")
    ds[0]
    with pytest.raises(DatasetError, match=r"3\.jpg: image id 3 is 40x31 .* says 40x30"):
        ds[2]


def test_skip_bad_images_counts_and_reports(tmp_path, caplog):
    ann = _tiny_coco(tmp_path)
    (tmp_path / "img" / "2.jpg").write_bytes(b"")                      # found up front
    (tmp_path / "img" / "4.jpg").write_bytes(b"\xff\xd8\xff garbage")  # found when read
    with caplog.at_level(logging.WARNING):
        ds = COCODetection(ann, tmp_path / "img", skip_bad_images=True)
    assert ds.num_skipped_images == 1 and "2.jpg" in caplog.text
    ids = [ds[i][1].image_id for i in range(len(ds))]
    assert ids == [1, 3, 3, 1]  # a bad image is replaced by the next good one
    assert ds.num_skipped_images == 2
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert ds.report_skipped_images() == 2
    assert "skipped 2 of 4 images" in caplog.text and "4.jpg" in caplog.text
    with pytest.raises(ImageDecodeError, match="4.jpg"):
        COCODetection(ann, tmp_path / "img")[3]


def test_skip_without_substitution_gives_placeholder_with_own_id(tmp_path, caplog):
    from detres.structures import SkippedImageTargets
    ann = _tiny_coco(tmp_path)
    (tmp_path / "img" / "2.jpg").write_bytes(b"")                      # found up front
    (tmp_path / "img" / "4.jpg").write_bytes(b"\xff\xd8\xff garbage")  # found when read
    ds = COCODetection(ann, tmp_path / "img", skip_bad_images=True)
    ds.substitute_bad_images = False  # evaluation
    items = [ds[i] for i in range(len(ds))]
    assert [t.image_id for _, t in items] == [1, 2, 3, 4]
    assert [isinstance(t, SkippedImageTargets) for _, t in items] == [False, True, False, True]
    image, targets = items[3]
    assert tuple(image.shape) == (3, 30, 40) and int(image.max()) == 0 and len(targets) == 0
    assert targets.orig_size == (30, 40) and len(items[0][1]) == 1
    with caplog.at_level(logging.WARNING):
        assert ds.report_skipped_images() == 2
    assert "2.jpg" in caplog.text and "4.jpg" in caplog.text


def test_missing_images_are_counted_and_named_before_any_work(tmp_path, caplog):
    ann = _tiny_coco(tmp_path, n=6)
    for i in (2, 3, 5, 6):
        (tmp_path / "img" / f"{i}.jpg").unlink()
    with pytest.raises(DatasetError, match=r"4 of 6 image files are missing, e\.g\. "
                                           r".*img/2\.jpg \(image id 2\), .*img/3\.jpg \(image "
                                           r"id 3\), .*img/5\.jpg \(image id 5\) \.\.\.; check "
                                           r"the image folder \(.*img: data\.\*\.images") as e:
        COCODetection(ann, tmp_path / "img")
    assert str(ann) in str(e.value) and "6.jpg" not in str(e.value)
    with caplog.at_level(logging.WARNING):            # skipping goes on, and says how many
        ds = COCODetection(ann, tmp_path / "img", skip_bad_images=True)
    assert ds.num_skipped_images == 4 and "skipped 4 of 6 images" in caplog.text
