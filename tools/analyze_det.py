#!/usr/bin/env python
"""Where do a detector's errors come from? Plots and numbers from COCO-format files alone.

    python tools/analyze_det.py --gt ANNOTATIONS.json --dt RESULTS.json --out DIR \\
        [--iou 0.5] [--score-thr 0.5]

RESULTS.json is COCO results (what tools/infer.py, tools/eval_det.py and a training run's
eval/coco_results.json hold). Writes into DIR:

  pr_curves.png                  per class: precision against recall at IoU .50 and .75
  confusion_matrix.png / .json   ground truth x prediction counts, background included
                                 (detections scoring at least --score-thr, matched at --iou),
                                 over the classes with an object or a detection counted
  error_breakdown.png            COCO error breakdown over all classes: the PR curve at IoU
                                 .75 and .50, then with localisation errors, confusion with a
                                 similar class (same supercategory), with any other class,
                                 background detections and missed objects forgiven in turn
  error_breakdown_per_class.png  the same per class
  analysis.json                  per-class AP/AP50/AP75 and each curve's area and each
                                 error's share, per class and over all classes

Every AP and share is in percent, as in eval/metrics.json: on the console, in the legends and
titles and in analysis.json.

Matching is pycocotools' (detres.evaluation.analysis explains the breakdown).
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from detres.cli import check_output_path, run_main, tool_parser
from detres.engine.logging import write_json
from detres.evaluation.analysis import Analysis
from detres.visualize import plot_confusion_matrix, plot_error_breakdown, plot_pr_curves


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = tool_parser(__doc__)
    parser.add_argument("--gt", type=Path, required=True, help="COCO-format ground-truth JSON")
    parser.add_argument("--dt", type=Path, required=True, help="COCO results JSON")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--iou", type=float, default=0.5,
                        help="confusion matrix: IoU at which a detection matches (default 0.5)")
    parser.add_argument("--score-thr", type=float, default=0.5,
                        help="confusion matrix: lowest score counted (default 0.5)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    for path in (args.gt, args.dt):
        if not path.is_file():
            raise FileNotFoundError(f"no such file: {path}")
    check_output_path(args.out, folder=True)
    analysis = Analysis(args.gt, args.dt)
    precision = analysis.precision()
    curves = analysis.per_class_curves(precision)
    breakdown = analysis.error_breakdown(precision)
    confusion = analysis.confusion_matrix(args.iou, args.score_thr)
    out = args.out
    plot_pr_curves(curves, out / "pr_curves.png")
    plot_confusion_matrix(confusion, out / "confusion_matrix.png")
    write_json(out / "confusion_matrix.json", confusion)
    plot_error_breakdown(breakdown, out / "error_breakdown.png")
    plot_error_breakdown(breakdown, out / "error_breakdown_per_class.png", per_class=True)
    summary = {
        "per_class": {name: {k: c[k] for k in ("AP", "AP50", "AP75")}
                      for name, c in curves["classes"].items()},
        "error_breakdown": {
            "overall": _areas(breakdown["overall"]),
            "per_class": {name: _areas(e) for name, e in breakdown["classes"].items()}}}
    write_json(out / "analysis.json", summary)
    overall = breakdown["overall"]
    if overall is not None:
        print("COCO error breakdown over all classes (AP in percent after forgiving each "
              "error in turn):")
        print("  " + "  ".join(f"{k} {v:.1f}" for k, v in overall["AP"].items()))
        print("  cost: " + ", ".join(f"{k} {v:.1f}" for k, v in overall["errors"].items()))
    print(f"wrote {out}: pr_curves.png, confusion_matrix.png/.json, error_breakdown.png, "
          f"error_breakdown_per_class.png, analysis.json")
    return summary


def _areas(entry: dict[str, Any] | None) -> dict[str, Any] | None:
    return None if entry is None else {"AP": entry["AP"], "errors": entry["errors"]}


if __name__ == "__main__":
    run_main(main, extra_errors=(ValueError,))   # malformed ground truth or results
