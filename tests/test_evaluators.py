"""The evaluators of evaluation's one loop: COCO against pycocotools run by hand on hand-made
results, VOC against hand-computed AP, format-only writing the server's files without reading
any ground truth; several chunks equal one; the main rank scores alone and every rank gets its
result; and evaluation imports nothing of data/ or models/ (docs/architecture.md, Layers)."""
from __future__ import annotations

import ast
import json
import logging
import math
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import pycocotools_direct
from torch import nn

import detres
from detres.engine import distributed as du
from detres.evaluation import detection
from detres.evaluation.detection import (COCOEvaluator, DatasetInfo, FormatOnlyEvaluator,
                                         VOCEvaluator)
from detres.evaluation.inference import DatasetEvaluator, inference_on_dataset, score_on_main
from detres.structures import Detections, ImageBatch, SkippedImageTargets, Targets

# ----------------------------------------------------------------------------- COCO
# Two images; category 3 "cat" is label 0, 7 "dog" label 1; image 9 holds a crowd dog region.
COCO_GT = {
    "images": [{"id": 5, "width": 100, "height": 100, "file_name": "five.jpg"},
               {"id": 9, "width": 100, "height": 100, "file_name": "nine.jpg"}],
    "categories": [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}],
    "annotations": [
        {"id": 1, "image_id": 5, "category_id": 3, "bbox": [10, 10, 20, 20], "area": 400,
         "iscrowd": 0},
        {"id": 2, "image_id": 5, "category_id": 7, "bbox": [40, 40, 30, 20], "area": 600,
         "iscrowd": 0},
        {"id": 3, "image_id": 9, "category_id": 3, "bbox": [0, 0, 50, 50], "area": 2500,
         "iscrowd": 0},
        {"id": 4, "image_id": 9, "category_id": 7, "bbox": [60, 60, 20, 20], "area": 400,
         "iscrowd": 1}]}
SCALES = {5: 2.0, 9: 0.5}                       # resized / original
# per image (label, xyxy in original pixels, score); the model gives them resized
# (scores and coordinates are exact in float32, so the files can be compared exactly)
DETECTIONS = {5: [(0, [10, 10, 30, 30], 0.875), (1, [0, 0, 10, 10], 0.75),
                  (1, [42, 40, 72, 60], 0.625)],
              9: [(0, [2, 2, 50, 52], 0.5), (1, [60, 60, 80, 80], 0.375)]}
# the same by hand in COCO results format: [x, y, w, h], dataset ids
COCO_RESULTS = [
    {"image_id": 5, "category_id": 3, "bbox": [10, 10, 20, 20], "score": 0.875},
    {"image_id": 5, "category_id": 7, "bbox": [0, 0, 10, 10], "score": 0.75},
    {"image_id": 5, "category_id": 7, "bbox": [42, 40, 30, 20], "score": 0.625},
    {"image_id": 9, "category_id": 3, "bbox": [2, 2, 48, 50], "score": 0.5},
    {"image_id": 9, "category_id": 7, "bbox": [60, 60, 20, 20], "score": 0.375}]


class FixedDetector(nn.Module):
    """A ready model: the batch's images -> their ``detections``, in resized pixels."""

    def __init__(self, detections):
        super().__init__()
        self.detections = detections

    def forward(self, batch):
        out = []
        for t in batch[1]:
            labels, boxes, scores = zip(*self.detections[t.image_id])
            out.append(Detections(torch.tensor(boxes, dtype=torch.float32) * SCALES[t.image_id],
                                  torch.tensor(scores), torch.tensor(labels)))
        return out


def batches(image_ids, chunk, skipped=()):
    """The test loader: ``chunk`` images per batch (tiny blank images: the model ignores them)."""
    out = []
    for start in range(0, len(image_ids), chunk):
        ids = image_ids[start:start + chunk]
        targets = [(SkippedImageTargets if i in skipped else Targets)(
            torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64), i, SCALES[i]) for i in ids]
        out.append((ImageBatch.from_tensors([torch.zeros(3, 8, 8)] * len(ids)), targets))
    return out


