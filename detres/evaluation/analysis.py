"""Error analysis of COCO box detections: per-class precision-recall curves, a confusion matrix
with a background row and column, and the COCO error breakdown.

Every match comes from pycocotools' ``COCOeval`` (its ``evaluateImg`` greedy matching and its
``accumulate`` interpolated precision at 101 recall points), on our validated copies of the
ground truth and the results (``coco_eval.load_ground_truth`` / ``load_results``).

Error breakdown (Hoiem et al., "Diagnosing Error in Object Detectors", ECCV 2012, as the COCO
API's ``analyze()`` computes it, cocodataset.org "detection-eval" section 4). Per class, the
precision-recall curve is recomputed with one kind of error after another forgiven:

    C75  IoU 0.75                 C50  IoU 0.50
    Loc  IoU 0.10: localisation errors forgiven (duplicate detections are not)
    Sim  also forgiven: confusion with a class of the same supercategory
    Oth  also forgiven: confusion with any other class
    BG   also forgiven: detections on background (precision 1 up to the recall reached)
    FN   also forgiven: missed objects (precision 1 everywhere)

Each curve's area is an AP (percent, as every AP of detres); the step from one to the next is
that error's share in AP points, e.g. ``Loc - C50`` is what localisation costs. "Forgiven"
confusion follows the original Matlab ``analyze``: class-agnostic matching (``useCats = 0``) at
IoU 0.1 against the ground truth where the other classes' boxes are *ignored* (a detection on
one is neither right nor wrong).
pycocotools' Python ``_prepare`` overwrites an annotation's ``ignore`` with ``iscrowd``, so
``_AnalysisEval`` puts our flag back after it; setting ``iscrowd`` instead, as some ports do,
would also switch those boxes to crowd overlap (intersection over the detection's area).
The breakdown uses area "all" and 100 detections per image; a class without ground truth has
no curve (null) and is left out of the mean over classes, as in COCO AP.
"""
from __future__ import annotations

import contextlib
import io
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from detres.evaluation.coco_eval import GroundTruth, Results, load_ground_truth, load_results

COCO_IOUS = np.linspace(0.5, 0.95, 10)
CURVES = ("C75", "C50", "Loc", "Sim", "Oth", "BG", "FN")
# the error each step of the breakdown forgives, between the curve before and the one after
ERRORS = (("localization", "C50", "Loc"), ("similar_class", "Loc", "Sim"),
          ("other_class", "Sim", "Oth"), ("background", "Oth", "BG"), ("missed", "BG", "FN"))
MAX_DETS = 100
ALL_AREAS = [0.0, 1e10]


def _pycocotools_eval(gt_dataset: Mapping[str, Any], results: Sequence[Mapping[str, Any]],
                      iou_thresholds: Sequence[float], use_cats: bool) -> Any:
    """A ``COCOeval`` run through ``evaluate()`` and ``accumulate()``, area "all", 100
    detections per image. ``results`` carry their own ``id`` (1..D, never 0)."""
    with contextlib.redirect_stdout(io.StringIO()):           # pycocotools prints progress
        coco_gt, coco_dt = COCO(), COCO()
        coco_gt.dataset = dict(gt_dataset)
        coco_gt.createIndex()
        anns = [{**r, "area": r["bbox"][2] * r["bbox"][3], "iscrowd": 0} for r in results]
        coco_dt.dataset = {"images": gt_dataset["images"],
                           "categories": gt_dataset["categories"], "annotations": anns}
        coco_dt.createIndex()
        evaluator = _AnalysisEval(coco_gt, coco_dt, "bbox")
        p = evaluator.params
        p.iouThrs = np.asarray(iou_thresholds, dtype=np.float64)
        p.maxDets, p.areaRng, p.areaRngLbl = [MAX_DETS], [ALL_AREAS], ["all"]
        p.useCats = int(use_cats)
        evaluator.evaluate()
        evaluator.accumulate()
    return evaluator


class _AnalysisEval(COCOeval):
    """COCOeval that also ignores ground truth marked ``analysis_ignore`` (Matlab's
    ``ignore``; see the module docstring)."""

    def _prepare(self) -> None:
        super()._prepare()
        for gts in self._gts.values():
            for g in gts:
                g["ignore"] = int(bool(g["ignore"]) or bool(g.get("analysis_ignore", 0)))


