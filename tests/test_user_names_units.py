"""One name and one unit across the tools: plot_curves takes a metric by the name
train.best_metric gives it; analyze_det prints and draws percent, as analysis.json and
eval/metrics.json hold; the confusion matrix keeps only classes that occur and stays a
readable size; a video comes out as DIR/<stem>.mp4, in H.264 when OpenCV can write it."""
import json
import logging
import re

import numpy as np
import pytest
from PIL import Image

from helpers import load_tool, narrow_detector

from detres import video, visualize
from detres.data.images import DatasetError
from detres.engine.best import BestTracker, flatten_metrics
from detres.engine.logging import MetricsWriter
from detres.evaluation.analysis import Analysis
from detres.tasks.detection.predictor import Predictor

plot_curves = load_tool("plot_curves")
analyze_det = load_tool("analyze_det")
infer = load_tool("infer")
pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------- metric names
def test_plot_curves_takes_the_name_best_metric_uses(tmp_path):
    # what the Trainer does with each detection evaluation (engine/loop.py, _evaluate): the
    # results go to metrics.jsonl as they are and to the best tracker named as in
    # eval/metrics.json
    writer = MetricsWriter(tmp_path / "run", tensorboard=False)
    tracker = BestTracker("bbox/AP", prefix="bbox")
    writer.write({"phase": "train", "iteration": 2, "loss": 1.5})
    for iteration, ap in ((4, 10.0), (8, 30.0)):
        results = {"AP": ap, "AP50": 2 * ap, "num_images": 6}
        writer.write({"phase": "eval", "iteration": iteration, **results})
        tracker.update(results, iteration)
    writer.close()
    name = tracker.state_dict()["metric"]
    out = plot_curves.main([str(tmp_path / "run"), "--metric", name,
                            "--out", str(tmp_path / "ap.png")])
    assert out.is_file()
    records = plot_curves.read_metrics(tmp_path / "run")
    (tx, _), (sx, sy) = plot_curves.curves(records, name, smooth=1)
    assert len(tx) == 0 and sx.tolist() == [4.0, 8.0] and sy.tolist() == [10.0, 30.0]
    # every name best_metric accepts for these results, plot_curves accepts too
    for metric in flatten_metrics(results, "bbox"):
        assert plot_curves.curves(records, metric, smooth=1)[1][1][-1] == results[
            metric.split("/")[1]]
    assert plot_curves.curves(records, "AP", smooth=1)[1][1].tolist() == [10.0, 30.0]


