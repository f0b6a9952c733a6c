#!/usr/bin/env python
"""Convert published weights into detres files.

    python tools/convert_weights.py detectron2 SOURCE.pkl|.pth --out NAME.pth [options]
    python tools/convert_weights.py msra R-101.pkl --out NAME.pth [options]

detectron2: a C4 Faster R-CNN of detectron2 (its model zoo's .pkl files, or a .pth it wrote)
becomes a detres detection checkpoint NAME.pth and its config NAME.yaml, e.g. R101-C4 3x:

    python tools/convert_weights.py detectron2 model_final_298dad.pkl --out r101_c4_3x.pth
    python tools/eval_det.py r101_c4_3x.yaml --weights r101_c4_3x.pth

80 classes are COCO's; other class sets need --categories (a COCO-format JSON) or
--class-names. msra: MSRA's original ImageNet ResNet-50/101/152 (Caffe names, as detectron2
ships R-50.pkl / R-101.pkl) becomes a backbone file NAME.pth for model.backbone.weights, with
the config lines that use it (stride_in_1x1: true, pixel mean and std) in NAME.yaml.

Both take BGR input in their source; detres takes RGB, so conv1's input channels and the pixel
mean are reversed (--input-format RGB for a model that already took RGB). Pickles are read
without running code: one that names anything but numpy arrays and plain containers is refused.
"""
from __future__ import annotations

import argparse

from detres.cli import run_main, tool_parser
from detres.convert import ConversionError, convert_file
from detres.convert.detectron2 import D2_ANCHOR_SIZES, D2_ASPECT_RATIOS


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = tool_parser(__doc__)
    parser.add_argument("format", choices=("detectron2", "msra"), help="the source's format")
    parser.add_argument("source", help="the file to convert (.pkl or .pth)")
    parser.add_argument("--out", required=True, help="output .pth; NAME.yaml goes beside it")
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    parser.add_argument("--stride-in-3x3", action="store_true",
                        help="the source's bottlenecks stride in the 3x3 (torchvision-initialised "
                             "models); default: in the first 1x1, as MSRA's models")
    parser.add_argument("--input-format", choices=("BGR", "RGB"), default="BGR",
                        help="channel order the source takes (detectron2's INPUT.FORMAT)")
    parser.add_argument("--pixel-mean", type=float, nargs=3, metavar=("C1", "C2", "C3"),
                        help="the source's pixel mean in --input-format order (default: "
                             "detectron2's 103.530 116.280 123.675, or the file's own)")
    parser.add_argument("--pixel-std", type=float, nargs=3, metavar=("C1", "C2", "C3"),
                        help="the source's pixel std (default: 1 1 1, or the file's own)")
    det = parser.add_argument_group("detectron2 only")
    det.add_argument("--categories", help="COCO-format JSON whose 'categories' name the classes")
    det.add_argument("--class-names", help="comma-separated class names in label order")
    det.add_argument("--anchor-sizes", type=float, nargs="+", default=list(D2_ANCHOR_SIZES),
                     help="ANCHOR_GENERATOR.SIZES (default: %(default)s)")
    det.add_argument("--aspect-ratios", type=float, nargs="+", default=list(D2_ASPECT_RATIOS),
                     help="ANCHOR_GENERATOR.ASPECT_RATIOS (default: %(default)s)")
    det.add_argument("--anchor-offset", type=float, default=0.0,
                     help="ANCHOR_GENERATOR.OFFSET (default: 0.0)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> list[str]:
    args = parse_args(argv)
    options = {"stride_in_1x1": not args.stride_in_3x3, "input_format": args.input_format}
    if args.pixel_mean:
        options["pixel_mean"] = args.pixel_mean
    if args.pixel_std:
        options["pixel_std"] = args.pixel_std
    if args.format == "detectron2":
        options.update(categories=args.categories, anchor_sizes=args.anchor_sizes,
                       aspect_ratios=args.aspect_ratios, anchor_offset=args.anchor_offset,
                       class_names=args.class_names.split(",") if args.class_names else None)
    elif args.categories or args.class_names:
        raise ConversionError("--categories and --class-names apply to detectron2 detectors; "
                              "an MSRA ImageNet file has no detection classes")
    lines = convert_file(args.format, args.source, args.out, overwrite=args.overwrite, **options)
    print("\n".join(lines))
    return lines


if __name__ == "__main__":
    run_main(main, extra_errors=(ConversionError,))
