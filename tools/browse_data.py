#!/usr/bin/env python
"""Draw a detection dataset's ground truth as the model sees it: the quickest check of
category-id and box-format mistakes.

    python tools/browse_data.py CONFIG [key=value ...] --out DIR [--split train|val] [--n N]
        [--before-transforms] [--shuffle]

Draws N images (default 16) of ``data.train`` (or ``data.val``) with their boxes and class
names into DIR/<position>_<file stem>.png, after the split's own transforms (training: the
multi-scale resize, flips and jitter of the config, each image's augmentation seeded from
``train.seed`` and its position; val: the test resize), or on the original pixels with
--before-transforms. Crowd regions (COCO) and difficult objects (VOC), which are not training
targets, are drawn dashed and tagged "(crowd)" / "(difficult)". Images are taken in dataset
order, or at random (seeded by ``train.seed``) with --shuffle. Prints how many boxes of each
class were drawn.
"""
from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

import numpy as np
from tqdm import tqdm

from detres.cli import run_main, tool_parser
from detres.config import load_config
from detres.data.samplers import SEED_STRIDE
from detres.data.voc import VOCDetection
from detres.tasks.detection.build import build_det_dataset
from detres.tasks.detection.config import DetectionConfig
from detres.visualize import draw_ground_truth, ground_truth_view


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = tool_parser(__doc__)
    parser.add_argument("config", help="detection YAML config")
    parser.add_argument("overrides", nargs="*", default=[], metavar="key=value",
                        help="config overrides, e.g. data.train.annotations=my.json")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--split", choices=("train", "val"), default="train")
    parser.add_argument("--n", type=int, default=16, help="images to draw (default 16)")
    parser.add_argument("--before-transforms", action="store_true",
                        help="draw the original images instead of the transformed ones")
    parser.add_argument("--shuffle", action="store_true",
                        help="take the images at random instead of in dataset order")
    args = parser.parse_intermixed_args(argv)
    if args.n < 1:
        parser.error("--n must be at least 1")
    return args


def main(argv: list[str] | None = None) -> dict[str, int]:
    args = parse_args(argv)
    cfg = load_config(args.config, args.overrides, schema=DetectionConfig)
    train = args.split == "train"
    dataset = build_det_dataset(getattr(cfg.data, args.split), cfg.data, train=train,
                                key=f"data.{args.split}")
    count = min(args.n, len(dataset))
    order = (np.random.default_rng(cfg.train.seed).permutation(len(dataset))[:count]
             if args.shuffle else np.arange(count))
    ignored_name = "difficult" if isinstance(dataset, VOCDetection) else "crowd"
    drawn: Counter[str] = Counter()
    for position, i in enumerate(tqdm(order.tolist(), desc="browse", dynamic_ncols=True)):
        seed = cfg.train.seed * SEED_STRIDE + i if train else None
        image, boxes, labels, ignored = ground_truth_view(
            dataset, i, transformed=not args.before_transforms, seed=seed)
        canvas = draw_ground_truth(image, boxes, labels, ignored, dataset.class_names,
                                   ignored_name)
        args.out.mkdir(parents=True, exist_ok=True)
        canvas.save(args.out / f"{position:04d}_{dataset.path(i).stem}.png", format="PNG")
        drawn.update(dataset.class_names[k] + (f" ({ignored_name})" if flag else "")
                     for k, flag in zip(labels.tolist(), ignored.tolist()))
    stage = "original" if args.before_transforms else f"{args.split}-transformed"
    print(f"{count} of {len(dataset)} data.{args.split} images, {stage}, -> {args.out}")
    for name, n in sorted(drawn.items()):
        print(f"  {name}: {n} boxes")
    return dict(drawn)


if __name__ == "__main__":
    run_main(main)
