"""Checkpoint -> detector: every tool and the Predictor take one way in, so every check (task,
structure, class names and category ids across an ensemble's members) and every ``test.*``
switch applies on every path; where an evaluation-only run writes; tools/infer.py's results
scored against the dataset's own annotation file (--gt). Detectors are random narrow ones saved
as tools/train_det.py saves a checkpoint (config inside): no training."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import ROOT, builtin_shapes_cache, load_tool

from detres.config import dump, load_config, to_dict
from detres.data.builtin import SHAPE_CLASSES, ensure_builtin_shapes, shapes_split
from detres.data.images import DatasetError
from detres.engine.checkpoint import CheckpointError, atomic_save
from detres.models.test_time import TestTimeDetector
from detres.tasks.detection.build import build_detector
from detres.tasks.detection.config import DetectionConfig
from detres.tasks.detection.load import load_detector

eval_det = load_tool("eval_det")
infer = load_tool("infer")
pytestmark = pytest.mark.usefixtures("one_thread")   # tiny models: a second thread only waits

TINY = ["data.builtin.num_train=2", "data.builtin.num_val=3", "data.builtin.image_size=64",
        "data.min_size_test=64", "data.max_size_test=64", "model.backbone.width=8",
        "model.rpn.proposals_test=20", "model.roi_head.score_threshold=0.0",
        "train.device=cpu", "train.num_workers=0", "train.num_threads=1", "test.ims_per_batch=3"]


@pytest.fixture(scope="module", autouse=True)
def cache(tmp_path_factory):
    """The built-in shapes set, the DETRES_CACHE of this module's tests."""
    root = builtin_shapes_cache(tmp_path_factory, num_train=2, num_val=3)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DETRES_CACHE", str(root))
        yield root


def tiny_config(*extra: str) -> DetectionConfig:
    return load_config(ROOT / "configs" / "frcnn_r18_shapes.yaml", [*TINY, *extra],
                       schema=DetectionConfig)


def save_checkpoint(path, cfg, seed=0, class_names=SHAPE_CLASSES, category_ids=(1, 2, 3, 4, 5)):
    """A random detector saved as tools/train_det.py saves its model_final.pth."""
    torch.manual_seed(seed)
    model = build_detector(cfg.model, len(class_names)).eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_save({"model": model.state_dict(), "task": "detection", "iteration": 0,
                 "config": to_dict(cfg), "class_names": list(class_names),
                 "category_ids": list(category_ids)}, path)
    return path


def val_files(cache):
    folder = ensure_builtin_shapes(cache, num_train=2, num_val=3, image_size=64)
    return shapes_split(folder, "val")


# ----------------------------------------------------------------------------- the four bugs
def test_infer_with_a_config_applies_the_test_switches(tmp_path):
    cfg = tiny_config()
    weights = save_checkpoint(tmp_path / "run" / "model_final.pth", cfg)
    dump(cfg, tmp_path / "cfg.yaml")
    rgb = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "a.png")

    def infer_with(*extra):
        return infer.main([*extra, str(tmp_path / "a.png"), "--weights", str(weights), "--out",
                           str(tmp_path / "out"), "--min-score", "1.0", "test.cpu_amp=none"])
    flipped = infer_with(str(tmp_path / "cfg.yaml"), "test.flip=true")
    stored_flipped = infer_with("test.flip=true")                # the stored config's path
    plain = infer_with(str(tmp_path / "cfg.yaml"))
    assert flipped and plain and flipped != plain
    assert flipped == stored_flipped


def test_an_ensemble_member_with_other_class_names_is_refused(tmp_path):
    cfg = tiny_config(f"train.output_dir={tmp_path / 'out'}")
    dump(cfg, tmp_path / "cfg.yaml")
    a = save_checkpoint(tmp_path / "a.pth", cfg)
    b = save_checkpoint(tmp_path / "b.pth", cfg, seed=1, class_names=SHAPE_CLASSES[::-1])
    with pytest.raises(CheckpointError, match=r"b\.pth.*other classes"):
        eval_det.main([str(tmp_path / "cfg.yaml"), "--weights", str(a), str(b)])
    assert not (tmp_path / "out").exists()                       # refused before any record
    with pytest.raises(CheckpointError, match=r"b\.pth was trained on other classes than "
                                              r"data\.val.*'ring'.*'circle'"):
        eval_det.main([str(tmp_path / "cfg.yaml"), "--weights", str(b)])


