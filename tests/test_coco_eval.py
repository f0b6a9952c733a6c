"""COCO evaluation: both engines against pycocotools called directly, and the traps it guards."""
from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import perturbed_results, pycocotools_direct

from detres.evaluation.coco_eval import (STAT_NAMES, detections_to_coco_results, evaluate_coco,
                                         format_metrics_table, load_results, merge_results)
from detres.structures import Detections, Targets

COCO128 = Path(__file__).resolve().parents[2] / "shared" / "data" / "coco128" / "annotations.json"
needs_coco128 = pytest.mark.skipif(not COCO128.is_file(), reason=f"coco128 not found at {COCO128}")


@pytest.fixture(scope="module")
def coco128() -> dict:
    with open(COCO128) as f:
        return json.load(f)


def stats_of(metrics: dict) -> np.ndarray:
    return np.array([metrics[k] for k in STAT_NAMES])


def tiny_gt(annotations: list[dict]) -> dict:
    return {"images": [{"id": 1, "width": 200, "height": 200}, {"id": 2, "width": 200, "height": 200}],
            "categories": [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}],
            "annotations": annotations}


def det(image_id: int, category_id: int, bbox: list[float], score: float) -> dict:
    return {"image_id": image_id, "category_id": category_id, "bbox": bbox, "score": score}


@needs_coco128
@pytest.mark.parametrize("engine", ["faster", "pycocotools"])
def test_all_twelve_stats_match_pycocotools_on_coco128(coco128, engine):
    results = perturbed_results(coco128)
    ref_stats, ref_precision = pycocotools_direct(coco128, results)
    metrics = evaluate_coco(coco128, results, engine=engine)
    np.testing.assert_allclose(stats_of(metrics), ref_stats, rtol=0, atol=1e-9)
    assert 10 < metrics["AP"] < 80                                   # a non-trivial problem
    # per-class AP as detectron2 computes it from the reference's precision array
    for k, cat in enumerate(sorted(coco128["categories"], key=lambda c: c["id"])):
        p = ref_precision[:, :, k, 0, -1]
        expected = p[p > -1].mean() * 100 if (p > -1).any() else math.nan
        assert metrics["per_class"][cat["name"]] == pytest.approx(expected, abs=1e-9, nan_ok=True)
    assert math.isnan(metrics["per_class"]["toaster"])               # no toaster in coco128


def test_engines_agree_with_crowd_regions():
    gt = tiny_gt([
        {"id": 1, "image_id": 1, "category_id": 3, "bbox": [10, 10, 50, 50], "area": 2000, "iscrowd": 0},
        {"id": 2, "image_id": 1, "category_id": 3, "bbox": [100, 100, 90, 90], "area": 7000, "iscrowd": 1},
        {"id": 3, "image_id": 2, "category_id": 7, "bbox": [0, 0, 20, 20], "area": 300, "iscrowd": 0},
        {"id": 4, "image_id": 2, "category_id": 7, "bbox": [50, 50, 100, 120], "area": 9000, "iscrowd": 0},
    ])
    results = [det(1, 3, [11, 10, 50, 48], 0.5),
               det(1, 3, [110, 110, 40, 40], 0.9),   # inside the crowd region: ignored, not a FP
               det(1, 3, [120, 120, 30, 30], 0.8),   # a crowd region matches any number of them
               det(2, 7, [1, 1, 18, 20], 0.7), det(2, 7, [60, 40, 100, 100], 0.6),
               det(2, 7, [150, 0, 20, 20], 0.95)]     # a false positive
    ref, _ = pycocotools_direct(gt, results)
    for engine in ("faster", "pycocotools"):
        np.testing.assert_allclose(stats_of(evaluate_coco(gt, results, engine=engine)), ref, atol=1e-9)
    # Without the false positive, the crowd detections cost nothing: AP50 = 100.
    assert evaluate_coco(gt, results[:5])["AP50"] == pytest.approx(100.0)


@needs_coco128
def test_perfect_detections_give_ap_100(coco128):
    results = [det(a["image_id"], a["category_id"], a["bbox"], 1.0)
               for a in coco128["annotations"] if not a["iscrowd"]]
    for engine in ("faster", "pycocotools"):
        metrics = evaluate_coco(coco128, results, engine=engine)
        for k in ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR100"):
            assert metrics[k] == pytest.approx(100.0), (engine, k)


