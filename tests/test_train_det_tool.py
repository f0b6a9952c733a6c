"""tools/train_det.py, tools/eval_det.py (model mode) and tools/infer.py end to end on a tiny
built-in shapes set: every output file, --resume, --eval-only, infer's drawings and results,
a 2-process torchrun run, and the errors a user meets first."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from helpers import builtin_shapes_cache, free_port, load_tool

from detres.config import ConfigError
from detres.data.builtin import ensure_builtin_shapes, shapes_split
from detres.data.classification import DatasetNotFoundError
from detres.engine.checkpoint import CheckpointError, read_checkpoint
from detres.engine.logging import read_metrics
from detres.evaluation.coco_eval import evaluate_coco
from detres.tasks.detection.predictor import Predictor

ROOT = Path(__file__).resolve().parent.parent
eval_det = load_tool("eval_det")
infer = load_tool("infer")
train_det = load_tool("train_det")



# Tests resize the 64 px images to 96 px (scale 1.5), so that results in original pixels differ
# from the network's; score threshold 0 keeps every (proposal, class) pair up to 100 per image,
# so that even a model trained for 4 iterations detects something in every image.
TINY = ["data.builtin.num_train=12", "data.builtin.num_val=6", "data.builtin.image_size=64",
        "data.min_size_train=[64]", "data.max_size_train=64", "data.min_size_test=96",
        "data.max_size_test=96", "model.backbone.width=8", "solver.ims_per_batch=2",
        "solver.steps=[]", "solver.warmup_iters=0", "train.device=cpu", "train.num_workers=0",
        "train.log_period=1", "train.num_threads=1", "test.ims_per_batch=4",
        "model.roi_head.score_threshold=0.0"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return builtin_shapes_cache(tmp_path_factory, num_train=12, num_val=6)


@pytest.fixture(autouse=True)
def builtin_cache(cache, monkeypatch):
    monkeypatch.setenv("DETRES_CACHE", str(cache))
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def run(out, *extra):
    return train_det.main([*TINY, f"train.output_dir={out}", *extra])


@pytest.fixture(scope="module")
def finished_run(cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    num_threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:   # the variable is put back after the run
        mp.setenv("DETRES_CACHE", str(cache))
        metrics = run(out, "train.max_iter=4", "train.checkpoint_period=2")
    torch.set_num_threads(num_threads)         # train.num_threads=1 inside the tool
    return out, metrics


def val_images(cache) -> list[tuple[int, Path]]:
    """(image id, file) of the built-in val split, in the annotation file's order."""
    ann, images = shapes_split(ensure_builtin_shapes(cache, num_train=12, num_val=6,
                                                     image_size=64), "val")
    data = json.loads(Path(ann).read_text())
    return [(int(im["id"]), Path(images) / im["file_name"]) for im in data["images"]]


def test_run_writes_every_output_file(finished_run):
    out, metrics = finished_run
    for name in ("config.yaml", "metrics.jsonl", "model_0000001.pth",
                 "last_checkpoint", "model_final.pth", "eval/metrics.json",
                 "eval/coco_results.json", "env.json", "log.txt"):
        assert (out / name).is_file(), name
    stored = json.loads((out / "eval" / "metrics.json").read_text())["bbox"]
    assert set(stored) >= {"AP", "AP50", "AP75", "APs", "APm", "APl", "per_class"}
    assert set(stored["per_class"]) == {"circle", "square", "triangle", "star", "ring"}
    assert stored["AP"] == pytest.approx(metrics["AP"])
    records = read_metrics(out)
    assert [r["iteration"] for r in records if r["phase"] == "train"] == [1, 2, 3, 4]
    assert any(r["phase"] == "eval" for r in records)
    ckpt = read_checkpoint(out / "model_final.pth")   # weights_only=True inside
    assert ckpt["task"] == "detection" and ckpt["iteration"] == 4
    assert ckpt["class_names"] == ["circle", "square", "triangle", "star", "ring"]


def test_coco_results_are_in_original_pixels_and_score_like_the_metrics(finished_run, cache):
    out, metrics = finished_run
    results = json.loads((out / "eval" / "coco_results.json").read_text())
    folder = ensure_builtin_shapes(cache, num_train=12, num_val=6, image_size=64)
    ann, _ = shapes_split(folder, "val")
    val = val_images(cache)
    # score threshold 0: every val image has detections (at most 100 each)
    per_image = {i: [r for r in results if r["image_id"] == i] for i, _ in val}
    assert {r["image_id"] for r in results} == set(per_image)
    assert all(0 < len(rs) <= 100 for rs in per_image.values())
    assert {r["category_id"] for r in results} <= {1, 2, 3, 4, 5}
    # the network saw 96 px images; boxes come back divided by the scale 1.5
    right = [r["bbox"][0] + r["bbox"][2] for r in results]
    bottom = [r["bbox"][1] + r["bbox"][3] for r in results]
    assert max(right) <= 64.01 and max(bottom) <= 64.01
    assert min(r["bbox"][0] for r in results) >= 0 and min(r["bbox"][1] for r in results) >= 0
    # oracle: the Predictor (own resize, own scale) on the same files finds the same boxes
    predictor = Predictor.from_checkpoint(out / "model_final.pth", device="cpu")
    for (image_id, path), dets in zip(val, predictor([p for _, p in val])):
        mine = sorted(per_image[image_id], key=lambda r: -r["score"])
        assert len(mine) == len(dets)
        top = int(dets.scores.argmax())
        assert mine[0]["score"] == pytest.approx(float(dets.scores[top]), abs=1e-4)
        x1, y1, x2, y2 = dets.boxes[top].tolist()
        assert mine[0]["bbox"] == pytest.approx([x1, y1, x2 - x1, y2 - y1], abs=0.02)
        assert mine[0]["category_id"] == predictor.category_ids[int(dets.labels[top])]
    assert evaluate_coco(ann, results)["AP"] == pytest.approx(metrics["AP"], nan_ok=True)


