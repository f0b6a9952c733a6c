"""Evaluate object detections (DESIGN.md section 4).

From files alone:

    python tools/eval_det.py --gt ANNOTATIONS.json --dt RESULTS.json \
        [--metric coco|voc07|voc12] [--out FILE]

``ANNOTATIONS.json`` is COCO-format ground truth, ``RESULTS.json`` COCO results (a list of
``{"image_id", "category_id", "bbox": [x, y, w, h], "score"}`` in original pixels). ``coco`` gives
the twelve COCO AP/AR numbers and per-class AP; ``voc07``/``voc12`` give VOC AP at IoU 0.5 per
class and their mean, where an annotation whose ``difficult`` or ``ignore`` flag is set, or a
crowd region, is a difficult box (neither a true nor a false positive). All numbers are percent.
The table goes to the console; ``--out`` writes ``{"bbox": metrics}`` as JSON (``nan``, a class
without ground truth, is written as ``null``).

From a trained model:

    python tools/eval_det.py CONFIG --weights W [key=value ...]
"""
from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path
from typing import Any

from detres.evaluation.coco_eval import (evaluate_coco, format_metrics_table, load_ground_truth,
                                         load_results)
from detres.evaluation.voc_eval import coco_to_voc_inputs, evaluate_voc


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Evaluate detections: from COCO-format files (--gt/--dt) or from a model "
                    "(CONFIG --weights).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="VOC metrics from files: an annotation with a true 'difficult' or 'ignore' flag, or "
               "'iscrowd', is a difficult box.")
    parser.add_argument("config", nargs="?", help="model mode: YAML config of the trained detector")
    parser.add_argument("overrides", nargs="*", help="model mode: key=value config overrides")
    parser.add_argument("--weights", help="model mode: checkpoint to evaluate")
    parser.add_argument("--gt", type=Path, help="file mode: COCO-format ground-truth JSON")
    parser.add_argument("--dt", type=Path, help="file mode: COCO results JSON")
    parser.add_argument("--metric", choices=("coco", "voc07", "voc12"), default="coco",
                        help="coco: COCO AP/AR (default); voc07: VOC 11-point AP; "
                             "voc12: VOC area AP")
    parser.add_argument("--engine", choices=("faster", "pycocotools"), default="faster",
                        help="COCO engine: faster-coco-eval (default) or the pycocotools reference")
    parser.add_argument("--out", type=Path, help="write the metrics here as JSON")
    # intermixed: options may sit between positionals, as in CONFIG --weights W key=value
    return parser.parse_intermixed_args(argv)


def evaluate_files(gt: str | os.PathLike, dt: str | os.PathLike, metric: str = "coco",
                   engine: str = "faster") -> dict[str, Any]:
    """Metrics of a COCO results file against a COCO-format ground-truth file."""
    if metric == "coco":
        return evaluate_coco(gt, dt, engine=engine)
    gt_dataset = load_ground_truth(gt)
    results = load_results(dt, gt_dataset)
    gt_per_image, dets_per_image, class_names = coco_to_voc_inputs(gt_dataset, results)
    return evaluate_voc(gt_per_image, dets_per_image, class_names, metric=metric)


def evaluate_model(config: str, weights: str | None, overrides: list[str]) -> dict[str, Any]:
    """Model mode: the detector of ``config`` with ``weights``, evaluated on ``data.val`` as
    ``tools/train_det.py --eval-only`` does (distributed under torchrun; the main rank also
    writes ``eval/metrics.json`` and ``eval/coco_results.json`` under ``train.output_dir``)."""
    if not weights:
        raise SystemExit("model mode needs --weights W (a detection checkpoint)")
    import train_det  # tools/ is on sys.path as the script's own folder
    return train_det.main([config, *overrides, "--eval-only", "--weights", weights],
                          summary_only=False)


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    return value


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.config is not None:
        if args.gt or args.dt:
            raise SystemExit("give either CONFIG --weights W (model mode) or --gt/--dt "
                             "(file mode), not both")
        metrics = evaluate_model(args.config, args.weights, args.overrides)
    else:
        if args.gt is None or args.dt is None:
            raise SystemExit("file mode needs both --gt ANNOTATIONS.json and --dt RESULTS.json "
                             "(see --help)")
        for path in (args.gt, args.dt):
            if not path.is_file():
                raise SystemExit(f"no such file: {path}")
        try:
            metrics = evaluate_files(args.gt, args.dt, args.metric, args.engine)
        except ValueError as e:
            raise SystemExit(f"error: {e}") from None
    print(f"{args.metric} box metrics (percent):")
    print(format_metrics_table(metrics))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_name(args.out.name + ".tmp")
        tmp.write_text(json.dumps({"bbox": _json_safe(metrics)}, indent=2) + "\n")
        os.replace(tmp, args.out)  # atomic, as every write in detres
        print(f"wrote {args.out}")
    return metrics


if __name__ == "__main__":
    from common import run_main  # tools/ is on sys.path as the script's own folder
    run_main(main)