def test_plot_curves_lists_the_names_on_an_unknown_one(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    records = [{"phase": "train", "iteration": 2, "loss": 1.0, "lr": 0.1},
               {"phase": "eval", "iteration": 2, "AP": 5.0, "AP50": 9.0}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    with pytest.raises(ValueError) as e:
        plot_curves.main([str(run), "--metric", "bbox/APx", "--out", str(tmp_path / "a.png")])
    message = str(e.value)
    assert "\n" not in message and "no 'bbox/APx' values" in message
    for name in ("loss", "lr", "AP", "AP50"):
        assert re.search(rf"\b{name}\b", message.split("it has:")[1])
    with pytest.raises(ValueError, match="no 'segm/AP' values"):   # only bbox stands for AP
        plot_curves.main([str(run), "--metric", "segm/AP", "--out", str(tmp_path / "b.png")])


# ----------------------------------------------------------------------------- percent
CATS = [{"id": 1, "name": "cat", "supercategory": "animal"},
        {"id": 2, "name": "dog", "supercategory": "animal"},
        {"id": 3, "name": "car", "supercategory": "vehicle"}]
BOX = [10.0, 10.0, 40.0, 40.0]


def _gt(anns, categories=CATS, num_images=6):
    images = [{"id": i, "width": 100, "height": 100, "file_name": f"{i}.png"}
              for i in range(1, num_images + 1)]
    return {"images": images, "categories": categories,
            "annotations": [{"image_id": i, "category_id": c, "bbox": list(BOX), "iscrowd": 0}
                            for i, c in anns]}


def _dt(dets):
    return [{"image_id": i, "category_id": c, "bbox": list(BOX), "score": s} for i, c, s in dets]


def test_analyze_det_prints_and_draws_percent_as_analysis_json_holds(tmp_path, capsys,
                                                                       monkeypatch):
    # dog: found (0.90) below a dog on a cat (0.95), on a car (0.97) and on nothing (0.93),
    # so its AP after forgiving, in turn: 25, 25, 25, 33.3, 50, 100, 100 (tests/test_analysis)
    (tmp_path / "gt.json").write_text(json.dumps(_gt([(1, 2), (2, 1), (3, 3), (5, 1)])))
    (tmp_path / "dt.json").write_text(json.dumps(
        _dt([(1, 2, 0.90), (2, 2, 0.95), (3, 2, 0.97), (4, 2, 0.93)])))
    legends = {}
    save = visualize._save

    def keep_legends(fig, path):
        legends[path.name] = [t.get_text() for ax in fig.axes if ax.get_legend()
                              for t in ax.get_legend().get_texts()]
        return save(fig, path)
    monkeypatch.setattr(visualize, "_save", keep_legends)
    analyze_det.main(["--gt", str(tmp_path / "gt.json"), "--dt", str(tmp_path / "dt.json"),
                      "--out", str(tmp_path / "out")])
    printed = capsys.readouterr().out
    saved = json.loads((tmp_path / "out" / "analysis.json").read_text())["error_breakdown"]
    dog = saved["per_class"]["dog"]
    assert dog["AP"] == pytest.approx({"C75": 25, "C50": 25, "Loc": 25, "Sim": 100 / 3,
                                       "Oth": 50, "BG": 100, "FN": 100})
    assert dog["errors"]["background"] == pytest.approx(50.0)
    overall = saved["overall"]
    shown = dict(re.findall(r"(\w+) (-?\d+\.\d)\b", printed))
    for key, value in {**overall["AP"], **overall["errors"]}.items():
        assert shown[key] == f"{value:.1f}"
    assert shown["FN"] == "100.0"                       # percent, not 1.000
    in_legend = [float(re.match(r"\[(.+)\]", t).group(1))
                 for t in legends["error_breakdown.png"]]
    assert in_legend == pytest.approx(sorted(overall["AP"].values(), reverse=True), abs=0.05)
    assert max(in_legend) == 100.0


# ----------------------------------------------------------------------------- confusion matrix
def test_confusion_matrix_keeps_the_classes_that_occur_and_a_readable_size(tmp_path,
                                                                            monkeypatch):
    cats = [{"id": k + 1, "name": f"class{k:02d}", "supercategory": "x"} for k in range(80)]
    # classes 0..59: one object each, found; class 70: a detection on nothing; class 75: a
    # detection below the score threshold only; the other 19 classes never occur
    anns = [(k % 6 + 1, k + 1) for k in range(60)]
    dets = [(k % 6 + 1, k + 1, 0.9) for k in range(60)] + [(1, 71, 0.8), (2, 76, 0.1)]
    a = Analysis(_gt(anns, cats), _dt(dets))   # the class 70 one: its image's objects are taken
    confusion = a.confusion_matrix(iou_threshold=0.5, score_threshold=0.5)
    present = [f"class{k:02d}" for k in (*range(60), 70)]
    assert confusion["classes"] == [*present, "background"]
    matrix = np.array(confusion["matrix"])
    assert matrix.shape == (62, 62)
    assert (np.diag(matrix)[:60] == 1).all() and matrix[61, 60] == 1 and matrix.sum() == 61
    drawn, save = {}, visualize._save
    monkeypatch.setattr(visualize, "_save", lambda fig, path: drawn.setdefault(path.name, [
        t.get_text() for t in fig.axes[0].get_yticklabels()]) and save(fig, path))
    path = visualize.plot_confusion_matrix(confusion, tmp_path / "cm.png")
    assert drawn["cm.png"] == confusion["classes"]
    with Image.open(path) as im:
        assert max(im.size) <= 2000 and min(im.size) >= 62 * 12     # >= 12 px a cell
    every = {**confusion, "classes": [c["name"] for c in cats] + ["background"],
             "matrix": np.eye(81, dtype=int).tolist()}
    with Image.open(visualize.plot_confusion_matrix(every, tmp_path / "cm80.png")) as im:
        assert max(im.size) <= 2000
    small = Analysis(_gt([(1, 1)]), _dt([(1, 1, 0.9)])).confusion_matrix()
    assert small["classes"] == ["cat", "background"] and small["matrix"] == [[1, 0], [0, 0]]


# ----------------------------------------------------------------------------- video
@pytest.fixture
def predictor(monkeypatch):
    model = narrow_detector(num_classes=3, seed=0)
    p = Predictor(model, ["a", "b", "c"], min_size=64, max_size=96, category_ids=[7, 8, 9])
    monkeypatch.setattr(Predictor, "from_checkpoint", lambda *args, **kwargs: p)
    return p


def _write_video(path, count):
    import cv2
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 5.0, (64, 48))
    for k in range(count):
        writer.write(np.full((48, 64, 3), 40 * k, np.uint8))
    writer.release()


def _frames_and_codec(path):
    """The frames OpenCV reads back, and the sample entry of the MP4 file's video track (its
    stsd box names the codec: b"avc1" for H.264, b"mp4v" for MPEG-4 Part 2)."""
    import cv2
    capture = cv2.VideoCapture(str(path))
    frames = 0
    while capture.read()[0]:
        frames += 1
    capture.release()
    data = path.read_bytes()
    return frames, [code for code in ("avc1", "mp4v") if code.encode() in data]


@pytest.fixture
def fresh_codec_choice():
    video.video_fourcc.cache_clear()
    yield
    video.video_fourcc.cache_clear()


def test_video_is_named_after_its_stem_and_falls_back_to_mp4v_in_one_line(
        tmp_path, predictor, monkeypatch, caplog, fresh_codec_choice):
    monkeypatch.setattr(video, "_encodes", lambda cv2, code: code == "mp4v")   # no H.264
    _write_video(tmp_path / "clip.mp4", 3)
    _write_video(tmp_path / "walk.avi", 2)
    out = tmp_path / "out"
    with caplog.at_level(logging.INFO, logger="detres"):
        infer.main([str(tmp_path / "clip.mp4"), str(tmp_path / "walk.avi"),
                    "--weights", "unused.pth", "--out", str(out)])
    assert sorted(p.name for p in out.iterdir()) == ["clip.jsonl", "clip.mp4", "walk.jsonl",
                                                     "walk.mp4"]
    assert _frames_and_codec(out / "clip.mp4") == (3, ["mp4v"])
    assert _frames_and_codec(out / "walk.mp4") == (2, ["mp4v"])
    said = [r.getMessage() for r in caplog.records if "H.264" in r.getMessage()]
    assert len(said) == 1 and "\n" not in said[0] and "mp4v" in said[0]


def test_two_videos_with_one_stem_are_refused_before_any_work(tmp_path, predictor):
    _write_video(tmp_path / "clip.mp4", 1)
    _write_video(tmp_path / "clip.avi", 1)
    with pytest.raises(DatasetError, match=r"clip\.mp4 and .*clip\.avi would both be written "
                                           r"as .*clip\.mp4"):
        infer.main([str(tmp_path / "clip.mp4"), str(tmp_path / "clip.avi"),
                    "--weights", "unused.pth", "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_h264_is_chosen_when_opencv_writes_it_and_the_probe_is_quiet(
        monkeypatch, caplog, capfd, fresh_codec_choice):
    import cv2
    assert video._encodes(cv2, "mp4v") and not video._encodes(cv2, "XXXX")
    assert capfd.readouterr().err == ""        # the failed probe's FFmpeg lines are hidden
    monkeypatch.setattr(video, "_encodes", lambda cv2, code: code == "avc1")
    with caplog.at_level(logging.INFO, logger="detres"):
        assert video.video_fourcc() == "avc1"
    assert not caplog.records


def test_a_frame_size_the_chosen_codec_refuses_is_written_as_mp4v(tmp_path, monkeypatch, caplog):
    import cv2
    monkeypatch.setattr(video, "video_fourcc", lambda: "XXXX")    # opens for no size
    with caplog.at_level(logging.INFO, logger="detres"):
        writer = video._open_writer(cv2, tmp_path / "a.mp4", 5.0, (48, 64, 3))
    writer.write(np.zeros((48, 64, 3), np.uint8))
    writer.release()
    assert _frames_and_codec(tmp_path / "a.mp4") == (1, ["mp4v"])
    assert [r.getMessage() for r in caplog.records] == [
        f"{tmp_path / 'a.mp4'}: 64x48 frames cannot be written as XXXX; written as mp4v"]
