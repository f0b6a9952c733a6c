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
from detres.config import replace as replace_config
from detres.data.classification import DatasetNotFoundError
from detres.data.coco_splits import MergedCOCODetection, image_ids_of
from detres.data.images import DatasetError
from detres.evaluation.detection import ImageResult, voc_result_lines
from detres.structures import Detections
from detres.tasks.detection.build import build_det_dataset, build_test_detector
from detres.tasks.detection.config import (DetDataConfig, DetDatasetConfig, DetectionConfig,
                                           DetTestConfig)

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


def _write_checkpoint(path: Path, seed: int, *overrides: str) -> None:
    model = narrow_detector(*overrides, seed=seed)
    cfg = DetectionConfig(model=replace_config(NARROW_DETECTOR, list(overrides)))
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
    # overrides may follow the weights, as in "CONFIG --weights W key=value"
    both = eval_det.main([str(eval_config), "--format-only", "--weights", *weights,
                          "test.box_refinement=true", "test.scales=[48,64,96]",
                          "test.flip=true"])
    one = json.loads(Path(single["format_only"]).read_text())
    two = json.loads(Path(both["format_only"]).read_text())
    assert two and one != two
    # members built by their own stored configs: a context network beside a plain one
    _write_checkpoint(tmp_path / "context.pth", 2, "roi_head.global_context=true")
    mixed = eval_det.main([str(eval_config), "--format-only", "--weights", weights[0],
                           str(tmp_path / "context.pth")])
    assert json.loads(Path(mixed["format_only"]).read_text())
    assert Path(single["format_only"]).parent != Path(both["format_only"]).parent  # own runs


def test_voc_results_lines_invert_the_voc_coordinates():
    names = {0: "000001", 1: "2008_000002"}
    # VOC xmin=1..xmax=10 is 0-based [0, 10) in detres; the image was resized by 2
    det = Detections(torch.tensor([[0.0, 2.0, 20.0, 30.0]]), torch.tensor([0.5]),
                     torch.tensor([1]))
    lines = voc_result_lines([ImageResult(image_id=1, scale=2.0, skipped=False, detections=det)],
                             names.__getitem__)
    assert lines == [(1, "2008_000002 0.500000 1.0 2.0 10.0 15.0")]


# ----------------------------------------------------------------------------- ImageNet DET
def _det_xml(folder: str, name: str, objects: list[tuple[str, tuple[int, int, int, int]]]) -> str:
    objs = "".join(f"<object><name>{wnid}</name><truncated>1</truncated><bndbox><xmin>{b[0]}"
                   f"</xmin><ymin>{b[1]}</ymin><xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox>"
                   f"</object>" for wnid, b in objects)
    return (f"<annotation><folder>{folder}</folder><filename>{name}</filename><source>"
            f"<database>ILSVRC_2014</database></source><size><width>80</width><height>60"
            f"</height></size>{objs}</annotation>")


def test_imagenet_det_layout(tmp_path, monkeypatch):
    root = tmp_path / "datasets" / "ILSVRC"
    images = {"train": {"n02672831/n02672831_11478": [("n02672831", (1, 2, 40, 30)),
                                                      ("n01443537", (20, 10, 80, 60))],
                        "ILSVRC2014_train_0000/ILSVRC2014_train_00000663": []},
              "val": {"ILSVRC2012_val_00000001": [("n01443537", (5, 5, 25, 45))],
                      "ILSVRC2012_val_00000002": [("n02672831", (10, 10, 50, 50))]}}
    for sub, entries in images.items():
        for name, objects in entries.items():
            for kind, text in (("Annotations", _det_xml(sub, name, objects)), ("Data", None)):
                path = root / kind / "DET" / sub / (name + (".xml" if text else ".JPEG"))
                path.parent.mkdir(parents=True, exist_ok=True)
                if text:
                    path.write_text(text)
                else:
                    Image.new("RGB", (80, 60)).save(path, format="JPEG")
    sets = root / "ImageSets" / "DET"
    sets.mkdir(parents=True)
    (sets / "train.txt").write_text("n02672831/n02672831_11478 1\n"
                                    "ILSVRC2014_train_0000/ILSVRC2014_train_00000663 2\n")
    (sets / "val1.txt").write_text("ILSVRC2012_val_00000001 1\n")
    (sets / "val2.txt").write_text("ILSVRC2012_val_00000002 2\n")
    monkeypatch.setenv("DETRES_DATASETS", str(tmp_path / "datasets"))
    data = DetDataConfig(min_size_test=60, max_size_test=80)
    train = build_det_dataset(DetDatasetConfig(type="imagenet_det", splits=("train", "val1")),
                              data, train=True, key="data.train")
    assert train.class_names == ["n01443537", "n02672831"]   # the WordNet ids, sorted
    assert len(train) == 2                                    # the negative image filtered out
    ann = train.get_annotations(0)
    np.testing.assert_array_equal(ann["boxes"], [[0, 1, 40, 30], [19, 9, 80, 60]])
    np.testing.assert_array_equal(ann["labels"], [1, 0])
    assert train.path(1) == root / "Data" / "DET" / "val" / "ILSVRC2012_val_00000001.JPEG"
    val = build_det_dataset(DetDatasetConfig(type="imagenet_det", splits=("val2",),
                                             class_names=tuple(train.class_names)),
                            data, train=False, key="data.val")
    assert val.get_annotations(0)["labels"].tolist() == [1]
    with pytest.raises(DatasetError, match="val3.txt: ILSVRC DET split file not found"):
        build_det_dataset(DetDatasetConfig(type="imagenet_det", splits=("val3",)), data,
                          train=False, key="data.val")
    monkeypatch.setenv("DETRES_DATASETS", str(tmp_path / "nothing"))
    with pytest.raises(DatasetNotFoundError, match="data.val.root: the ILSVRC folder"):
        build_det_dataset(DetDatasetConfig(type="imagenet_det", splits=("val2",)), data,
                          train=False, key="data.val")


