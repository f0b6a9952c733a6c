"""tools/infer.py's files: drawings mirror the input's relative path (no two images share one),
an unreadable image is skipped and reported, results carry file_name, nothing lands outside
--out; a video gives an annotated video and one JSON line per frame. The detector is a
confident random one (the trained end-to-end run is in tests/test_train_det_tool.py)."""
import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import load_tool, narrow_detector

from detres.data.images import DatasetError
from detres.tasks.detection.predictor import Predictor

infer = load_tool("infer")
pytestmark = pytest.mark.usefixtures("one_thread")   # tiny models: a second thread only waits


@pytest.fixture(autouse=True)
def predictor(monkeypatch):
    model = narrow_detector(num_classes=3, seed=0)
    torch.nn.init.normal_(model.roi_head.cls_score.weight, std=1.0)
    with torch.no_grad():
        model.roi_head.cls_score.bias.zero_()[-1] = -20.0  # background never wins
    p = Predictor(model, ["a", "b", "c"], min_size=64, max_size=96, category_ids=[7, 8, 9])
    monkeypatch.setattr(Predictor, "from_checkpoint", lambda *args, **kwargs: p)
    return p


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
    with pytest.raises(DatasetError, match=r"x/1\.jpg and .*y/1\.jpg would both be written"):
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


# ----------------------------------------------------------------------------- video
def _write_video(path, frames, fps=5.0):
    import cv2
    h, w = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (w, h))
    for rgb in frames:
        writer.write(np.ascontiguousarray(rgb[:, :, ::-1]))
    writer.release()


def _read_video(path):
    import cv2
    capture, frames = cv2.VideoCapture(str(path)), []
    while True:
        ok, bgr = capture.read()
        if not ok:
            break
        frames.append(np.ascontiguousarray(bgr[:, :, ::-1]))
    fps = capture.get(cv2.CAP_PROP_FPS)
    capture.release()
    return frames, fps


def test_video_gives_an_annotated_video_and_one_json_line_per_frame(tmp_path, capsys,
                                                                    predictor):
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(5)]
    _write_video(tmp_path / "clip.mp4", frames)
    out = tmp_path / "out"
    infer.main([str(tmp_path / "clip.mp4"), "--weights", "unused.pth", "--out", str(out),
                "--min-score", "0.0", "--batch-size", "2"])
    printed = capsys.readouterr().out
    assert "5 frames" in printed and "frames/s" in printed
    drawn, fps = _read_video(out / "clip.mp4")
    assert len(drawn) == 5 and drawn[0].shape == (64, 64, 3) and fps == pytest.approx(5.0)
    lines = [json.loads(line) for line in (out / "clip.jsonl").read_text().splitlines()]
    assert [r["frame"] for r in lines] == [0, 1, 2, 3, 4]
    assert [r["time"] for r in lines] == pytest.approx([0.0, 0.2, 0.4, 0.6, 0.8])
    # the oracle: the predictor on the decoded input frames, one at a time
    decoded, _ = _read_video(tmp_path / "clip.mp4")
    for line, frame in zip(lines, decoded):
        expected = predictor.to_coco_results(predictor(frame), line["frame"])
        assert len(line["detections"]) == len(expected) > 0
        for got, want in zip(line["detections"], expected):
            assert got["category_id"] == want["category_id"]
            assert got["class"] == "abc"[want["category_id"] - 7]
            assert got["bbox"] == pytest.approx(want["bbox"], abs=0.05)
            assert got["score"] == pytest.approx(want["score"], abs=1e-4)
    assert not (out / "results.json").exists()        # no image was given


def test_max_frames_and_unusable_sources(tmp_path):
    frames = [np.full((64, 64, 3), 30 * k, np.uint8) for k in range(4)]
    _write_video(tmp_path / "clip.avi", frames)
    infer.main([str(tmp_path / "clip.avi"), "--weights", "unused.pth", "--out",
                str(tmp_path / "out"), "--max-frames", "3"])
    assert len(_read_video(tmp_path / "out" / "clip.mp4")[0]) == 3
    assert len((tmp_path / "out" / "clip.jsonl").read_text().splitlines()) == 3
    (tmp_path / "bad.mp4").write_bytes(b"not a video")
    with pytest.raises(DatasetError, match=r"bad\.mp4: cannot be read as a video"):
        infer.main([str(tmp_path / "bad.mp4"), "--weights", "unused.pth", "--out",
                    str(tmp_path / "out2")])
    with pytest.raises(DatasetError, match="camera 63 could not be opened"):
        infer.main(["--webcam", "63", "--weights", "unused.pth", "--out", str(tmp_path / "o3")])


def test_missing_opencv_is_a_clear_error(tmp_path, monkeypatch):
    import sys
    frames = [np.zeros((64, 64, 3), np.uint8)]
    _write_video(tmp_path / "clip.mp4", frames)
    monkeypatch.setitem(sys.modules, "cv2", None)          # import cv2 now fails
    with pytest.raises(DatasetError, match="video input needs OpenCV.*pip install "
                                           "opencv-python-headless"):
        infer.main([str(tmp_path / "clip.mp4"), "--weights", "unused.pth", "--out",
                    str(tmp_path / "out")])
