"""tools/train_loc.py and tools/eval_loc.py end to end on a tiny built-in localization set."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import load_tool, run_tool_script

from detres.config import ConfigError
from detres.data.images import read_image
from detres.data.classification import DatasetNotFoundError

ROOT = Path(__file__).resolve().parents[1]
eval_loc = load_tool("eval_loc")
train_loc = load_tool("train_loc")


ERRORS = ("gt_cls_loc_err", "top1_loc_err", "top5_loc_err", "top1_cls_err", "top5_cls_err")


def tiny(output_dir: Path, *extra: str) -> list[str]:
    return ["data.builtin.num_train_per_class=3", "data.builtin.num_val_per_class=2",
            "data.builtin.image_size=64", "data.scale_range=[64,64]", "data.crop_size=64",
            "classifier.test_size=64", "test.scales=[64]",
            "classifier.max_iter=3", "classifier.solver.ims_per_batch=8",
            "rpn.max_iter=3", "rpn.solver.ims_per_batch=4",
            "rcnn.max_iter=3", "rcnn.solver.ims_per_batch=4", "rcnn.input_size=32",
            "rcnn.proposals_per_class=4", "rcnn.rois_per_image=4",
            "train.num_workers=0", "train.log_period=1", "train.checkpoint_period=2",
            f"train.output_dir={output_dir}", *extra]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    mp = pytest.MonkeyPatch()
    mp.setenv("DETRES_CACHE", str(cache))
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("run")
    metrics = train_loc.main(tiny(out))
    yield out, metrics
    mp.undo()


def test_run_writes_every_output(trained):
    out, metrics = trained
    for name in ("config.yaml", "env.json", "log.txt", "model_final.pth", "eval/metrics.json",
                 "eval/predictions.json", "classifier/model_final.pth", "rpn/model_final.pth",
                 "rcnn/model_final.pth", "rcnn/proposals.pth", "rpn/metrics.jsonl"):
        assert (out / name).is_file(), name
    # what a later train.overwrite may remove: the stages and this task's own files
    run = json.loads((out / "env.json").read_text())["run"]
    assert run["stages"] == ["classifier", "rpn", "rcnn"]
    assert run["records"] == ["rcnn/proposals.pth", "rcnn/proposals.rank[0-9]*.npy"]
    stored = json.loads((out / "eval" / "metrics.json").read_text())
    assert set(stored) == {"RPN", "RPN+R-CNN"} and stored == metrics
    for method in stored.values():
        assert set(method) == set(ERRORS)
        assert all(0.0 <= v <= 100.0 for v in method.values())
    # the classifier's guesses are the same for both methods
    assert stored["RPN"]["top5_cls_err"] == stored["RPN+R-CNN"]["top5_cls_err"]
    preds = json.loads((out / "eval" / "predictions.json").read_text())
    assert len(preds) == 20 and all(len(p["guesses"]) == 5 and len(p["RPN"]) == 5 for p in preds)
    ckpt = torch.load(out / "model_final.pth", weights_only=True)
    assert ckpt["task"] == "localization" and len(ckpt["class_names"]) == 10


def test_eval_only_reproduces_the_final_metrics(trained, tmp_path):
    out, metrics = trained
    again = train_loc.main(tiny(tmp_path / "eval") + ["--eval-only", "--weights",
                                                      str(out / "model_final.pth")])
    assert again == metrics
    (folder,) = (tmp_path / "eval" / "eval_only").iterdir()
    assert json.loads((folder / "eval" / "metrics.json").read_text()) == metrics


def test_eval_loc_uses_the_stored_config_and_writes_out(trained, tmp_path):
    out, metrics = trained
    result = eval_loc.main(["--weights", str(out / "model_final.pth"),
                            f"train.output_dir={tmp_path / 'e'}", "--out",
                            str(tmp_path / "m.json")])
    assert result == metrics
    assert json.loads((tmp_path / "m.json").read_text()) == metrics


def test_resume_continues_an_interrupted_stage(trained, tmp_path):
    out, _ = trained
    run = tmp_path / "run"
    shutil.copytree(out, run)
    # as if killed after the RPN's checkpoint at iteration 2: its final and later stages are gone
    for name in ("rpn/model_final.pth", "model_final.pth"):
        (run / name).unlink()
    shutil.rmtree(run / "rcnn")
    assert (run / "rpn" / "model_0000001.pth").is_file()
    (run / "rpn" / "last_checkpoint").write_text("model_0000001.pth")
    classifier_log = (run / "classifier" / "metrics.jsonl").read_text()
    train_loc.main(tiny(run) + ["--resume"])
    assert (run / "classifier" / "metrics.jsonl").read_text() == classifier_log   # not retrained
    log = (run / "log.txt").read_text()
    assert "model_0000001.pth at iteration 2" in log                      # resumed mid-stage
    records = [json.loads(x) for x in (run / "rpn" / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records if r["phase"] == "train"] == [1, 2, 3]
    assert (run / "model_final.pth").is_file() and (run / "rcnn" / "model_final.pth").is_file()


def test_missing_imagenet_says_where_and_what_runs_without_it(tmp_path):
    with pytest.raises(DatasetNotFoundError) as e:
        train_loc.main(["configs/loc_r101_imagenet.yaml", f"data.train.root={tmp_path / 'no'}",
                        "classifier.weights=null", "classifier.max_iter=1",
                        "rpn.backbone.weights=null",
                        "rcnn.backbone.weights=null", f"train.output_dir={tmp_path / 'o'}"])
    message = str(e.value)
    assert str(tmp_path / "no") in message and "loc_r18_builtin.yaml" in message


def test_init_from_classifier_needs_matching_backbones(trained, tmp_path):
    with pytest.raises(ConfigError, match="rpn.init_from_classifier"):
        # the demo's classifier is a CIFAR-style ResNet-20, its RPN an ImageNet-style ResNet-18
        train_loc.main(tiny(tmp_path / "o", "rpn.init_from_classifier=true"))


@pytest.mark.slow
def test_two_process_torchrun_trains_and_evaluates(trained, tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           f"--master_port={port}", str(ROOT / "tools" / "train_loc.py"), *tiny(tmp_path)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "world size 2" in (tmp_path / "log.txt").read_text()
    assert set(json.loads((tmp_path / "eval" / "metrics.json").read_text())) == {
        "RPN", "RPN+R-CNN"}
    # every val image scored exactly once, though each rank saw half of them
    assert len(json.loads((tmp_path / "eval" / "predictions.json").read_text())) == 20


def test_an_ensemble_of_one_checkpoint_twice_scores_as_the_checkpoint(trained, tmp_path):
    out, metrics = trained
    weights = str(out / "model_final.pth")
    # the same member twice: mean scores, the union of proposals (each twice) and the mean
    # refinement leave every guess and box as they were
    assert eval_loc.main(["--weights", weights, weights, f"train.output_dir={tmp_path}"]) \
        == metrics


def _crop_region(path: str, short: int, crop: int) -> tuple[float, float, float, float]:
    """The original-pixel region that the centre crop of the RPN's 1-crop view covers."""
    w, h = Image.open(path).size
    s = short / min(h, w)
    rw, rh = int(w * s + 0.5), int(h * s + 0.5)
    left, top = max((rw - crop) // 2, 0), max((rh - crop) // 2, 0)
    return left / s, top / s, min(left + crop, rw) / s, min(top + crop, rh) / s


def test_one_crop_boxes_lie_in_the_crop_region(trained, tmp_path):
    out, metrics = trained
    result = eval_loc.main(["--weights", str(out / "model_final.pth"), "test.scales=[96]",
                            "test.rpn_mode=one_crop", "test.rpn_crop=48",
                            "test.cls_mode=ten_crop", f"train.output_dir={tmp_path}"])
    assert set(result) == {"RPN", "RPN+R-CNN"}
    (folder,) = (tmp_path / "eval_only").iterdir()
    for p in json.loads((folder / "eval" / "predictions.json").read_text()):
        x1, y1, x2, y2 = _crop_region(p["file"], 96, 48)
        for box in p["RPN"]:
            if box[2] > box[0]:            # a class without proposals gets an empty box
                assert x1 - 0.01 <= box[0] and box[2] <= x2 + 0.01, (box, (x1, x2))
                assert y1 - 0.01 <= box[1] and box[3] <= y2 + 0.01, (box, (y1, y2))


def test_infer_loc_draws_and_writes_the_evaluations_guesses(trained, tmp_path):
    from detres.tasks.localization.predictor import LocPredictor
    out, _ = trained
    preds = json.loads((out / "eval" / "predictions.json").read_text())[:3]
    images = tmp_path / "images"
    images.mkdir()
    for p in preds:
        shutil.copy(p["file"], images / Path(p["file"]).name)
    res = run_tool_script("infer_loc", "--weights", str(out / "model_final.pth"), str(images),
                          "--out", str(tmp_path / "out"), "--device", "cpu", "--batch-size", "1")
    assert res.returncode == 0, res.stderr[-3000:]
    results = {Path(r["file"]).name: r for r in
               json.loads((tmp_path / "out" / "results.json").read_text())}
    assert len(results) == 3
    for p in preds:
        name = Path(p["file"]).name
        r = results[name]
        assert r["method"] == "RPN+R-CNN"
        assert [g["class"] for g in r["guesses"]] == p["guesses"]          # same pipeline
        assert all(len(g["box"]) == 4 and 0 <= g["box_score"] <= 1 for g in r["guesses"])
        scores = [g["score"] for g in r["guesses"]]
        assert scores == sorted(scores, reverse=True) and 0 < sum(scores) <= 1.0001
        with Image.open(tmp_path / "out" / f"{name}.png") as drawing, \
                Image.open(images / name) as original:
            assert drawing.size == original.size
            assert np.asarray(drawing.convert("RGB")).tolist() != \
                np.asarray(original.convert("RGB")).tolist()      # something was drawn
    # the Python entry point gives the same guesses for an array (one image per batch, as
    # the tool ran: padding a batch to its largest image changes the RPN's border features)
    predictor = LocPredictor.from_checkpoint(out / "model_final.pth", device="cpu")
    name = Path(preds[0]["file"]).name
    guess = predictor(read_image(images / name))
    assert predictor.to_json(guess) == results[name]["guesses"]


def test_infer_loc_names_a_missing_image(trained, tmp_path):
    out, _ = trained
    res = run_tool_script("infer_loc", "--weights", str(out / "model_final.pth"),
                          str(tmp_path / "nothing.jpg"), "--out", str(tmp_path / "o"))
    assert res.returncode == 1 and "nothing.jpg" in res.stderr
    assert "Traceback" not in res.stderr
