#!/usr/bin/env python
"""Evaluate a localizer trained by tools/train_loc.py on data.val (Table 13 of He et al. 2015).

    python tools/eval_loc.py [CONFIG] --weights W [W2 ...] [key=value ...] [--out FILE]

Without CONFIG the config stored in the checkpoint is used; key=value overrides change it (e.g.
``test.scales=[224,288,352]`` for multi-scale dense testing, ``data.val.root=...``). Prints the
errors of the RPN alone and of RPN + R-CNN side by side (localization error on the ground-truth
class, top-1/top-5 localization error, top-1/top-5 classification error, percent), writes
eval/metrics.json and eval/predictions.json (with config.yaml, env.json, log.txt) into a new
train.output_dir/eval_only/<YYYYmmdd-HHMMSS>/ (logged as "records in ..."), never into the
training run's records, and ``--out`` the metrics JSON. Under torchrun every rank evaluates a
shard. Several --weights are tested as one ensemble (Appendix C): softmax scores averaged over
the classifiers, the union of the RPNs' proposals, the R-CNNs' refined boxes and scores
averaged; the test settings are those of CONFIG or of the first checkpoint. Other test forms
(Table 13): ``test.rpn_mode=one_crop`` (the RPN on the centre crop only),
``test.cls_mode=ten_crop`` or ``test.cls_mode=multiscale`` (the classifier's 10-crop or
multi-scale testing).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from detres.cli import is_override, run_main
from detres.config import load_config
from detres.engine.logging import write_json
from detres.tasks import localization


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", nargs="?", default=None,
                        help="YAML config (default: the one stored in the checkpoint)")
    parser.add_argument("overrides", nargs="*", default=[], metavar="key=value")
    parser.add_argument("--weights", required=True, nargs="+",
                        help="model_final.pth of tools/train_loc.py; several: an ensemble")
    parser.add_argument("--out", type=Path, help="also write the metrics here as JSON")
    args = parser.parse_intermixed_args(argv)
    # --weights takes every word after it: key=value items there are overrides
    moved = [w for w in args.weights if is_override(w)]
    args.weights = [w for w in args.weights if w not in moved]
    args.overrides += moved
    if not args.weights:
        parser.error("--weights needs at least one checkpoint")
    if args.config is not None and is_override(args.config):  # only overrides were given
        args.overrides.insert(0, args.config)
        args.config = None
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    cfg = (load_config(args.config, args.overrides, schema=localization.LocalizationConfig)
           if args.config else None)
    metrics = localization.evaluate(cfg, args.weights, args.overrides)
    if args.out is not None:
        write_json(args.out, metrics, indent=1)
        print(f"wrote {args.out}")
    return metrics


if __name__ == "__main__":
    run_main(main)
