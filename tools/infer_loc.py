#!/usr/bin/env python
"""Localize objects in images with a localizer trained by tools/train_loc.py (He et al. 2015,
Appendix C): draw its top-k (class, box) guesses and write them as JSON.

    python tools/infer_loc.py --weights W [W2 ...] IMAGE_OR_DIR [...] --out DIR [key=value ...]

Draws every image with its guesses (box, class name and the classifier's score; the best guess
on top) as DIR/<name>.png, <name> being the image's path relative to the folder given (folders
are searched recursively) or its file name. Writes DIR/results.json: per image its "file", the
"method" that placed the boxes ("RPN+R-CNN", or "RPN" without an R-CNN) and its "guesses",
best first: "rank", "class", "class_id", "score" (softmax), "box" [x1, y1, x2, y2] in the
image's pixels, "box_score". Several --weights are tested as one ensemble. key=value overrides
change the test settings stored in the checkpoint, e.g. test.cls_mode=multiscale,
test.rpn_mode=one_crop, test.topk_classes=1. An unreadable image is skipped with a warning;
the run fails only if none could be read.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from tqdm import tqdm

from detres.cli import is_override, run_main, tool_parser
from detres.data.images import DatasetError, read_image
from detres.engine.logging import write_json
from detres.data.image_files import IMAGE_SUFFIXES, drawing_paths, list_images
from detres.tasks.localization.predictor import LocPredictor
from detres.visualize import save_detections

logger = logging.getLogger("detres")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = tool_parser(__doc__)
    parser.add_argument("inputs", nargs="*", metavar="IMAGE_OR_DIR",
                        help="image files or folders, and key=value overrides")
    parser.add_argument("--weights", required=True, nargs="+",
                        help="model_final.pth of tools/train_loc.py; several: an ensemble")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_intermixed_args(argv)
    # --weights takes the words after it: folders, image files and key=value items are not
    # weights
    overrides = [w for w in args.weights + args.inputs if is_override(w)]
    images = [w for w in args.weights if w not in overrides
              and (Path(w).is_dir() or Path(w).suffix.lower() in IMAGE_SUFFIXES)]
    args.weights = [w for w in args.weights if w not in overrides and w not in images]
    args.images = images + [w for w in args.inputs if w not in overrides]
    args.overrides = overrides
    if not args.weights:
        parser.error("--weights needs at least one checkpoint")
    if not args.images:
        parser.error("no images given")
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    out = Path(args.out)
    images = list_images(args.images, out)
    drawings = dict(zip((name for _, name in images), drawing_paths(images, out)))
    predictor = LocPredictor.from_checkpoint(args.weights, args.device, args.overrides,
                                             args.batch_size)
    results: list[dict] = []
    failed: list[Path] = []
    for start in tqdm(range(0, len(images), args.batch_size), desc="localize",
                      dynamic_ncols=True):
        chunk = []
        for path, name in images[start:start + args.batch_size]:
            try:
                chunk.append((path, name, read_image(path)))
            except DatasetError as e:   # missing, empty, truncated or corrupt: skip it
                logger.warning("skipping %s", e)
                failed.append(path)
        predictions = predictor([image for _, _, image in chunk]) if chunk else []
        for (path, name, image), p in zip(chunk, predictions):
            results.append({"file": str(path), "method": p.method,
                            "guesses": predictor.to_json(p)})
            save_detections(drawings[name], image, p.boxes.numpy(),
                            p.class_scores.numpy(), p.labels.numpy(), predictor.class_names)
    if len(failed) == len(images):
        raise DatasetError(f"none of the {len(images)} images could be read (first: {failed[0]})")
    write_json(out / "results.json", results, indent=1)
    if failed:
        logger.warning("%d of %d images could not be read and were skipped: %s", len(failed),
                       len(images), ", ".join(map(str, failed)))
    print(f"{len(results)} images localized ({predictor.method}) -> {out}")
    return results


if __name__ == "__main__":
    run_main(main, extra_errors=(ValueError,))   # e.g. an image or a checkpoint it cannot use