@pytest.mark.parametrize("engine", ["faster", "pycocotools"])
def test_empty_results_warn_and_give_zero(engine):
    gt = tiny_gt([{"id": 1, "image_id": 1, "category_id": 3, "bbox": [10, 10, 50, 50], "area": 2500}])
    with pytest.warns(UserWarning, match="no detections"):
        metrics = evaluate_coco(gt, [], engine=engine)
    assert metrics["AP"] == 0 and metrics["AR100"] == 0 and metrics["APm"] == 0
    assert math.isnan(metrics["APs"])                    # no small object to measure
    assert metrics["per_class"]["cat"] == 0 and math.isnan(metrics["per_class"]["dog"])


def test_annotation_id_zero_is_matched():
    gt = tiny_gt([{"id": 0, "image_id": 1, "category_id": 3, "bbox": [10, 10, 20, 20], "area": 400,
                   "iscrowd": 0}])
    results = [det(1, 3, [10, 10, 20, 20], 0.9)]
    raw, _ = pycocotools_direct(gt, results)
    assert raw[0] == 0            # the trap: pycocotools reads a match with id 0 as "unmatched"
    for engine in ("faster", "pycocotools"):
        assert evaluate_coco(gt, results, engine=engine)["AP"] == pytest.approx(100.0)
    assert gt["annotations"][0]["id"] == 0                   # renumbered in our copy only


@pytest.mark.parametrize("bad, message", [
    (det(99, 3, [0, 0, 5, 5], 0.5), "image id 99"),
    (det(1, 4, [0, 0, 5, 5], 0.5), "category id 4"),
    (det(1, 3, [0, 0, -5, 5], 0.5), "negative width or height"),
    (det(1, 3, [0, 0, 5, float("nan")], 0.5), "non-finite"),
    (det(1, 3, [0, 0, 5, 5], float("inf")), "non-finite"),
    ({"image_id": 1, "category_id": 3, "bbox": [0, 0, 5], "score": 0.5}, "not a COCO box detection"),
    ({"image_id": 1, "category_id": 3, "score": 0.5}, "not a COCO box detection"),
    (det(1.5, 3, [0, 0, 5, 5], 0.5), "ids are integers"),
])
def test_bad_results_raise_naming_entry_and_file(tmp_path, bad, message):
    gt = tiny_gt([{"id": 1, "image_id": 1, "category_id": 3, "bbox": [10, 10, 50, 50], "area": 2500}])
    path = tmp_path / "results.json"
    path.write_text(json.dumps([det(1, 3, [10, 10, 50, 50], 0.9), bad]))
    with pytest.raises(ValueError, match=message) as info:
        evaluate_coco(gt, path)
    assert str(path) in str(info.value) and "result 1" in str(info.value)


@pytest.mark.parametrize("engine", ["faster", "pycocotools"])
def test_callers_results_and_ground_truth_are_not_modified(engine):
    gt = tiny_gt([{"id": 5, "image_id": 1, "category_id": 3, "bbox": [10, 10, 50, 50], "area": 2500,
                   "iscrowd": 0}])
    results = [det(1, 3, [10, 10, 50, 50], 0.9), det(2, 7, [0, 0, 5, 5], 0.2)]
    gt_before, results_before = copy.deepcopy(gt), copy.deepcopy(results)
    evaluate_coco(gt, results, engine=engine)
    assert results == results_before and gt == gt_before


def test_merge_results_drops_images_repeated_by_padding():
    # 5 images on 2 ranks; the padded sampler gives rank 1 image 1 again (indices 0,2,4 | 1,3,0).
    rank0 = [det(1, 3, [0, 0, 5, 5], 0.9), det(1, 7, [1, 1, 5, 5], 0.8), det(3, 3, [0, 0, 5, 5], 0.7),
             det(5, 3, [0, 0, 5, 5], 0.6)]
    rank1 = [det(2, 3, [0, 0, 5, 5], 0.5), det(4, 3, [0, 0, 5, 5], 0.4),
             det(1, 3, [0, 0, 5, 5], 0.9), det(1, 7, [1, 1, 5, 5], 0.8)]
    merged = merge_results([rank0, rank1])
    assert merged == rank0 + rank1[:2]
    assert merge_results([rank0 + rank0[:2]]) == rank0          # a repeat on the same rank
    assert merge_results([[], rank1]) == rank1


