#!/usr/bin/env python
"""Export a trained detector's inference graph to TorchScript or ONNX.

    python tools/export.py --weights W [--config CONFIG] --format torchscript|onnx --out FILE
        [key=value ...]

The exported model takes one image, (3, H, W) float32 RGB values 0..255 resized as in
evaluation (shorter side data.min_size_test, longer side at most data.max_size_test; any H, W
run), and its scale (a 0-d float32 tensor: resized / original size, 1.0 for an image used at
its own size), and returns boxes (D, 4) xyxy in that image's pixels (divide by the scale for
the original's), scores (D,) and labels (D,) int64 (label k is class_names[k]). FILE.json
beside it records the class names, dataset category ids and the test-time resize. Without
--config the config stored in the checkpoint is used; key=value overrides apply either way
(e.g. model.roi_head.score_threshold=0.3).

After writing, the file is read back (torch.jit.load; ONNX Runtime for ONNX when installed:
pip install -e ".[export]") and its detections are paired with the model's on two random
images of different sizes (same label, score within 1e-3, box within 0.1 px); fewer than 90%
paired is an error. An untrained model's scores nearly tie, so rounding may reorder a few.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from detres.cli import check_output_path, run_main, tool_parser
from detres.config import load_config
from detres.engine.logging import write_json
from detres.export import ExportError, compare_exported, export_detector, load_exported
from detres.tasks.detection.config import DetectionConfig
from detres.tasks.detection.load import load_detector


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = tool_parser(__doc__)
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    parser.add_argument("--weights", required=True, help="detection checkpoint")
    parser.add_argument("--config", help="YAML config (default: the one in the checkpoint)")
    parser.add_argument("--format", required=True, choices=("torchscript", "onnx"))
    parser.add_argument("--out", required=True, type=Path, help="file to write")
    parser.add_argument("--no-check", action="store_true",
                        help="skip reading the file back and comparing it with the model")
    return parser.parse_intermixed_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    check_output_path(args.out, folder=False)
    cfg = load_config(args.config, schema=DetectionConfig) if args.config else None
    loaded = load_detector(args.weights, cfg, args.overrides)
    cfg, model = loaded.cfg, loaded.detectors[0]      # the graph of the detector itself
    tta = [k for k in ("box_refinement", "scales", "flip") if getattr(cfg.test, k, None)]
    if tta:
        print(f"note: test.{', test.'.join(tta)} (test-time steps around the detector) are not "
              "part of the exported graph")
    lo, hi = cfg.data.min_size_test, cfg.data.max_size_test
    size = (lo, min(hi, round(lo * 4 / 3)))         # a landscape image at the test scale
    export_detector(model, args.out, args.format, size)
    info = {"format": args.format, "weights": str(args.weights),
            "inputs": {"image": "(3, H, W) float32 RGB 0..255, resized: shorter side "
                                f"{lo}, longer side at most {hi}",
                       "scale": "() float32, resized / original"},
            "outputs": {"boxes": "(D, 4) xyxy in the input's pixels", "scores": "(D,)",
                        "labels": "(D,) int64, index into class_names"},
            "class_names": list(loaded.class_names),
            "category_ids": list(loaded.category_ids or range(1, len(loaded.class_names) + 1)),
            "min_size_test": lo, "max_size_test": hi}
    write_json(f"{args.out}.json", info)
    print(f"wrote {args.out} ({args.format}) and {args.out}.json")
    if not args.no_check:
        info["max_box_difference"] = check(model, args.out, args.format, size)
    return info


def check(model, path: Path, fmt: str, size: tuple[int, int]) -> float | None:
    """Compares the file's detections with the model's on the traced size and another one;
    fewer than 90% of them paired is an error."""
    try:
        run = load_exported(path, fmt)
    except ExportError as e:
        print(f"not checked: {e}")
        return None
    other = size[::-1] if size[0] != size[1] else (size[0], size[1] * 3 // 4)
    g = torch.Generator().manual_seed(0)
    images = [torch.randint(0, 256, (3, h, w), generator=g).float() for h, w in (size, other)]
    paired, total, worst = compare_exported(model, run, images)
    sizes = f"{size[0]}x{size[1]} and {other[0]}x{other[1]} images"
    if paired < 0.9 * total:
        raise ExportError(f"{path}: only {paired} of {total} detections on {sizes} equal the "
                          "model's (same label, score within 1e-3, box within 0.1 px)")
    near_ties = "; the others are near-ties in score" if paired < total else ""
    print(f"checked: {paired} of {total} detections on {sizes} equal the model's (largest box "
          f"difference {worst:.2g} px{near_ties})")
    return worst


if __name__ == "__main__":
    run_main(main, extra_errors=(ExportError,))