def test_eval_only_reproduces_the_final_evaluation(finished_run, tmp_path):
    out, metrics = finished_run
    again = train_det.main([*TINY, f"train.output_dir={tmp_path}", "--eval-only",
                            "--weights", str(out / "model_final.pth")])
    assert again == pytest.approx(metrics, nan_ok=True)
    assert [p.name for p in tmp_path.iterdir()] == ["eval_only"]   # its records in their own
    (folder,) = (tmp_path / "eval_only").iterdir()                 # sub-folder
    stored = json.loads((folder / "eval" / "metrics.json").read_text())["bbox"]
    assert stored["AP"] == pytest.approx(metrics["AP"], nan_ok=True)


def test_resume_continues_from_the_last_checkpoint(tmp_path):
    run(tmp_path, "train.max_iter=2", "train.checkpoint_period=2")
    run(tmp_path, "train.max_iter=4", "train.checkpoint_period=2", "--resume")
    iterations = [r["iteration"] for r in read_metrics(tmp_path) if r["phase"] == "train"]
    assert iterations == [1, 2, 3, 4]
    assert read_checkpoint(tmp_path / "model_final.pth")["iteration"] == 4


def test_eval_det_model_mode(finished_run, tmp_path):
    out, metrics = finished_run
    result = eval_det.main([str(out / "config.yaml"), "--weights", str(out / "model_final.pth"),
                            "--out", str(tmp_path / "m.json"), f"train.output_dir={tmp_path}"])
    assert result["AP"] == pytest.approx(metrics["AP"], nan_ok=True)
    assert json.loads((tmp_path / "m.json").read_text())["bbox"]["AP50"] == pytest.approx(
        metrics["AP50"], nan_ok=True)


def test_infer_draws_pngs_and_writes_coco_results(finished_run, cache, tmp_path):
    out, _ = finished_run
    folder = ensure_builtin_shapes(cache, num_train=12, num_val=6, image_size=64)
    _, images = shapes_split(folder, "val")
    results = infer.main([str(images), "--weights", str(out / "model_final.pth"),
                          "--out", str(tmp_path), "--min-score", "0.0",
                          "model.roi_head.score_threshold=0.0"])
    pngs = sorted(tmp_path.glob("*.png"))
    assert len(pngs) == 6 and Image.open(pngs[0]).size == (64, 64)
    assert json.loads((tmp_path / "results.json").read_text()) == results
    assert results and all(r["category_id"] in (1, 2, 3, 4, 5) for r in results)


def test_weights_for_another_class_count(finished_run, cache, tmp_path):
    out, _ = finished_run
    bigger = [f"model.weights={out / 'model_final.pth'}", "train.max_iter=1"]
    ann = tmp_path / "seven.json"
    train_ann, images = shapes_split(ensure_builtin_shapes(cache, num_train=12, num_val=6,
                                                           image_size=64), "train")
    data = json.loads(Path(train_ann).read_text())
    data["categories"] += [{"id": 6, "name": "x"}, {"id": 7, "name": "y"}]
    ann.write_text(json.dumps(data))
    other = ["data.train.type=coco", f"data.train.annotations={ann}",
             f"data.train.images={images}", "data.val.type=coco",
             f"data.val.annotations={ann}", f"data.val.images={images}"]
    with pytest.raises(CheckpointError, match="detects 5 classes but this model has 7.*"
                                              "model.reinit_class_layers=true"):
        run(tmp_path / "a", *bigger, *other)
    run(tmp_path / "b", *bigger, *other, "model.reinit_class_layers=true")


def test_missing_dataset_says_where_and_what_runs_without_it(tmp_path, monkeypatch):
    monkeypatch.setenv("DETRES_DATASETS", str(tmp_path / "nowhere"))
    with pytest.raises(DatasetNotFoundError) as e:
        run(tmp_path, "data.train.type=coco", "data.val.type=coco")
    msg = str(e.value)
    assert "data.val.annotations" in msg and str(tmp_path / "nowhere") in msg
    assert "cocodataset.org" in msg and "frcnn_r18_shapes.yaml" in msg
    with pytest.raises(ConfigError, match="data.train.splits"):
        run(tmp_path, "data.train.splits=[test]")


@pytest.mark.slow
def test_two_process_torchrun_trains_and_evaluates(cache, tmp_path):
    env = {**os.environ, "DETRES_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           f"--master_port={free_port()}", str(ROOT / "tools" / "train_det.py"), *TINY,
           "train.max_iter=2", f"train.output_dir={tmp_path}"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "world size 2" in (tmp_path / "log.txt").read_text()
    assert (tmp_path / "eval" / "metrics.json").is_file()
    results = json.loads((tmp_path / "eval" / "coco_results.json").read_text())
    # each of the 6 val images is evaluated on exactly one rank and has detections (score
    # threshold 0); a padded sampler's repeated image would show as a seventh id or duplicates
    assert {r["image_id"] for r in results} == {i for i, _ in val_images(cache)}
