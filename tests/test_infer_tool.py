"""tools/infer.py's files: drawings mirror the input's relative path (no two images share one),
an unreadable image is skipped and reported, results carry file_name, nothing lands outside
--out. The detector is a confident random one (the trained end-to-end run is in
tests/test_train_det_tool.py)."""
import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import load_tool, narrow_detector

from detres.data.io import DatasetError
from detres.predictor import Predictor

infer = load_tool("infer")


@pytest.fixture(autouse=True)
def predictor(monkeypatch):
    model = narrow_detector(num_classes=3, seed=0)
    torch.nn.init.normal_(model.roi_head.cls_score.weight, std=1.0)
    with torch.no_grad():
        model.roi_head.cls_score.bias.zero_()[-1] = -20.0  # background never wins
    p = Predictor(model, ["a", "b", "c"], min_size=64, max_size=96, category_ids=[7, 8, 9])
    monkeypatch.setattr(infer, "make_predictor", lambda args: p)


def _image(path, h, w, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(path)


def _infer(*inputs, out):
    return infer.main([*map(str, inputs), "--weights", "unused.pth", "--out", str(out),
                       "--min-score", "0.0"])


def test_same_stem_in_different_folders_gets_distinct_drawings(tmp_path):
    src = tmp_path / "in"
    sizes = {"1.png": (48, 64), "a/1.jpg": (64, 80), "b/1.jpg": (72, 56)}
    for k, (name, (h, w)) in enumerate(sizes.items()):
        _image(src / name, h, w, seed=k)
    results = _infer(src, out=tmp_path / "out")
    for name, (h, w) in sizes.items():   # each drawing is its own image (sizes differ)
        assert Image.open(tmp_path / "out" / f"{name}.png").size == (w, h)
    assert sorted(p.relative_to(tmp_path / "out").as_posix()
                  for p in (tmp_path / "out").rglob("*.png")) == sorted(f"{n}.png" for n in sizes)
    assert json.loads((tmp_path / "out" / "results.json").read_text()) == results
    ids = {(r["image_id"], r["file_name"]) for r in results}
    assert ids == {(k, str(src / n)) for k, n in enumerate(sorted(sizes))}


def test_unreadable_image_is_skipped_and_reported(tmp_path, caplog):
    src, out = tmp_path / "in", tmp_path / "out"
    for k in range(3):
        _image(src / f"{k}.png", 64, 64, seed=k)
    (src / "1.png").write_bytes((src / "1.png").read_bytes()[:200])   # truncated
    with caplog.at_level(logging.WARNING):
        results = _infer(src, out=out)
    assert sorted(p.name for p in out.glob("*.png")) == ["0.png.png", "2.png.png"]
    assert {(r["image_id"], r["file_name"]) for r in results} == {(0, str(src / "0.png")),
                                                                  (2, str(src / "2.png"))}
    assert json.loads((out / "results.json").read_text()) == results
    assert "1 of 3 images could not be read" in caplog.text and str(src / "1.png") in caplog.text
    (src / "0.png").write_bytes(b"")
    (src / "2.png").write_bytes(b"junk")
    with pytest.raises(DatasetError, match="none of the 3 images could be read"):
        _infer(src, out=tmp_path / "out2")


def test_two_inputs_with_one_name_are_refused_before_any_work(tmp_path):
    _image(tmp_path / "x" / "1.jpg", 32, 32)
    _image(tmp_path / "y" / "1.jpg", 32, 32)
    with pytest.raises(DatasetError, match=r"x/1\.jpg and .*y/1\.jpg would both be drawn"):
        _infer(tmp_path / "x" / "1.jpg", tmp_path / "y" / "1.jpg", out=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_nothing_is_written_outside_out(tmp_path):
    src, out, elsewhere = tmp_path / "in", tmp_path / "in" / "out", tmp_path / "elsewhere"
    _image(src / "sub" / "1.png", 64, 64)
    _image(src / "a" / "2.png", 64, 64)
    elsewhere.mkdir()
    out.mkdir()
    (out / "a").symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(DatasetError, match=r"a/2\.png\.png would be written outside --out"):
        _infer(src, out=out)
    assert not list(elsewhere.iterdir())
    (out / "a").unlink()
    before = set(tmp_path.rglob("*"))
    _infer(src / "sub" / "..", out=out)     # '..' in the input; out lies inside the input
    new = set(tmp_path.rglob("*")) - before
    assert new and all(p.resolve().is_relative_to(out.resolve()) for p in new)
    results = _infer(src, out=out)          # a second run does not read the first's drawings
    assert {r["file_name"] for r in results} == {str(src / "a/2.png"), str(src / "sub/1.png")}
