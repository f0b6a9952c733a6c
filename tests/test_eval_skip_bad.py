"""data.skip_bad_images in evaluation: a corrupt test image gets no detections under its own id
(never another image's in its place), and the AP is pycocotools' on the good images' detections
with every image's ground truth."""
import contextlib
import copy
import io
import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from helpers import narrow_detector

from detres.data.coco import COCODetection
from detres.data.loader import build_detection_loader
from detres.data.transforms import eval_transform
from detres.evaluation.coco_eval import detections_to_coco_results
from detres.evaluation.detection import COCOEvaluator
from detres.evaluation.inference import inference_on_dataset
from detres.structures import SkippedImageTargets
from detres.tasks.detection.build import build_det_dataset
from detres.tasks.detection.config import DetDataConfig, DetDatasetConfig
from detres.tasks.detection.inference import dataset_info, ready_detector

N, BAD, SIZE = 5, 3, 64  # image ids 1..N, all SIZE x SIZE; image BAD gets truncated
CATEGORIES = [{"id": 7, "name": "a"}, {"id": 8, "name": "b"}, {"id": 9, "name": "c"}]


def _write_set(tmp_path, annotations):
    images = [{"id": i, "file_name": f"{i}.jpg", "width": SIZE, "height": SIZE}
              for i in range(1, N + 1)]
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps({"images": images, "annotations": annotations,
                               "categories": CATEGORIES}))
    return ann


def _dataset(ann, root, **kw):
    return COCODetection(ann, root, transform=eval_transform(96, 96), **kw)  # scale 1.5


def _test_set(ann, root):
    """The set as a run's data.val with data.skip_bad_images (scale 1.5, as ``_dataset``)."""
    split = DetDatasetConfig(type="coco", annotations=str(ann), images=str(root))
    data = DetDataConfig(min_size_test=96, max_size_test=96, skip_bad_images=True)
    return build_det_dataset(split, data, train=False, key="data.val")


def _loader(ds):
    return build_detection_loader(ds, 2, training=False, num_workers=0, rank=0, world_size=1)


def _model():
    model = narrow_detector(num_classes=3, seed=0).eval()
    torch.nn.init.normal_(model.roi_head.cls_score.weight, std=1.0)
    with torch.no_grad():
        model.roi_head.cls_score.bias.zero_()[-1] = -20.0  # confident: background never wins
    return model


def _pycocotools_ap(ann, results):
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(ann))
        ev = COCOeval(gt, gt.loadRes(copy.deepcopy(results)), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return 100.0 * ev.stats[0]


@pytest.fixture
def corrupt_set(tmp_path):
    """The set, ground truth = each image's own 3 best detections, then image BAD truncated;
    returns (annotation file, image folder, model, detections of every image before that)."""
    root = tmp_path / "img"
    root.mkdir()
    rng = np.random.default_rng(0)
    for i in range(1, N + 1):
        Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(
            root / f"{i}.jpg", quality=95)
    model = _model()
    ds = _dataset(_write_set(tmp_path, []), root)
    ready = ready_detector(model, "cpu")
    with torch.no_grad():
        pairs = [(t, d) for batch in _loader(ds) for t, d in zip(batch[1], ready(batch))]
    results = detections_to_coco_results([d for _, d in pairs], [t for t, _ in pairs],
                                         ds.label_to_category_id)
    assert {r["image_id"] for r in results} == set(range(1, N + 1))
    gt = []
    for i in range(1, N + 1):
        best = sorted((r for r in results if r["image_id"] == i), key=lambda r: -r["score"])
        for r in best[:3]:
            gt.append({"id": len(gt) + 1, "image_id": i, "category_id": r["category_id"],
                       "bbox": r["bbox"], "area": r["bbox"][2] * r["bbox"][3], "iscrowd": 0})
    ann = _write_set(tmp_path, gt)
    data = (root / f"{BAD}.jpg").read_bytes()
    (root / f"{BAD}.jpg").write_bytes(data[: len(data) // 2])
    return ann, root, model, results


def test_skipped_image_scores_as_no_detections(corrupt_set, tmp_path, caplog):
    ann, root, model, all_results = corrupt_set
    ds = _test_set(ann, root)
    evaluator = COCOEvaluator(dataset_info(ds), tmp_path / "run", engine="pycocotools")
    with caplog.at_level(logging.WARNING):
        metrics = inference_on_dataset(ready_detector(model, "cpu"), _loader(ds), evaluator,
                                       "cpu", progress=False)
    good = [r for r in all_results if r["image_id"] != BAD]
    oracle = _pycocotools_ap(ann, good)
    assert 0 < oracle < 100  # image BAD's ground truth is missed
    assert metrics["AP"] == pytest.approx(oracle, abs=1e-6)
    written = json.loads((tmp_path / "run" / "eval" / "coco_results.json").read_text())
    count = lambda rs, i: sum(r["image_id"] == i for r in rs)  # noqa: E731
    assert [count(written, i) for i in range(1, N + 1)] == [
        0 if i == BAD else count(all_results, i) for i in range(1, N + 1)]
    assert ds.num_skipped_images == 1 and f"{BAD}.jpg" in caplog.text
    assert f"1 of {N} test images could not be read" in caplog.text
    assert f"image ids [{BAD}]" in caplog.text


def test_training_still_substitutes_but_evaluation_does_not(corrupt_set):
    ann, root, _, _ = corrupt_set
    ds = _dataset(ann, root, skip_bad_images=True)
    assert ds[BAD - 1][1].image_id == BAD + 1  # training: the next good image
    ds = _test_set(ann, root)                  # a test set: never another image in its place
    image, targets = ds[BAD - 1]
    assert isinstance(targets, SkippedImageTargets) and targets.image_id == BAD
    assert tuple(image.shape) == (3, 96, 96) and int(image.max()) == 0
    assert len(targets) == 0 and targets.scale == 1.5 and targets.orig_size == (SIZE, SIZE)
    assert ds.num_skipped_images == 1
