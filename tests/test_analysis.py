"""Error analysis (detres.evaluation.analysis, tools/analyze_det.py) on hand-made cases whose
answers are worked out in the comments, and per-class AP against the evaluator on coco128."""
import json
import math
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import load_tool, perturbed_results

from detres.evaluation.analysis import Analysis
from detres.evaluation.coco_eval import evaluate_coco

TOOL = Path(__file__).resolve().parents[1] / "tools" / "analyze_det.py"
COCO128 = Path(__file__).resolve().parents[2] / "shared" / "data" / "coco128" / "annotations.json"
BOX = [10.0, 10.0, 40.0, 40.0]
CATS = [{"id": 1, "name": "cat", "supercategory": "animal"},
        {"id": 2, "name": "dog", "supercategory": "animal"},
        {"id": 3, "name": "car", "supercategory": "vehicle"}]


def gt_of(*anns, num_images=6):
    images = [{"id": i, "width": 100, "height": 100, "file_name": f"{i}.png"}
              for i in range(1, num_images + 1)]
    return {"images": images, "categories": CATS,
            "annotations": [{"iscrowd": 0, **a} for a in anns]}


def ann(image_id, category_id, bbox=BOX, **extra):
    return {"image_id": image_id, "category_id": category_id, "bbox": list(bbox), **extra}


def det(image_id, category_id, score, bbox=BOX):
    return {"image_id": image_id, "category_id": category_id, "bbox": list(bbox),
            "score": score}


# One dog found (0.90) below three wrong "dog" detections: on a car (0.97, another
# supercategory), on a cat (0.95, same supercategory) and on nothing (0.93); one cat missed.
# dog's precision at its only recall level (1.0) after forgiving, in turn:
#   nothing: 1/4; localisation: still 1/4; similar class (the cat): 1/3; other class (the
#   car): 1/2; background: 1.
MIXED_GT = gt_of(ann(1, 2), ann(2, 1), ann(3, 3), ann(5, 1))
MIXED_DT = [det(1, 2, 0.90), det(2, 2, 0.95), det(3, 2, 0.97), det(4, 2, 0.93)]


def test_shifted_detection_is_a_localisation_error():
    # IoU of [10, 10, 40, 40] and [30, 10, 40, 40] is 20*40 / (2*1600 - 800) = 1/3
    a = Analysis(gt_of(ann(1, 1)), [det(1, 1, 0.9, [30.0, 10.0, 40.0, 40.0])])
    cat = a.error_breakdown()["classes"]["cat"]
    assert cat["AP"]["C50"] == 0.0 and cat["AP"]["Loc"] == pytest.approx(100.0)   # percent
    assert cat["errors"] == pytest.approx({"localization": 100.0, "similar_class": 0.0,
                                           "other_class": 0.0, "background": 0.0,
                                           "missed": 0.0})


def test_each_wrong_detection_is_charged_to_its_own_error():
    b = Analysis(MIXED_GT, MIXED_DT).error_breakdown()
    dog = b["classes"]["dog"]
    assert dog["AP"] == pytest.approx({"C75": 100 / 4, "C50": 100 / 4, "Loc": 100 / 4,
                                       "Sim": 100 / 3, "Oth": 100 / 2, "BG": 100, "FN": 100})
    assert dog["errors"] == pytest.approx({"localization": 0.0, "similar_class": 100 / 12,
                                           "other_class": 100 / 6, "background": 100 / 2,
                                           "missed": 0.0})
    for name in ("cat", "car"):       # never detected: all of it is missed
        assert b["classes"][name]["errors"]["missed"] == 100.0
        assert b["classes"][name]["AP"]["BG"] == 0.0
    assert b["overall"]["AP"]["C50"] == pytest.approx(100 / 12)   # mean over the 3 classes
    assert b["overall"]["errors"]["missed"] == pytest.approx(200 / 3)


def test_a_small_box_inside_a_similar_class_object_is_background_not_confusion():
    # the dog box lies inside the cat box: IoU 100/10000 = 0.01 < 0.1, so no match even with
    # class confusion forgiven (treating the cat as a crowd region would forgive it: IoA 1)
    gt = gt_of(ann(1, 2), ann(2, 1, [0.0, 0.0, 100.0, 100.0]))
    dt = [det(1, 2, 0.5), det(2, 2, 0.9, [10.0, 10.0, 10.0, 10.0])]
    dog = Analysis(gt, dt).error_breakdown()["classes"]["dog"]
    assert dog["errors"]["similar_class"] == 0.0
    assert dog["errors"]["background"] == pytest.approx(50.0)


def test_class_without_ground_truth_has_no_breakdown():
    b = Analysis(gt_of(ann(1, 1)), [det(1, 1, 0.9), det(2, 3, 0.8)]).error_breakdown()
    assert b["classes"]["dog"] is None and b["classes"]["car"] is None
    assert b["overall"]["AP"]["C50"] == pytest.approx(100.0)   # the mean is over cat alone


