#!/usr/bin/env python
"""Parameters and multiply-adds ("FLOPs" as the paper counts them) per stage of a model.

    python tools/model_info.py CONFIG [--size H W] [--num-classes K] [key=value ...]
    python tools/model_info.py --table1

For a detection config: the trunk stages (conv1, conv2_x..conv4_x) and the RPN head once per
image, conv5_x and the box layers once per region, and the total at the config's
model.rpn.proposals_test regions; the image is H x W (default: the test scale, 4:3 landscape)
padded to a multiple of 32 as in a batch. For a classification config: each stage and fc on an
H x W image (default: the crop). --table1 prints the ImageNet ResNets at 224x224 beside the
paper's Table 1. Counted with torch.utils.flop_counter.FlopCounterMode on the meta device:
convolutions and fully-connected layers; normalization, pooling, RoIAlign and NMS are not.

Example:

    python tools/model_info.py configs/frcnn_r101_coco.yaml --size 600 800
"""
from __future__ import annotations

import argparse

from detres.cli import is_override, run_main, tool_parser
from detres.complexity import format_rows, load_any_config, model_costs, table1
from detres.engine.logging import write_json

PART_TITLES = {"image": "once per image", "region": "once per region (RoI)", "total": "in all"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = tool_parser(__doc__)
    parser.add_argument("config", nargs="?", help="a detection or classification YAML config")
    parser.add_argument("overrides", nargs="*", default=[], metavar="key=value",
                        help="config overrides, e.g. model.rpn.proposals_test=1000")
    parser.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), help="input size")
    parser.add_argument("--num-classes", type=int, help="classes (default: from data.train.type)")
    parser.add_argument("--task", choices=("auto", "detection", "classification"),
                        default="auto", help="the config's schema (auto: the one that reads it)")
    parser.add_argument("--table1", action="store_true",
                        help="the ImageNet ResNets at 224x224 beside the paper's Table 1")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_intermixed_args(argv)
    if args.config is not None and is_override(args.config):   # only overrides were given
        args.overrides.insert(0, args.config)
        args.config = None
    if args.config is None and not args.table1:
        parser.error("give a CONFIG, or --table1")
    return args


def print_table1() -> list[dict]:
    rows = table1()
    print("ImageNet ResNets at 224x224, multiply-adds in 10^9 (Table 1 'FLOPs'); ours: the "
          "paper's nets (stride in the 1x1, shortcut A for 18/34, B for 50+)")
    print(f"{'depth':>5} {'paper':>7} {'ours':>7} {'stride in 3x3 (torchvision)':>28} "
          f"{'params':>9}")
    for r in rows:
        print(f"{r['depth']:>5} {r['paper_gflops']:>7.1f} {r['paper_arch_gflops']:>7.2f} "
              f"{r['torchvision_arch_gflops']:>28.2f} {r['paper_arch_params'] / 1e6:>8.1f}M")
    return rows


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    out: dict = {}
    if args.config is not None or args.overrides:
        task, cfg = load_any_config(args.config, args.overrides, args.task)
        info = model_costs(task, cfg, tuple(args.size) if args.size else None, args.num_classes)
        print(f"{task} config {args.config}: {info['num_classes']} classes, input "
              f"{info['size'][0]}x{info['size'][1]}"
              + (" (padded to a multiple of 32)" if task == "detection" else ""))
        print(f"{'':<54}{'params':>10} {'multiply-adds':>12}")
        for part, rows in info["parts"].items():
            if PART_TITLES.get(part):
                print(PART_TITLES[part] + ":")
            print(format_rows(rows, "  "))
        out = {**info, "config": args.config, "parts": {
            part: [{"name": r.name, "params": r.params, "multiply_adds": r.macs} for r in rows]
            for part, rows in info["parts"].items()}}
    if args.table1:
        out["table1"] = print_table1()
    if args.json:
        write_json(args.json, out)
        print(f"wrote {args.json}")
    return out


if __name__ == "__main__":
    run_main(main)