# ----------------------------------------------------------------------------- presets
PAPER_PRESETS = ["frcnn_r101_coco", "frcnn_r101_coco2014", "frcnn_r101_coco_appb",
                 "frcnn_r101_voc0712", "frcnn_r101_voc07pp12", "frcnn_r101_voc0712_ppp",
                 "frcnn_r101_voc07pp12_ppp", "frcnn_r101_imagenet_det"]


@pytest.mark.parametrize("name", PAPER_PRESETS)
def test_paper_presets_follow_faster_rcnn_where_the_paper_defers(name):
    from detres.cli import CONFIGS
    from detres.config import load_config
    cfg = load_config(CONFIGS / f"{name}.yaml", schema=DetectionConfig)
    assert cfg.model.roi_head.nms_threshold == 0.3             # [32] test NMS
    assert cfg.solver.weight_decay == 0.0005                   # [32] 3.1.3
    assert cfg.model.rpn.boundary_threshold == 0               # [32] 3.3
    assert cfg.model.rpn.min_size == 16                        # py-faster-rcnn
    assert cfg.train.amp == "none"                             # the paper trained in fp32
    assert cfg.solver.reference_batch == cfg.solver.ims_per_batch
    assert cfg.model.roi_head.roi_op == "pool" and cfg.model.roi_head.pooled_size == 14
    improved = name.endswith(("_appb", "_ppp", "imagenet_det"))
    assert cfg.model.roi_head.global_context == improved
    assert cfg.test.box_refinement == improved
    assert bool(cfg.test.scales) == improved


# ----------------------------------------------------------------------------- torchrun
def _format_only(out: str, rank: int = 0, world_size: int = 1) -> None:
    from detres.engine.distributed import DistInfo
    from detres.evaluation.detection import FormatOnlyEvaluator
    from detres.evaluation.inference import inference_on_dataset
    from detres.tasks.detection.build import build_det_test_loader
    from detres.tasks.detection.inference import dataset_info, ready_detector
    cfg = DetectionConfig(model=NARROW_DETECTOR, data=DetDataConfig(
        val=DetDatasetConfig(type="coco", splits=("val2014",)), min_size_test=64,
        max_size_test=96), test=DetTestConfig(ims_per_batch=1, box_refinement=True,
                                              scales=(48, 64, 96), flip=True))
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, num_workers=0))
    dataset = build_det_dataset(cfg.data.val, cfg.data, train=False, key="data.val")
    loader = build_det_test_loader(cfg, dataset, DistInfo(rank, world_size),
                                   torch.device("cpu"))
    model = build_test_detector(cfg, [narrow_detector(seed=0).eval()])
    inference_on_dataset(ready_detector(model, "cpu"), loader,
                         FormatOnlyEvaluator(dataset_info(dataset), out), "cpu")


def _gloo_worker(rank: int, world_size: int, port: int, out: str) -> None:
    import os

    import torch.distributed as dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        _format_only(out, rank, world_size)
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(180)
def test_test_time_switches_under_two_gloo_processes_equal_one_process(tmp_path, coco_root):
    import socket

    import torch.multiprocessing as mp
    _format_only(str(tmp_path / "single"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_gloo_worker, args=(2, port, str(tmp_path / "ddp")), nprocs=2,
                       join=True, start_method="fork")
    def read(run):
        return sorted(json.loads((tmp_path / run / "eval" / "coco_results.json").read_text()),
                      key=lambda r: (r["image_id"], -r["score"], r["category_id"]))
    single, ddp = read("single"), read("ddp")
    assert single and {r["image_id"] for r in ddp} == {10, 11, 12}
    assert len(ddp) == len(single)
    for a, b in zip(ddp, single):
        assert a["image_id"] == b["image_id"] and a["category_id"] == b["category_id"]
        np.testing.assert_allclose(a["bbox"] + [a["score"]], b["bbox"] + [b["score"]],
                                   rtol=1e-4, atol=1e-3)


def test_inference_form_switches_reach_the_evaluation(tmp_path, eval_config):
    eval_det = load_tool("eval_det")
    weights = str(tmp_path / "model_0.pth")

    def results(*overrides):
        out = eval_det.main([str(eval_config), "--format-only", "--weights", weights, *overrides])
        return sorted(json.loads(Path(out["format_only"]).read_text()),
                      key=lambda r: (r["image_id"], -r["score"]))
    exact = results("test.cpu_amp=none", "test.fast_path=false")
    fast = results("test.cpu_amp=none", "test.fast_path=true")
    bf16 = results("test.cpu_amp=bf16")
    assert len(exact) == len(fast) > 0
    np.testing.assert_allclose([r["score"] for r in fast], [r["score"] for r in exact],
                               atol=1e-4)
    assert [r["score"] for r in bf16] != [r["score"] for r in exact]


@pytest.mark.parametrize("text", ["[" * 100_000 + "]" * 100_000, '{"images": ['],
                         ids=["nested", "cut"])
def test_a_held_out_file_that_cannot_be_read_is_named(tmp_path, text):
    f = tmp_path / "minival.json"
    f.write_text(text)
    with pytest.raises(DatasetError, match=r"minival\.json: cannot read its image ids"):
        image_ids_of(f)
