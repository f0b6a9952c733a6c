"""Built-in shapes set: byte-identical regeneration, promised statistics, cache behaviour."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from detres.data.builtin import (SHAPE_CLASSES, ensure_builtin_shapes, ensure_generated,
                                 render_shapes_image, shapes_split)
from detres.data.coco import COCODetection

SMALL = {"num_train": 12, "num_val": 4, "image_size": 96}


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_same_seed_gives_byte_identical_files(tmp_path):
    a = ensure_builtin_shapes(tmp_path / "a", seed=3, **SMALL)
    b = ensure_builtin_shapes(tmp_path / "b", seed=3, **SMALL)
    fa, fb = _files(a), _files(b)
    assert a.name == b.name and len(fa) == 12 + 4 + 3  # images, 2 JSON files, params.json
    assert fa == fb
    c = ensure_builtin_shapes(tmp_path / "a", seed=4, **SMALL)
    assert c != a and _files(c)["train/000001.jpg"] != fa["train/000001.jpg"]


def test_cache_is_reused_and_keyed_by_params(tmp_path, monkeypatch):
    monkeypatch.setenv("DETRES_CACHE", str(tmp_path / "cache"))
    a = ensure_builtin_shapes(**SMALL)
    assert a.parent == tmp_path / "cache"
    stamp = (a / "train" / "000001.jpg").stat().st_mtime_ns
    assert ensure_builtin_shapes(**SMALL) == a
    assert (a / "train" / "000001.jpg").stat().st_mtime_ns == stamp  # not regenerated
    assert ensure_builtin_shapes(**{**SMALL, "num_val": 5}) != a
    params = json.loads((a / "params.json").read_text())
    assert params["seed"] == 0 and params["num_train"] == 12 and "version" in params


def test_interrupted_generation_leaves_nothing(tmp_path):
    def generate(out: Path, **params):
        (out / "half.txt").write_text("half")
        raise KeyboardInterrupt  # as if killed mid-way

    with pytest.raises(KeyboardInterrupt):
        ensure_generated("toy", {"version": 1}, generate, tmp_path)
    assert list(tmp_path.iterdir()) == []
    folder = ensure_generated("toy", {"version": 1},
                              lambda out, **p: (out / "x.txt").write_text("ok"), tmp_path)
    assert (folder / "x.txt").read_text() == "ok" and len(list(tmp_path.iterdir())) == 1


def test_statistics_are_as_promised():
    size, counts, labels, sides, areas = 128, [], [], [], []
    for i in range(300):
        image, boxes, lab, masks = render_shapes_image(np.random.default_rng([0, 0, i]), size)
        assert image.shape == (size, size, 3) and image.dtype == np.uint8
        assert (boxes[:, :2] >= 0).all() and (boxes[:, 2:] <= size).all()
        for box, mask in zip(boxes, masks):  # the box is the tight box of the whole shape
            ys, xs = np.nonzero(mask)
            assert box.tolist() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
        counts.append(len(boxes))
        labels += lab.tolist()
        wh = boxes[:, 2:] - boxes[:, :2]
        sides += wh.min(1).tolist()
        areas += wh.prod(1).tolist()
    counts, areas = np.array(counts), np.array(areas)
    assert counts.min() == 1 and counts.max() == 8 and len(set(counts.tolist())) == 8
    assert set(labels) == set(range(len(SHAPE_CLASSES)))
    assert min(sides) >= 10 and np.mean(np.array(sides) >= 12) > 0.95
    small, large = np.mean(areas < 32 ** 2), np.mean(areas > 96 ** 2)
    assert 0.3 < small < 0.65 and 0.02 < large < 0.2 and small + large < 0.9


def test_generated_set_reads_as_coco(tmp_path):
    folder = ensure_builtin_shapes(tmp_path, **SMALL)
    ann, images = shapes_split(folder, "val")
    ds = COCODetection(ann, images)
    assert len(ds) == 4 and ds.class_names == list(SHAPE_CLASSES)
    assert ds.label_to_category_id == [1, 2, 3, 4, 5]
    image, targets = ds[0]
    assert tuple(image.shape) == (3, 96, 96) and 1 <= len(targets) <= 8
    data = json.loads(ann.read_text())
    assert all(a["area"] == a["bbox"][2] * a["bbox"][3] for a in data["annotations"])
