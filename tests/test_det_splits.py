"""COCO splits by name (2014, trainval minus a held-out minival, test-dev), format-only
evaluation (COCO results with the dataset's own ids, VOC devkit files), and the model-mode
switches of tools/eval_det.py (ensembles, refinement) run as a user runs them."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import NARROW_DETECTOR, load_tool, narrow_detector
from PIL import Image
from pycocotools.coco import COCO

from detres.config import ConfigError, dump, to_dict
from detres.data.classification import DatasetNotFoundError
from detres.data.coco_splits import MergedCOCODetection
from detres.data.io import DatasetError
from detres.evaluation.detection import voc_result_lines
from detres.structures import Detections, Targets
from detres.tasks.detection.build import build_det_dataset
from detres.tasks.detection.config import DetDataConfig, DetDatasetConfig, DetectionConfig

CATEGORIES = [{"id": 1, "name": "person"}, {"id": 3, "name": "car"}, {"id": 18, "name": "dog"}]


def _write_split(coco: Path, ann_name: str, folder: str, ids: list[int],
                 with_boxes: bool = True, categories=CATEGORIES) -> None:
    (coco / "annotations").mkdir(parents=True, exist_ok=True)
    (coco / folder).mkdir(exist_ok=True)
    images, anns = [], []
    for k, i in enumerate(ids):
        name = f"COCO_{folder}_{i:012d}.jpg"
        Image.new("RGB", (96, 64), (40 * k % 255, 90, 160)).save(coco / folder / name)
        images.append({"id": i, "file_name": name, "height": 64, "width": 96})
        anns.append({"id": 100 * i, "image_id": i, "category_id": categories[k % 3]["id"],
                     "bbox": [10, 8, 40, 30], "area": 1200, "iscrowd": 0})
    data = {"images": images, "categories": categories}
    if with_boxes:
        data["annotations"] = anns
    (coco / "annotations" / ann_name).write_text(json.dumps(data))


@pytest.fixture
def coco_root(tmp_path, monkeypatch):
    root = tmp_path / "datasets"
    coco = root / "coco"
    _write_split(coco, "instances_train2014.json", "train2014", [1, 2])
    _write_split(coco, "instances_val2014.json", "val2014", [10, 11, 12])
    _write_split(coco, "instances_minival2014.json", "val2014", [11])
    _write_split(coco, "image_info_test-dev2015.json", "test2015", [397133, 37777],
                 with_boxes=False)
    monkeypatch.setenv("DETRES_DATASETS", str(root))
    return coco


def _build(splits, train=True, **kw):
    cfg = DetDatasetConfig(type="coco", splits=tuple(splits), **kw)
    return build_det_dataset(cfg, DetDataConfig(min_size_test=64, max_size_test=96), train,
                             key="data.train" if train else "data.val")


def test_coco_2014_splits_and_trainval_minus_minival(coco_root):
    train = _build(["train2014"])
    assert sorted(train.image_ids.tolist()) == [1, 2]
    assert train.annotation_file == coco_root / "annotations" / "instances_train2014.json"
    trainval = _build(["train2014", "val2014"], holdout="minival2014")
    assert isinstance(trainval, MergedCOCODetection)
    assert sorted(trainval.image_ids.tolist()) == [1, 2, 10, 12] and trainval.num_held_out == 1
    index = {int(i): k for k, i in enumerate(trainval.image_ids)}
    assert trainval.path(index[12]) == coco_root / "val2014" / "COCO_val2014_000000000012.jpg"
    assert trainval.label_to_category_id == [1, 3, 18]
    _, target = trainval[(index[10], 0)]
    assert target.image_id == 10 and len(target.boxes) == 1
    full = _build(["train2014", "val2014"])
    assert len(full) == 5
    assert len(_build(["val2014"], train=False)) == 3


def test_coco_split_errors_name_the_key(coco_root):
    with pytest.raises(ConfigError, match=r"data.train.splits: unknown COCO split 'train2013'.*"
                                          r"valminusminival2014"):
        _build(["train2013"])
    with pytest.raises(ConfigError, match="data.val.splits.*training only"):
        _build(["val2014", "train2014"], train=False)
    with pytest.raises(DatasetNotFoundError, match="instances_valminusminival2014.json"):
        _build(["valminusminival2014"])
    _write_split(coco_root, "instances_val2017.json", "val2017", [5],
                 categories=[{"id": 1, "name": "person"}])
    with pytest.raises(DatasetError, match="other categories"):
        _build(["train2014", "val2017"])
    _write_split(coco_root, "instances_train2017.json", "train2017", [2])
    with pytest.raises(DatasetError, match=r"image ids \[2\] appear in more than one"):
        _build(["train2014", "train2017"])


def _write_checkpoint(path: Path, seed: int) -> None:
    model = narrow_detector(seed=seed)
    cfg = DetectionConfig(model=NARROW_DETECTOR)
    torch.save({"task": "detection", "model": model.state_dict(), "config": to_dict(cfg),
                "class_names": ["person", "car", "dog"], "category_ids": [1, 3, 18]}, path)


@pytest.fixture
def eval_config(tmp_path, coco_root):
    cfg = DetectionConfig(
        model=NARROW_DETECTOR,
        data=DetDataConfig(val=DetDatasetConfig(type="coco", splits=("test-dev2015",)),
                           min_size_test=64, max_size_test=96))
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(
        cfg.train, output_dir=str(tmp_path / "run"), num_workers=0, device="cpu"))
    path = tmp_path / "config.yaml"
    path.write_text(dump(cfg))
    for seed in (0, 1):
        _write_checkpoint(tmp_path / f"model_{seed}.pth", seed)
    return path


def test_format_only_writes_server_ready_results_with_dataset_ids(tmp_path, eval_config,
                                                                  coco_root):
    eval_det = load_tool("eval_det")
    weights = [str(tmp_path / "model_0.pth")]
    with pytest.raises(ConfigError, match="no ground truth.*test.format_only=true"):
        eval_det.main([str(eval_config), "--weights", *weights])
    out = eval_det.main([str(eval_config), "--weights", *weights, "--format-only"])
    results = json.loads(Path(out["format_only"]).read_text())
    assert out["num_images"] == 2 and out["num_detections"] == len(results) > 0
    assert {r["image_id"] for r in results} <= {397133, 37777}
    assert {r["category_id"] for r in results} <= {1, 3, 18}
    for r in results:
        x, y, w, h = r["bbox"]
        assert 0 <= x and 0 <= y and w > 0 and h > 0 and x + w <= 96.01 and y + h <= 64.01
    # the results format pycocotools reads, against the image list the server holds
    gt = COCO()
    gt.dataset = json.loads((coco_root / "annotations" / "image_info_test-dev2015.json")
                            .read_text()) | {"annotations": []}
    gt.createIndex()
    assert len(gt.loadRes(results).getAnnIds()) == len(results)


def test_ensemble_and_refinement_run_from_the_command_line(tmp_path, eval_config):
    eval_det = load_tool("eval_det")
    weights = [str(tmp_path / "model_0.pth"), str(tmp_path / "model_1.pth")]
    single = eval_det.main([str(eval_config), "--weights", weights[0], "--format-only"])
    both = eval_det.main([str(eval_config), "--weights", *weights, "--format-only",
                          "test.box_refinement=true", "test.scales=[48,64,96]",
                          "test.flip=true"])
    one = json.loads(Path(single["format_only"]).read_text())
    two = json.loads(Path(both["format_only"]).read_text())
    assert two and one != two
    assert Path(single["format_only"]).parent != Path(both["format_only"]).parent  # own runs


def test_voc_results_lines_invert_the_voc_coordinates():
    class Split:
        image_ids = np.array([0, 1])
        class_names = ["cat", "dog"]

        def path(self, i):
            return Path(f"JPEGImages/{['000001', '2008_000002'][i]}.jpg")

    # VOC xmin=1..xmax=10 is 0-based [0, 10) in detres; the image was resized by 2
    det = Detections(torch.tensor([[0.0, 2.0, 20.0, 30.0]]), torch.tensor([0.5]),
                     torch.tensor([1]))
    lines = voc_result_lines(Split(), [(Targets(torch.zeros(0, 4), torch.zeros(0, dtype=
                                                torch.int64), image_id=1, scale=2.0), det)])
    assert lines == [(1, "2008_000002 0.500000 1.0 2.0 10.0 15.0")]