class Analysis:
    """Ground truth and results, validated and numbered; the analyses are its methods.

    Args:
        gt: a COCO-format path, dict or COCO object (never modified).
        results: COCO results, a list or a JSON path (never modified); a malformed entry, or
            one naming an unknown image or category, is a ``ValueError`` naming it.
    """

    def __init__(self, gt: GroundTruth, results: Results) -> None:
        self.gt = load_ground_truth(gt)
        self.results = [{**r, "id": n} for n, r in
                        enumerate(load_results(results, self.gt), start=1)]
        cats = sorted(self.gt["categories"], key=lambda c: c["id"])
        self.category_ids = [c["id"] for c in cats]
        self.class_names = [str(c.get("name", c["id"])) for c in cats]
        self.supercategory = {c["id"]: c.get("supercategory") or f"<{c['id']}>" for c in cats}

    # ------------------------------------------------------------------ PR and breakdown
    def precision(self) -> np.ndarray:
        """(12, 101, K) interpolated precision at 101 recall points per class: IoU 0.50,
        0.55, ..., 0.95 (COCO's ten), then 0.10; -1 for a class without ground truth."""
        ious = [*COCO_IOUS, 0.1]
        return _pycocotools_eval(self.gt, self.results, ious, True).eval["precision"][
            :, :, :, 0, 0]

    def per_class_curves(self, precision: np.ndarray | None = None) -> dict[str, Any]:
        """``{"recall": 101 points, "classes": {name: {"AP", "AP50", "AP75" (percent, or None),
        "precision50", "precision75": 101 values}}}``."""
        p = self.precision() if precision is None else precision
        classes = {}
        for k, name in enumerate(self.class_names):
            has_gt = bool((p[:10, :, k] > -1).any())
            classes[name] = {
                "AP": float(p[:10, :, k].mean() * 100) if has_gt else None,
                "AP50": float(p[0, :, k].mean() * 100) if has_gt else None,
                "AP75": float(p[5, :, k].mean() * 100) if has_gt else None,
                "precision50": np.clip(p[0, :, k], 0, 1).tolist(),
                "precision75": np.clip(p[5, :, k], 0, 1).tolist()}
        return {"recall": np.linspace(0, 1, 101).tolist(), "classes": classes}

    def _forgiven(self, category_id: int, similar_only: bool) -> np.ndarray:
        """(101,) precision of one class's detections at IoU 0.1, matched to every class's
        ground truth, the other classes' boxes (of its supercategory, with ``similar_only``)
        ignored."""
        sup = self.supercategory[category_id]
        anns = [{**a, "analysis_ignore": int(a["category_id"] != category_id)}
                for a in self.gt["annotations"]
                if not similar_only or self.supercategory[a["category_id"]] == sup]
        dets = [r for r in self.results if r["category_id"] == category_id]
        evaluator = _pycocotools_eval({**self.gt, "annotations": anns}, dets, [0.1], False)
        return evaluator.eval["precision"][0, :, 0, 0, 0]

    def error_breakdown(self, precision: np.ndarray | None = None) -> dict[str, Any]:
        """The COCO error breakdown (module docstring).

        Returns:
            ``{"recall": 101 points, "classes": {name: {"curves": {C75..FN: 101 values},
            "AP": {C75..FN: area}, "errors": {localization..missed: share}} or None},
            "overall": the same averaged over the classes with ground truth}``; curves are
            precision (0-1), areas and shares percent.
        """
        p = self.precision() if precision is None else precision
        classes: dict[str, Any] = {}
        for k, (cat, name) in enumerate(zip(self.category_ids, self.class_names)):
            if not (p[0, :, k] > -1).any():
                classes[name] = None
                continue
            curves = {"C75": p[5, :, k], "C50": p[0, :, k], "Loc": p[10, :, k],
                      "Sim": self._forgiven(cat, similar_only=True),
                      "Oth": self._forgiven(cat, similar_only=False)}
            curves = {key: np.clip(c, 0, None) for key, c in curves.items()}  # -1 -> 0
            curves["BG"] = (curves["Oth"] > 0).astype(np.float64)
            curves["FN"] = np.ones_like(curves["Oth"])
            classes[name] = _summary(curves)
        measured = [c for c in classes.values() if c is not None]
        overall = (_summary({key: np.mean([c["curves"][key] for c in measured], axis=0)
                             for key in CURVES}) if measured else None)
        return {"recall": np.linspace(0, 1, 101).tolist(), "classes": classes,
                "overall": overall}

    # ------------------------------------------------------------------ confusion
    def confusion_matrix(self, iou_threshold: float = 0.5,
                         score_threshold: float = 0.5) -> dict[str, Any]:
        """Ground truth x prediction counts over the classes that occur and background (last).

        Detections scoring below ``score_threshold`` are dropped. First COCO's own matching
        (per class, at ``iou_threshold``) finds the correct detections (the diagonal); then
        the detections and ground truth it left unmatched are matched class-agnostically,
        each such pair a confusion (row: true class, column: predicted class). A detection
        still unmatched is background (the last row), an object still unmatched is missed
        (the last column). Detections on crowd regions count nowhere, as in COCO AP; a
        duplicate of a found object is background. A class with neither an object nor a
        detection counted is left out: its row and column would be empty (most of COCO's 80
        on a small set).

        Returns:
            ``{"classes": the names of the C classes that occur + "background", "matrix":
            (C+1) x (C+1) counts, "iou_threshold", "score_threshold"}``.
        """
        dets = [r for r in self.results if r["score"] >= score_threshold]
        label = {c: k for k, c in enumerate(self.category_ids)}
        bg = len(self.category_ids)
        matrix = np.zeros((bg + 1, bg + 1), dtype=np.int64)
        gt_cat = {a["id"]: a["category_id"] for a in self.gt["annotations"]}
        dt_cat = {r["id"]: r["category_id"] for r in dets}
        matched, used_dt, used_gt = self._matches(self.gt, dets, iou_threshold, True)
        for d, g in matched:
            matrix[label[gt_cat[g]], label[dt_cat[d]]] += 1
        left_gt = [a for a in self.gt["annotations"]
                   if a["id"] not in used_gt and not a.get("iscrowd", 0)]
        left_dt = [r for r in dets if r["id"] not in used_dt]
        matched, confused_dt, confused_gt = self._matches(
            {**self.gt, "annotations": left_gt}, left_dt, iou_threshold, False)
        for d, g in matched:
            matrix[label[gt_cat[g]], label[dt_cat[d]]] += 1
        for r in left_dt:
            if r["id"] not in confused_dt:
                matrix[bg, label[r["category_id"]]] += 1
        for a in left_gt:
            if a["id"] not in confused_gt:
                matrix[label[a["category_id"]], bg] += 1
        keep = [k for k in range(bg) if matrix[k].any() or matrix[:, k].any()] + [bg]
        return {"classes": [*(self.class_names[k] for k in keep[:-1]), "background"],
                "matrix": matrix[np.ix_(keep, keep)].tolist(),
                "iou_threshold": iou_threshold, "score_threshold": score_threshold}

    @staticmethod
    def _matches(gt: Mapping[str, Any], dets: list[dict], iou: float, use_cats: bool
                 ) -> tuple[list[tuple[int, int]], set[int], set[int]]:
        """COCOeval's matches at ``iou``: (detection id, ground-truth id) pairs of regular
        ground truth, plus the ids of every detection and ground truth it used up (those
        on crowd regions included)."""
        if not dets:
            return [], set(), set()
        evaluator = _pycocotools_eval(gt, dets, [iou], use_cats)
        pairs, used_dt, used_gt = [], set(), set()
        for e in evaluator.evalImgs:
            if e is None:
                continue
            for d, g, ignored in zip(e["dtIds"], e["dtMatches"][0], e["dtIgnore"][0]):
                if g > 0:
                    used_dt.add(int(d))
                    used_gt.add(int(g))
                    if not ignored:
                        pairs.append((int(d), int(g)))
        return pairs, used_dt, used_gt


def _summary(curves: dict[str, np.ndarray]) -> dict[str, Any]:
    areas = {key: float(np.mean(curves[key]) * 100) for key in CURVES}
    return {"curves": {key: curves[key].tolist() for key in CURVES}, "AP": areas,
            "errors": {name: areas[after] - areas[before] for name, before, after in ERRORS}}