def run(evaluator, image_ids, chunk=2, skipped=(), detections=DETECTIONS):
    return inference_on_dataset(FixedDetector(detections), batches(image_ids, chunk, skipped),
                                evaluator, "cpu", progress=False)


def coco_info(tmp_path):
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(COCO_GT))
    return DatasetInfo(class_names=("cat", "dog"), image_ids=(5, 9), annotation_file=path,
                       label_to_category_id=(3, 7),
                       file_stem=lambda i: {5: "five", 9: "nine"}[i])


def pycocotools_oracle(results):
    """The 12 statistics (percent, nan for -1) and per-class AP of pycocotools itself."""
    stats, precision = pycocotools_direct(COCO_GT, results)
    per_class = []
    for k in range(2):
        p = precision[:, :, k, 0, -1]
        per_class.append(100 * p[p > -1].mean() if (p > -1).any() else math.nan)
    return list(stats), per_class


@pytest.mark.parametrize("engine", ["faster", "pycocotools"])
def test_coco_evaluator_equals_pycocotools_and_writes_its_files(tmp_path, engine):
    metrics = run(COCOEvaluator(coco_info(tmp_path), tmp_path / "run", engine,
                                summary_only=False), [5, 9])
    stats, per_class = pycocotools_oracle(COCO_RESULTS)
    names = ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm",
             "ARl"]
    assert [metrics[n] for n in names] == pytest.approx(stats, nan_ok=True, abs=1e-9)
    assert 0 < metrics["AP"] < 100
    assert list(metrics["per_class"].values()) == pytest.approx(per_class, abs=1e-9)
    written = json.loads((tmp_path / "run" / "eval" / "coco_results.json").read_text())
    assert written == COCO_RESULTS
    on_disk = json.loads((tmp_path / "run" / "eval" / "metrics.json").read_text())["bbox"]
    assert on_disk["AP"] == pytest.approx(metrics["AP"]) and "per_class" in on_disk
    summary = run(COCOEvaluator(coco_info(tmp_path), engine=engine), [5, 9])
    assert "per_class" not in summary and summary["AP"] == metrics["AP"]


def test_evaluators_refuse_a_test_set_they_cannot_score():
    with pytest.raises(ValueError, match="COCO-format annotation file"):
        COCOEvaluator(voc_info())
    with pytest.raises(ValueError, match="annotations"):
        VOCEvaluator(DatasetInfo(class_names=("a",), image_ids=(1,)))
    with pytest.raises(ValueError, match="metric must be"):
        VOCEvaluator(voc_info(), "coco")


