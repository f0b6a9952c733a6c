r"""Evaluate object detections (docs/architecture.md, Command line).

From files alone:

    python tools/eval_det.py --gt ANNOTATIONS.json --dt RESULTS.json \
        [--metric coco|voc07|voc12|imagenet_det] [--out FILE]

``ANNOTATIONS.json`` is COCO-format ground truth, ``RESULTS.json`` COCO results (a list of
``{"image_id", "category_id", "bbox": [x, y, w, h], "score"}`` in original pixels). ``coco`` gives
the twelve COCO AP/AR numbers and per-class AP; ``voc07``/``voc12`` give VOC AP at IoU 0.5 per
class and their mean, where an annotation whose ``difficult`` or ``ignore`` flag is set, or a
crowd region, is a difficult box (neither a true nor a false positive). All numbers are percent.
The table goes to the console; ``--out`` writes ``{"bbox": metrics}`` as JSON (``nan``, a class
without ground truth, is written as ``null``).

From a trained model:

    python tools/eval_det.py [CONFIG] --weights W [W2 ...] [key=value ...] [--metric M]
        [--engine E] [--format-only]

evaluates on the config's ``data.val`` (without CONFIG: the config stored in the first
checkpoint) as ``tools/train_det.py --eval-only`` does; ``--metric``
and ``--engine`` override the config's ``test.metric`` (and the default COCO engine), as in
file mode. Several ``--weights`` are an ensemble (He et al. 2015, Appendix B): the union of
their proposals, each region scored by every model, scores and boxes averaged. The test-time
improvements are config keys: ``test.box_refinement=true``, ``test.scales=[200,400,600,800,1000]``,
``test.flip=true``. ``--format-only`` (``test.format_only=true``) writes the results for an
evaluation server (COCO test-dev: ``eval/coco_results.json``; VOC 2012 test: the devkit's
``comp4_det_test_<class>.txt`` files) without scoring. Its records (config.yaml, env.json,
log.txt, eval/) go to a new ``eval_only/<YYYYmmdd-HHMMSS>/`` beside the (first) checkpoint, or
under ``train.output_dir`` when it is given on the command line; the last line logged names
that folder. The training run's own records there are left alone.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from detres.cli import is_override, override_keys, run_main
from detres.config import load_config
from detres.engine.launch import beside_weights
from detres.evaluation.coco_eval import format_metrics_table
from detres.evaluation.detection import evaluate_files, write_eval
from detres.tasks import detection


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Evaluate detections: from COCO-format files (--gt/--dt) or from a model "
                    "([CONFIG] --weights).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="VOC metrics from files: an annotation with a true 'difficult' or 'ignore' flag, or "
               "'iscrowd', is a difficult box.")
    parser.add_argument("config", nargs="?",
                        help="model mode: YAML config of the trained detector (default: the "
                             "one stored in the checkpoint)")
    parser.add_argument("overrides", nargs="*", help="model mode: key=value config overrides")
    parser.add_argument("--weights", nargs="+",
                        help="model mode: checkpoint to evaluate; several: an ensemble")
    parser.add_argument("--format-only", action="store_true",
                        help="model mode: write the results files only, no scoring "
                             "(test-dev, VOC 2012 test)")
    parser.add_argument("--gt", type=Path, help="file mode: COCO-format ground-truth JSON")
    parser.add_argument("--dt", type=Path, help="file mode: COCO results JSON")
    parser.add_argument("--metric", choices=("coco", "voc07", "voc12", "imagenet_det"),
                        default=None,
                        help="coco: COCO AP/AR (default in file mode); voc07: VOC 11-point AP; "
                             "voc12: VOC area AP; imagenet_det: area AP with ILSVRC's lower IoU "
                             "threshold for small boxes; in model mode the default is the "
                             "config's test.metric")
    parser.add_argument("--engine", choices=("faster", "pycocotools"), default="faster",
                        help="COCO engine: faster-coco-eval (default) or the pycocotools reference")
    parser.add_argument("--out", type=Path, help="write the metrics here as JSON")
    # intermixed: options may sit between positionals, as in CONFIG --weights W key=value
    return parser.parse_intermixed_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.config is not None and is_override(args.config):   # --weights W key=value
        args.overrides.insert(0, args.config)
        args.config = None
    if args.config is not None or args.weights:
        return model_mode(args)
    if args.gt is None or args.dt is None:
        raise SystemExit("file mode needs both --gt ANNOTATIONS.json and --dt RESULTS.json "
                         "(see --help)")
    for path in (args.gt, args.dt):
        if not path.is_file():
            raise SystemExit(f"no such file: {path}")
    metric = args.metric or "coco"
    try:
        metrics = evaluate_files(args.gt, args.dt, metric, args.engine)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    print(f"{metric} box metrics (percent):")
    print(format_metrics_table(metrics))
    _write_out(args.out, metrics)
    return metrics


def model_mode(args: argparse.Namespace) -> dict[str, Any]:
    """``[CONFIG] --weights W [W2 ...]``: the run logs the metrics table and, last, the folder
    of its records."""
    if args.gt or args.dt:
        raise SystemExit("give either [CONFIG] --weights W (model mode) or --gt/--dt "
                         "(file mode), not both")
    if not args.weights:
        raise SystemExit("model mode needs --weights W (a detection checkpoint)")
    # "--weights W key=value": nargs="+" takes the overrides too; a key=value that is not
    # a file is an override
    weights = [w for w in args.weights if not is_override(w)]
    overrides = list(args.overrides) + [w for w in args.weights if is_override(w)]
    overrides += ["test.format_only=true"] if args.format_only else []
    options = dict(metric=args.metric, engine=args.engine, summary_only=False)
    if args.config is None:        # the checkpoint's own config, records beside it
        metrics = detection.evaluate(None, weights, overrides=overrides, **options)
    else:
        cfg = load_config(args.config, overrides, schema=detection.DetectionConfig)
        cfg = beside_weights(cfg, weights[0], override_keys(overrides))
        metrics = detection.evaluate(cfg, weights, **options)
    _write_out(args.out, metrics)
    return metrics


def _write_out(path: Path | None, metrics: dict[str, Any]) -> None:
    if path is not None:
        write_eval(path, metrics)
        print(f"wrote {path}")


if __name__ == "__main__":
    run_main(main)
