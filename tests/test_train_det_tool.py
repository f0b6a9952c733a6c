"""tools/train_det.py, tools/eval_det.py (model mode) and tools/infer.py end to end on a tiny
built-in shapes set: every output file, --resume, --eval-only, infer's drawings and results,
a 2-process torchrun run, and the errors a user meets first."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from helpers import load_tool

from detres.config import ConfigError
from detres.data.builtin import ensure_builtin_shapes, shapes_split
from detres.data.classification import DatasetNotFoundError
from detres.engine.checkpoint import CheckpointError, load_checkpoint
from detres.engine.logging import read_metrics
from detres.evaluation.coco_eval import evaluate_coco

ROOT = Path(__file__).resolve().parent.parent
eval_det = load_tool("eval_det")
infer = load_tool("infer")
train_det = load_tool("train_det")



TINY = ["data.builtin.num_train=12", "data.builtin.num_val=6", "data.builtin.image_size=64",
        "data.min_size_train=[64]", "data.max_size_train=64", "data.min_size_test=64",
        "data.max_size_test=64", "model.backbone.width=8", "solver.ims_per_batch=2",
        "solver.steps=[]", "solver.warmup_iters=0", "train.device=cpu", "train.num_workers=0",
        "train.log_period=1", "train.num_threads=1", "test.ims_per_batch=4"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    ensure_builtin_shapes(root, num_train=12, num_val=6, image_size=64)
    return root


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
    os.environ["DETRES_CACHE"] = str(cache)
    out = tmp_path_factory.mktemp("run")
    metrics = run(out, "train.max_iter=4", "train.checkpoint_period=2")
    return out, metrics


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
    ckpt = load_checkpoint(out / "model_final.pth")   # weights_only=True inside
    assert ckpt["task"] == "detection" and ckpt["iteration"] == 4
    assert ckpt["class_names"] == ["circle", "square", "triangle", "star", "ring"]


def test_coco_results_are_in_original_pixels_and_score_like_the_metrics(finished_run, cache):
    out, metrics = finished_run
    results = json.loads((out / "eval" / "coco_results.json").read_text())
    folder = ensure_builtin_shapes(cache, num_train=12, num_val=6, image_size=64)
    ann, _ = shapes_split(folder, "val")
    if results:
        assert {r["category_id"] for r in results} <= {1, 2, 3, 4, 5}
        assert all(r["bbox"][0] + r["bbox"][2] <= 64.01 for r in results)
    assert evaluate_coco(ann, results)["AP"] == pytest.approx(metrics["AP"], nan_ok=True)


def test_eval_only_reproduces_the_final_evaluation(finished_run, tmp_path):
    out, metrics = finished_run
    again = train_det.main([*TINY, f"train.output_dir={tmp_path}", "--eval-only",
                            "--weights", str(out / "model_final.pth")])
    assert again == pytest.approx(metrics, nan_ok=True)
    assert not (tmp_path / "config.yaml").exists()


def test_resume_continues_from_the_last_checkpoint(tmp_path):
    run(tmp_path, "train.max_iter=2", "train.checkpoint_period=2")
    run(tmp_path, "train.max_iter=4", "train.checkpoint_period=2", "--resume")
    iterations = [r["iteration"] for r in read_metrics(tmp_path) if r["phase"] == "train"]
    assert iterations == [1, 2, 3, 4]
    assert load_checkpoint(tmp_path / "model_final.pth")["iteration"] == 4


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


def test_weights_for_another_class_count(finished_run, tmp_path):
    out, _ = finished_run
    bigger = [f"model.weights={out / 'model_final.pth'}", "train.max_iter=1"]
    ann = tmp_path / "seven.json"
    data = json.loads(Path(shapes_split(ensure_builtin_shapes(num_train=12, num_val=6, image_size=64), "train")[0]).read_text())
    data["categories"] += [{"id": 6, "name": "x"}, {"id": 7, "name": "y"}]
    ann.write_text(json.dumps(data))
    images = str(shapes_split(ensure_builtin_shapes(num_train=12, num_val=6, image_size=64), "train")[1])
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


def test_help_and_bad_key_as_a_script(tmp_path):
    tool = str(ROOT / "tools" / "train_det.py")
    res = subprocess.run([sys.executable, tool, "--help"], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0 and "--eval-only" in res.stdout
    res = subprocess.run([sys.executable, tool, "model.rpn.proposal_test=5",
                          f"train.output_dir={tmp_path}"], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 1
    assert res.stderr.strip().splitlines()[-1].startswith(
        "error: <command line>: unknown key 'model.rpn.proposal_test'")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
    assert len({r["image_id"] for r in results}) <= 6