def test_coco_skipped_image_gets_no_detections(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        metrics = run(COCOEvaluator(coco_info(tmp_path), tmp_path / "run"), [5, 9], skipped={9})
    written = json.loads((tmp_path / "run" / "eval" / "coco_results.json").read_text())
    assert written == COCO_RESULTS[:3]           # the model's answer for image 9 is dropped
    assert metrics["AP"] == pytest.approx(pycocotools_oracle(COCO_RESULTS[:3])[0][0])
    assert "1 of 2 test images could not be read" in caplog.text and "[9]" in caplog.text


# ----------------------------------------------------------------------------- VOC
# Class a: image 5 has a plain box and a difficult one, image 9 one box; class b one box.
VOC_GT = {5: {"boxes": [[0, 0, 10, 10], [20, 20, 30, 30], [0, 0, 10, 10]], "labels": [0, 0, 1],
              "ignore": [False, True, False]},
          9: {"boxes": [[50, 50, 70, 70]], "labels": [0], "ignore": [False]}}
VOC_DETECTIONS = {5: [(0, [0, 0, 10, 10], 0.875),      # true positive
                      (0, [20, 20, 30, 30], 0.75),     # on the difficult box: ignored
                      (0, [0, 0, 10, 10], 0.625),      # the same box again: false positive
                      (1, [40, 40, 50, 50], 0.5)],     # misses b's box: b's AP is 0
                  9: [(0, [50, 50, 70, 70], 0.375)]}   # true positive
# class a, kept detections by score: TP, FP, TP of 2 boxes -> recall .5 .5 1, precision 1 .5 2/3
# voc07: recall >= 0..0.5 (6 points) reaches precision 1, 0.6..1 (5 points) 2/3 -> 28/33
# voc12: area under the envelope 0.5 * 1 + 0.5 * 2/3 = 5/6
VOC_AP = {"voc07": 100 * 28 / 33, "voc12": 100 * 5 / 6}


def voc_info():
    annotations = {i: {"boxes": np.array(a["boxes"], np.float32),
                       "labels": np.array(a["labels"], np.int64),
                       "ignore": np.array(a["ignore"], bool)} for i, a in VOC_GT.items()}
    return DatasetInfo(class_names=("a", "b"), image_ids=(5, 9),
                       annotations=annotations.__getitem__)


@pytest.mark.parametrize("metric", ["voc07", "voc12"])
def test_voc_evaluator_equals_hand_computed_ap(tmp_path, metric):
    metrics = run(VOCEvaluator(voc_info(), metric, tmp_path / "run", summary_only=False), [5, 9],
                  detections=VOC_DETECTIONS)
    assert metrics["per_class"] == pytest.approx({"a": VOC_AP[metric], "b": 0.0})
    assert metrics["mAP"] == pytest.approx(VOC_AP[metric] / 2)
    on_disk = json.loads((tmp_path / "run" / "eval" / "metrics.json").read_text())
    assert on_disk["bbox"]["per_class"]["a"] == pytest.approx(VOC_AP[metric])


# ----------------------------------------------------------------------------- chunks
EVALUATORS = {
    "coco": lambda tmp, out: COCOEvaluator(coco_info(tmp), out, summary_only=False),
    "voc07": lambda tmp, out: VOCEvaluator(voc_info(), "voc07", out, summary_only=False),
    "format-coco": lambda tmp, out: FormatOnlyEvaluator(coco_info(tmp), out),
    "format-voc": lambda tmp, out: FormatOnlyEvaluator(coco_info(tmp), out, "voc"),
}


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*.*"))}


@pytest.mark.parametrize("name", EVALUATORS)
def test_several_chunks_equal_one(tmp_path, name):
    detections = VOC_DETECTIONS if name == "voc07" else DETECTIONS
    results = {}
    for chunk in (2, 1):                          # one batch of both images, or two batches
        out = tmp_path / f"chunk{chunk}"
        evaluator = EVALUATORS[name](tmp_path, out)
        metrics = run(evaluator, [5, 9], chunk, detections=detections)
        metrics.pop("format_only", None)          # the folder's path
        results[chunk] = (json.dumps(metrics, sort_keys=True), files(out))
    assert results[2] == results[1] and results[2][1]


# ----------------------------------------------------------------------------- format only
def test_format_only_writes_the_server_files_and_scores_nothing(tmp_path, monkeypatch):
    def no_scoring(*args, **kwargs):
        raise AssertionError("format-only evaluation scored")
    for name in ("evaluate_coco", "evaluate_voc", "evaluate_imagenet_det"):
        monkeypatch.setattr(detection, name, no_scoring)
    info = DatasetInfo(class_names=("cat", "dog"), image_ids=(5, 9), label_to_category_id=(3, 7),
                       file_stem={5: "000005", 9: "2008_000009"}.__getitem__)  # no ground truth
    coco = run(FormatOnlyEvaluator(info, tmp_path / "c"), [5, 9])
    assert coco == {"format_only": str(tmp_path / "c" / "eval" / "coco_results.json"),
                    "num_images": 2, "num_detections": 5}
    assert json.loads(Path(coco["format_only"]).read_text()) == COCO_RESULTS
    voc = run(FormatOnlyEvaluator(info, tmp_path / "v", "voc", ("2007", "test")), [5, 9])
    main = tmp_path / "v" / "eval" / "results" / "VOC2007" / "Main"
    assert voc["format_only"] == str(tmp_path / "v" / "eval" / "results")
    # 1-based inclusive pixels: x1 + 1, y1 + 1, x2, y2 of the original image
    assert (main / "comp4_det_test_cat.txt").read_text() == (
        "000005 0.875000 11.0 11.0 30.0 30.0\n2008_000009 0.500000 3.0 3.0 50.0 52.0\n")
    assert (main / "comp4_det_test_dog.txt").read_text().splitlines()[0] == \
        "000005 0.750000 1.0 1.0 10.0 10.0"
    assert not (tmp_path / "v" / "eval" / "metrics.json").exists()
    with pytest.raises(ValueError, match="needs an output folder"):
        FormatOnlyEvaluator(info, None)


# ----------------------------------------------------------------------------- the loop
class Recorder(DatasetEvaluator):
    def __init__(self):
        self.calls = []

    def reset(self):
        self.calls.append("reset")

    def process(self, inputs, outputs):
        self.calls.append(("process", inputs.shape[0], outputs.dtype))

    def evaluate(self):
        self.calls.append("evaluate")
        return {"calls": len(self.calls)}


def test_loop_resets_processes_each_batch_then_evaluates_under_the_given_autocast():
    model, loader = nn.Linear(4, 2), [torch.ones(3, 4), torch.ones(1, 4)]
    recorder = Recorder()
    assert inference_on_dataset(model, loader, recorder, "cpu", progress=False) == {"calls": 4}
    assert recorder.calls == ["reset", ("process", 3, torch.float32),
                              ("process", 1, torch.float32), "evaluate"]
    recorder = Recorder()
    inference_on_dataset(model, loader[:1], recorder, "cpu", torch.bfloat16, progress=False)
    assert recorder.calls[1] == ("process", 3, torch.bfloat16)
    assert model.training                              # its mode given back


def test_score_on_main_in_one_process():
    assert score_on_main([1, 2], sum) == 3
    with pytest.raises(ZeroDivisionError):
        score_on_main([0], lambda items: 1 / items[0])


def _score_worker(rank: int, world_size: int, port: int, out: str, fail: bool) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    calls = []

    def score(items):
        calls.append(items)
        if fail:
            raise ValueError("bad box")
        return {"items": items}
    try:
        try:
            result = score_on_main([10 * rank, 10 * rank + 1], score)
        except Exception as e:
            result = f"{type(e).__name__}: {e}"
        gathered = du.gather_objects(7 * rank)
        Path(out, f"{rank}.json").write_text(json.dumps({"result": result, "calls": calls,
                                                         "gathered": gathered}))
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("fail", [False, True])
def test_score_on_main_scores_once_and_every_rank_gets_the_result(tmp_path, fail):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_score_worker, args=(2, port, str(tmp_path), fail), nprocs=2, join=True,
                       start_method="fork")
    main, other = (json.loads((tmp_path / f"{r}.json").read_text()) for r in (0, 1))
    assert main["calls"] == [[0, 1, 10, 11]] and other["calls"] == []
    assert main["gathered"] == [0, 7] and other["gathered"] is None   # only main holds them
    if fail:
        assert main["result"] == "ValueError: bad box"
        assert other["result"] == ("RuntimeError: evaluation failed on the main process: "
                                   "ValueError: bad box")
    else:
        assert main["result"] == other["result"] == {"items": [0, 1, 10, 11]}


# ----------------------------------------------------------------------------- layering
def imported_modules(path: Path, package: str) -> set[str]:
    """Every module ``path`` imports, anywhere in it (``from detres import data`` counts as
    ``detres.data``; relative imports resolved against ``package``)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            names.add(base)
            names.update(f"{base}.{a.name}" for a in node.names)
    return names


def test_evaluation_imports_neither_data_nor_models():
    folder = Path(detres.__file__).parent / "evaluation"
    offenders = {}
    for path in sorted(folder.glob("*.py")):
        bad = sorted(n for n in imported_modules(path, "detres.evaluation")
                     if n.split(".")[:2] in (["detres", "data"], ["detres", "models"]))
        if bad:
            offenders[path.name] = bad
    assert offenders == {}
