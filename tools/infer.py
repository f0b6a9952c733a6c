#!/usr/bin/env python
"""Detect objects in images with a trained detector; draw them and write COCO results.

    python tools/infer.py [CONFIG] --weights W IMAGE_OR_DIR [...] --out DIR [key=value ...]

Writes DIR/<image name>.png (boxes, class names and scores drawn) for every image and
DIR/results.json (COCO results format: original pixels, the training set's category ids; the
image id is the image's position in the sorted input list). Without CONFIG the config stored in
the checkpoint is used; key=value overrides apply either way, e.g.
``model.roi_head.score_threshold=0.5``.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from tqdm import tqdm

from detres.cli import run_main
from detres.config import load_config
from detres.data.io import DatasetError, read_image
from detres.engine.distributed import resolve_device
from detres.engine.logging import write_json
from detres.predictor import Predictor
from detres.tasks.detection.build import detector_for_checkpoint
from detres.tasks.detection.config import DetectionConfig
from detres.visualize import save_detections

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("inputs", nargs="+", metavar="[CONFIG] IMAGE_OR_DIR",
                        help="an optional YAML config, then image files or folders, and "
                             "key=value overrides")
    parser.add_argument("--weights", required=True, help="detection checkpoint")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--min-score", type=float, default=0.5,
                        help="draw detections at or above this score (results.json keeps all)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--batch-size", type=int, default=4)
    args = parser.parse_intermixed_args(argv)
    args.overrides = [a for a in args.inputs if "=" in a and not Path(a).exists()]
    rest = [a for a in args.inputs if a not in args.overrides]
    args.config = rest.pop(0) if rest and rest[0].endswith((".yaml", ".yml")) else None
    args.images = rest
    if not args.images:
        parser.error("no images given")
    return args


def list_images(paths: list[str]) -> list[Path]:
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise DatasetError(f"{p}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found")
            files.extend(found)
        elif p.is_file():
            files.append(p)
        else:
            raise DatasetError(f"{p}: no such image file or folder")
    return files


def make_predictor(args: argparse.Namespace) -> Predictor:
    device = resolve_device(args.device)
    if args.config is None:
        return Predictor.from_checkpoint(args.weights, str(device), args.overrides,
                                         args.batch_size)
    cfg = load_config(args.config, args.overrides, schema=DetectionConfig)
    model, meta = detector_for_checkpoint(cfg.model, args.weights)
    return Predictor(model, meta["class_names"], cfg.data.min_size_test, cfg.data.max_size_test,
                     device, meta.get("category_ids"), args.batch_size)


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    files = list_images(args.images)
    predictor = make_predictor(args)
    out = Path(args.out)
    results: list[dict] = []
    bar = tqdm(total=len(files), desc="infer", dynamic_ncols=True)
    for start in range(0, len(files), args.batch_size):
        chunk = files[start:start + args.batch_size]
        images = [read_image(path) for path in chunk]
        for k, (path, image, detections) in enumerate(zip(chunk, images, predictor(images))):
            results.extend(predictor.to_coco_results(detections, start + k))
            save_detections(out / f"{path.stem}.png", image, detections.boxes.numpy(),
                            detections.scores.numpy(), detections.labels.numpy(),
                            predictor.class_names, args.min_score)
        bar.update(len(chunk))
    bar.close()
    write_json(out / "results.json", results, indent=None)
    print(f"{len(files)} images, {len(results)} detections "
          f"({sum(r['score'] >= args.min_score for r in results)} drawn at score >= "
          f"{args.min_score}) -> {out}")
    return results


if __name__ == "__main__":
    run_main(main, extra_errors=(ValueError,))   # e.g. an image or a checkpoint it cannot use
