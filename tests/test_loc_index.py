"""The ILSVRC index at scale: files in the real layout and formatting (pretty-printed XMLs,
several objects, truncated ones, images without a box file), the index kept in a cache file
and rebuilt when its source changes, and malformed XMLs skipped and counted."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from helpers import write_jpeg

from detres.data import localization
from detres.data.images import DatasetError
from detres.data.localization import LocalizationDataset
from detres.tasks.localization.build import index_cache_dir
from detres.tasks.localization.config import LocDataConfig

A, B = "n01440764", "n01443537"


def ilsvrc_xml(path: Path, folder: str, size: tuple[int, int], objects: list[tuple]) -> None:
    """As in ILSVRC2012_bbox_*: tab-indented, filename without extension; objects are
    (name, truncated, xmin, ymin, xmax, ymax), 1-based inclusive."""
    objs = "".join(
        f"\t<object>\n\t\t<name>{n}</name>\n\t\t<pose>Unspecified</pose>\n"
        f"\t\t<truncated>{t}</truncated>\n\t\t<difficult>0</difficult>\n\t\t<bndbox>\n"
        f"\t\t\t<xmin>{x1}</xmin>\n\t\t\t<ymin>{y1}</ymin>\n\t\t\t<xmax>{x2}</xmax>\n"
        f"\t\t\t<ymax>{y2}</ymax>\n\t\t</bndbox>\n\t</object>\n"
        for n, t, x1, y1, x2, y2 in objects)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"<annotation>\n\t<folder>{folder}</folder>\n\t<filename>{path.stem}"
                    f"</filename>\n\t<source>\n\t\t<database>ILSVRC_2012</database>\n"
                    f"\t</source>\n\t<size>\n\t\t<width>{size[0]}</width>\n\t\t<height>"
                    f"{size[1]}</height>\n\t\t<depth>3</depth>\n\t</size>\n"
                    f"\t<segmented>0</segmented>\n{objs}</annotation>\n")


def jpeg(path: Path, size: tuple[int, int] = (50, 40)) -> None:
    write_jpeg(path, size, (10, 200, 30))


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "imagenet"
    jpeg(r / "train" / A / f"{A}_10026.JPEG")
    ilsvrc_xml(r / "bbox" / "train" / A / f"{A}_10026.xml", A, (50, 40),
               [(A, 0, 3, 4, 20, 30), (A, 1, 30, 1, 50, 40)])     # two fish, one truncated
    jpeg(r / "train" / A / f"{A}_10027.JPEG")                      # no box file
    jpeg(r / "train" / B / f"{B}_2.JPEG")
    ilsvrc_xml(r / "bbox" / "train" / B / f"{B}_2.xml", B, (50, 40), [(B, 0, 1, 1, 50, 40)])
    jpeg(r / "val" / A / "ILSVRC2012_val_00000293.JPEG")
    ilsvrc_xml(r / "bbox" / "val" / "ILSVRC2012_val_00000293.xml", "val", (50, 40),
               [(A, 0, 11, 12, 13, 14)])
    return r


def dataset(r: Path, split: str = "train", **kwargs) -> LocalizationDataset:
    return LocalizationDataset(r / split, r / "bbox" / split, **kwargs)


def test_real_layout_with_several_objects_truncation_and_missing_files(root):
    ds = dataset(root)
    assert len(ds) == 2 and ds.num_images_without_boxes == 1
    a = ds.get_annotations(0)
    np.testing.assert_array_equal(a["boxes"], [[2, 3, 20, 30], [29, 0, 50, 40]])
    np.testing.assert_array_equal(a["labels"], [0, 0])
    np.testing.assert_array_equal(ds.get_annotations(1)["boxes"], [[0, 0, 50, 40]])
    val = dataset(root, "val", class_names=ds.class_names, missing_boxes="error")
    np.testing.assert_array_equal(val.get_annotations(0)["boxes"], [[10, 11, 13, 14]])


def test_cache_is_read_back_without_parsing(root, tmp_path, monkeypatch):
    first = dataset(root, cache_dir=tmp_path / "cache")
    (cache,) = (tmp_path / "cache").glob("loc-train-*.npz")

    def no_parsing(*args, **kwargs):
        raise AssertionError("an unchanged split was parsed again")

    monkeypatch.setattr(localization, "read_pascal_xml", no_parsing)
    again = dataset(root, cache_dir=tmp_path / "cache")
    for key in ("paths", "sizes", "offsets", "boxes", "labels"):
        np.testing.assert_array_equal(getattr(again.index, key), getattr(first.index, key))
    np.testing.assert_array_equal(again.image_labels, first.image_labels)
    assert again.num_images_without_boxes == 1 and again[0].boxes.shape == (2, 4)
    assert cache.stat().st_size < 4096


def test_cache_is_rebuilt_when_an_xml_changes(root, tmp_path):
    dataset(root, cache_dir=tmp_path / "cache")
    xml = root / "bbox" / "train" / B / f"{B}_2.xml"
    ilsvrc_xml(xml, B, (50, 40), [(B, 0, 6, 1, 50, 40)])          # same length, new xmin
    st = xml.stat()
    os.utime(xml, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))    # as a later edit would
    changed = dataset(root, cache_dir=tmp_path / "cache")
    np.testing.assert_array_equal(changed.get_annotations(1)["boxes"], [[5, 0, 50, 40]])
    # an XML added for the image that had none is found too
    ilsvrc_xml(root / "bbox" / "train" / A / f"{A}_10027.xml", A, (50, 40),
               [(A, 0, 1, 1, 9, 9)])
    assert len(dataset(root, cache_dir=tmp_path / "cache")) == 3
    # and other options are another index
    assert len(dataset(root, cache_dir=tmp_path / "cache", class_names=[A, B, "n0"])) == 3


def test_unreadable_cache_is_rebuilt(root, tmp_path, caplog):
    dataset(root, cache_dir=tmp_path / "cache")
    (cache,) = (tmp_path / "cache").glob("*.npz")
    cache.write_bytes(b"not a numpy file")
    assert len(dataset(root, cache_dir=tmp_path / "cache")) == 2
    assert "unreadable index cache" in caplog.text


@pytest.mark.parametrize("text", ["<annotation><size><width>50", "<annotation><size><width>50"
                                  "</width><height>40</height></size><object><name>n01440764"
                                  "</name><bndbox><xmin>a</xmin></bndbox></object></annotation>"])
def test_malformed_xml_is_skipped_and_counted(root, tmp_path, text, caplog):
    bad = root / "bbox" / "train" / A / f"{A}_10026.xml"
    bad.write_text(text)
    ilsvrc_xml(root / "bbox" / "train" / A / f"{A}_10027.xml", A, (50, 40),
               [(A, 0, 1, 1, 9, 9)])                       # the class keeps one good file
    with pytest.raises(DatasetError, match=f"{bad.name}.*bad_annotations: skip"):
        dataset(root)
    ds = dataset(root, bad_annotations="skip", cache_dir=tmp_path / "cache")
    assert len(ds) == 2 and ds.bad_annotation_files == [str(bad)]
    assert [ds.path(i).name for i in range(2)] == [f"{A}_10027.JPEG", f"{B}_2.JPEG"]
    assert "1 malformed bounding-box files skipped" in caplog.text
    # the count survives the cache
    assert dataset(root, bad_annotations="skip",
                   cache_dir=tmp_path / "cache").bad_annotation_files == [str(bad)]


def test_index_cache_sits_beside_the_run_folder(tmp_path):
    assert index_cache_dir(LocDataConfig(), tmp_path / "out" / "run") == \
        (tmp_path / "out" / "loc_index_cache").resolve()
    assert index_cache_dir(LocDataConfig(index_cache=None), tmp_path) is None
    assert index_cache_dir(LocDataConfig(index_cache=str(tmp_path / "c")), "x") == tmp_path / "c"