def test_confusion_matrix_counts_matches_confusions_background_and_misses():
    gt = gt_of(*MIXED_GT["annotations"], ann(6, 3, iscrowd=1))
    dt = [*MIXED_DT, det(1, 2, 0.6, [11.0, 10.0, 40.0, 40.0]),   # duplicate of the found dog
          det(6, 3, 0.8),                                          # on a crowd region
          det(4, 1, 0.3)]                                          # below --score-thr
    confusion = Analysis(gt, dt).confusion_matrix(iou_threshold=0.5, score_threshold=0.5)
    assert confusion["classes"] == ["cat", "dog", "car", "background"]
    #                               predicted: cat dog car background
    assert confusion["matrix"] == [[0, 1, 0, 1],      # cat: called dog once, missed once
                                   [0, 1, 0, 0],      # dog: found
                                   [0, 1, 0, 0],      # car: called dog
                                   [0, 2, 0, 0]]      # background: the 0.93 dog, duplicate


def test_confusion_prefers_the_right_class_over_a_higher_scoring_wrong_one():
    # class-agnostic matching alone would give the cat to the 0.9 dog; COCO's per-class
    # matching first gives it to the 0.6 cat, so the dog is background
    confusion = Analysis(gt_of(ann(1, 1)), [det(1, 2, 0.9), det(1, 1, 0.6)]).confusion_matrix()
    assert confusion["classes"] == ["cat", "dog", "background"]   # no car: left out
    assert confusion["matrix"][0] == [1, 0, 0] and confusion["matrix"][2] == [0, 1, 0]


@pytest.mark.skipif(not COCO128.is_file(), reason=f"coco128 not found at {COCO128}")
def test_per_class_ap_and_matrix_totals_agree_with_the_evaluator_on_coco128():
    gt = json.loads(COCO128.read_text())
    results = perturbed_results(gt, seed=3)
    a = Analysis(gt, results)
    precision = a.precision()
    curves = a.per_class_curves(precision)["classes"]
    reference = evaluate_coco(gt, results, engine="pycocotools")["per_class"]
    for name, ap in reference.items():
        if math.isnan(ap):
            assert curves[name]["AP"] is None
        else:
            assert curves[name]["AP"] == pytest.approx(ap, abs=1e-9)
    confusion = a.confusion_matrix(score_threshold=0.0)
    matrix, names = np.array(confusion["matrix"]), confusion["classes"][:-1]
    objects = [g for g in gt["annotations"] if not g.get("iscrowd", 0)]
    label = {c: names.index(n) for c, n in zip(a.category_ids, a.class_names) if n in names}
    k = len(names)
    per_class = np.bincount([label[g["category_id"]] for g in objects], minlength=k)
    assert (matrix[:k].sum(axis=1) == per_class).all()   # every object counted once
    # every detection once, but those on the 10 crowd regions (about as many: the results
    # copy 85% of the boxes)
    found = matrix[:, :k].sum(axis=0)
    made = np.bincount([label[r["category_id"]] for r in results], minlength=k)
    assert (found <= made).all() and 0 < made.sum() - found.sum() <= 20


def test_tool_writes_the_pictures_and_numbers(tmp_path):
    (tmp_path / "gt.json").write_text(json.dumps(MIXED_GT))
    (tmp_path / "dt.json").write_text(json.dumps(MIXED_DT))
    out = tmp_path / "out"
    summary = load_tool("analyze_det").main(["--gt", str(tmp_path / "gt.json"), "--dt",
                                             str(tmp_path / "dt.json"), "--out", str(out)])
    for name in ("pr_curves", "confusion_matrix", "error_breakdown",
                 "error_breakdown_per_class"):
        with Image.open(out / f"{name}.png") as im:
            assert im.size[0] > 200 and im.size[1] > 200
    assert json.loads((out / "analysis.json").read_text()) == summary
    assert summary["error_breakdown"]["per_class"]["dog"]["errors"]["background"] == 50.0
    assert summary["per_class"]["dog"]["AP50"] == pytest.approx(25.0)
    confusion = json.loads((out / "confusion_matrix.json").read_text())
    assert confusion["matrix"][2] == [0, 1, 0, 0]


def test_tool_names_a_bad_result_in_one_line(tmp_path, monkeypatch, capsys):
    (tmp_path / "gt.json").write_text(json.dumps(MIXED_GT))
    (tmp_path / "dt.json").write_text(json.dumps([det(1, 9, 0.5)]))
    monkeypatch.setattr(sys, "argv", ["analyze_det.py", "--gt", str(tmp_path / "gt.json"),
                                      "--dt", str(tmp_path / "dt.json"), "--out",
                                      str(tmp_path / "out")])
    with pytest.raises(SystemExit) as e:      # the script as run from the command line
        runpy.run_path(str(TOOL), run_name="__main__")
    err = capsys.readouterr().err
    assert e.value.code == 1 and err.count("\n") == 1 and err.startswith("error: ")
    assert "category id 9" in err and "dt.json" in err
    assert not (tmp_path / "out").exists()