def test_detections_to_coco_results_round_trip_with_scale():
    gt = tiny_gt([
        {"id": 1, "image_id": 1, "category_id": 3, "bbox": [10.0, 20.0, 40.0, 30.0], "area": 1200},
        {"id": 2, "image_id": 2, "category_id": 7, "bbox": [5.0, 6.0, 100.0, 50.0], "area": 5000},
    ])
    scales = {1: 1.5, 2: 0.8}
    detections, infos = [], []
    for image_id in (1, 2):
        anns = [a for a in gt["annotations"] if a["image_id"] == image_id]
        xyxy = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)])
        labels = torch.tensor([[3, 7].index(a["category_id"]) for a in anns])
        resized = xyxy * scales[image_id]                       # what the model sees and returns
        detections.append(Detections(resized, torch.full((len(anns),), 0.9), labels))
        infos.append(Targets(resized, labels, image_id, scales[image_id], (200, 200)))
    results = detections_to_coco_results(detections, infos, [3, 7])
    assert [r["image_id"] for r in results] == [1, 2] and [r["category_id"] for r in results] == [3, 7]
    for r, a in zip(results, gt["annotations"]):
        np.testing.assert_allclose(r["bbox"], a["bbox"], atol=1e-4)
    # (image_id, scale) pairs and a {label: category id} mapping work the same way
    again = detections_to_coco_results(detections, [(1, 1.5), (2, 0.8)], {0: 3, 1: 7})
    assert again == results
    assert evaluate_coco(gt, results)["AP"] == pytest.approx(100.0)
    assert detections_to_coco_results([Detections.empty()], [(1, 1.0)], [3, 7]) == []
    with pytest.raises(ValueError, match="label 1 has no category id"):
        detections_to_coco_results(detections[1:], infos[1:], [3])
    negative = Detections(torch.tensor([[0.0, 0, 5, 5]]), torch.tensor([0.5]), torch.tensor([-1]))
    with pytest.raises(ValueError, match="label -1 has no category id"):    # no wrap-around
        detections_to_coco_results([negative], [(1, 1.0)], [3, 7])


@pytest.mark.parametrize("engine", ["faster", "pycocotools"])
def test_quiet_unless_verbose(capfd, engine):
    gt = tiny_gt([{"id": 1, "image_id": 1, "category_id": 3, "bbox": [10, 10, 50, 50], "area": 2500}])
    evaluate_coco(gt, [det(1, 3, [10, 10, 50, 50], 0.9)], engine=engine)
    assert capfd.readouterr().out == ""
    evaluate_coco(gt, [det(1, 3, [10, 10, 50, 50], 0.9)], engine=engine, verbose=True)
    assert "Average Precision" in capfd.readouterr().out


def test_options_and_table():
    gt = tiny_gt([{"id": 1, "image_id": 1, "category_id": 3, "bbox": [10, 10, 50, 50], "area": 2500},
                  {"id": 2, "image_id": 2, "category_id": 3, "bbox": [10, 10, 50, 50], "area": 2500}])
    results = [det(1, 3, [10, 10, 50, 50], 0.9)]
    assert evaluate_coco(gt, results)["AR100"] == pytest.approx(50.0)   # image 2 missed
    only_1 = evaluate_coco(gt, results, image_ids=[1], class_names=["kitten", "puppy"])
    assert only_1["AR100"] == pytest.approx(100.0) and only_1["per_class"]["kitten"] == pytest.approx(100.0)
    with pytest.raises(ValueError, match="2 categories"):
        evaluate_coco(gt, results, class_names=["kitten"])
    with pytest.raises(ValueError, match="engine"):
        evaluate_coco(gt, results, engine="detectron2")
    assert load_results(results, gt) == results and load_results(results, gt)[0] is not results[0]
    table = format_metrics_table(only_1)
    assert "AP50" in table and "AR100" in table and "kitten" in table and "100.00" in table