def test_eval_det_without_a_config_takes_the_stored_one(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    weights = save_checkpoint(tmp_path / "run" / "model_final.pth", tiny_config())
    metrics = eval_det.main(["--weights", str(weights), "test.ims_per_batch=2"])
    assert set(metrics["per_class"]) == set(SHAPE_CLASSES) and "AP50" in metrics
    (folder,) = (tmp_path / "run" / "eval_only").iterdir()
    assert load_config(folder / "config.yaml", schema=DetectionConfig).test.ims_per_batch == 2


def test_an_ensemble_reads_each_checkpoint_once(tmp_path, monkeypatch):
    from detres import Predictor
    cfg = tiny_config()
    paths = [save_checkpoint(tmp_path / f"m{seed}.pth", cfg, seed) for seed in (0, 1)]
    reads, load = [], torch.load
    monkeypatch.setattr(torch, "load", lambda f, *a, **k: reads.append(str(f)) or load(f, *a, **k))
    predictor = Predictor.from_checkpoint(paths, device="cpu")
    assert sorted(reads) == sorted(map(str, paths))
    assert len(predictor.model.models) == 2


def test_one_way_in_checks_every_member_on_every_path(cache, tmp_path):
    from detres import Predictor
    cfg = tiny_config()
    a = save_checkpoint(tmp_path / "a.pth", cfg)
    b = save_checkpoint(tmp_path / "b.pth", cfg, seed=1, category_ids=(5, 4, 3, 2, 1))
    loaded = load_detector([a, save_checkpoint(tmp_path / "c.pth", cfg, seed=2)], cfg,
                           ["test.flip=true"])
    assert isinstance(loaded.model, TestTimeDetector) and loaded.model.flip
    assert len(loaded.detectors) == 2 and loaded.category_ids == (1, 2, 3, 4, 5)
    with pytest.raises(CheckpointError, match=r"b\.pth gives its classes other dataset category"):
        load_detector([a, b])
    other = tmp_path / "cls.pth"
    atomic_save({"model": {}, "task": "classification", "arch": "ResNet-8"}, other)
    entry_points = [
        lambda: Predictor.from_checkpoint(other, device="cpu"),
        lambda: infer.main([str(val_files(cache)[1]), "--weights", str(other), "--out",
                            str(tmp_path / "o")]),
        lambda: load_tool("export").main(["--weights", str(other), "--format", "torchscript",
                                          "--out", str(tmp_path / "m.pt")]),
        lambda: eval_det.main(["--weights", str(other)]),
        lambda: eval_det.main([str(ROOT / "configs" / "frcnn_r18_shapes.yaml"), "--weights",
                               str(other)])]
    for call in entry_points:
        with pytest.raises(CheckpointError, match="is a 'classification' checkpoint"):
            call()
    assert not [p for p in tmp_path.iterdir() if p.suffix != ".pth"]   # nothing written


# ----------------------------------------------------------------------------- the user path
def test_eval_only_writes_beside_the_weights_and_says_where(tmp_path, monkeypatch, capsys):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    cfg = tiny_config()                                   # train.output_dir: a relative path
    dump(cfg, tmp_path / "cfg.yaml")
    weights = save_checkpoint(tmp_path / "run" / "model_final.pth", cfg)
    eval_det.main([str(tmp_path / "cfg.yaml"), "--weights", str(weights)])
    assert not list(cwd.iterdir())
    (folder,) = (tmp_path / "run" / "eval_only").iterdir()
    assert (folder / "eval" / "metrics.json").is_file()
    out = capsys.readouterr().out
    assert out.count("per-class AP:") == 1                # the table once
    assert str(folder) in out.strip().splitlines()[-1]    # the folder at the end
    explicit = tmp_path / "chosen"
    eval_det.main([str(tmp_path / "cfg.yaml"), "--weights", str(weights),
                   f"train.output_dir={explicit}"])
    assert len(list((explicit / "eval_only").iterdir())) == 1


def _renumbered_annotations(cache, path):
    """The val annotations with other image ids and category ids (and categories in another
    order): what a dataset's own file numbers differently from the checkpoint."""
    ann, images = val_files(cache)
    data = json.loads(ann.read_text())
    new_cat = {c["id"]: 10 * c["id"] + 3 for c in data["categories"]}
    data["categories"] = [{**c, "id": new_cat[c["id"]]} for c in data["categories"][::-1]]
    for im in data["images"]:
        im["id"] += 100
    for a in data["annotations"]:
        a["image_id"] += 100
        a["category_id"] = new_cat[a["category_id"]]
    path.write_text(json.dumps(data))
    return path, images, new_cat


def test_infer_results_with_gt_carry_its_ids_and_can_be_scored(cache, tmp_path):
    gt, images, new_cat = _renumbered_annotations(cache, tmp_path / "gt.json")
    weights = save_checkpoint(tmp_path / "model_final.pth", tiny_config())
    results = infer.main([str(images), "--weights", str(weights), "--out", str(tmp_path / "o"),
                          "--gt", str(gt), "--min-score", "1.0"])
    by_name = {im["file_name"]: im["id"] for im in json.loads(gt.read_text())["images"]}
    assert results and {r["image_id"] for r in results} == set(by_name.values())
    for r in results:
        assert r["image_id"] == by_name[r["file_name"].rsplit("/", 1)[-1]]
    assert {r["category_id"] for r in results} <= set(new_cat.values())
    metrics = eval_det.main(["--gt", str(gt), "--dt", str(tmp_path / "o" / "results.json")])
    assert 0 <= metrics["AP50"] <= 100


def test_infer_gt_refuses_unmatched_images_and_missing_classes(cache, tmp_path):
    gt, images, _ = _renumbered_annotations(cache, tmp_path / "gt.json")
    weights = save_checkpoint(tmp_path / "model_final.pth", tiny_config())
    stranger = tmp_path / "extra" / "zzz.png"
    stranger.parent.mkdir()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(stranger)
    args = ["--weights", str(weights), "--gt", str(gt)]
    with pytest.raises(DatasetError, match=r"zzz\.png.*not in .*gt\.json"):
        infer.main([str(images), str(stranger), *args, "--out", str(tmp_path / "o1")])
    other = save_checkpoint(tmp_path / "other.pth", tiny_config(),
                            class_names=("circle", "square", "triangle", "star", "moon"))
    with pytest.raises(DatasetError, match=r"'moon'.*gt\.json"):
        infer.main([str(images), "--weights", str(other), "--gt", str(gt), "--out",
                    str(tmp_path / "o2")])
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()
