"""Training data pipeline speed: decode + augment + collate, images per second.

On the real COCO subset (../shared/data/coco128) at the paper's scale (shorter side 600,
longer side at most 1000, horizontal flip), batches of 2 from the infinite training loader,
with 0, 1 and 2 DataLoader workers. The baseline, measured in the same run, is JPEG decoding
alone in the main process; the ratio says how much the rest of the pipeline costs.

    python benchmarks/data_speed.py [--images 128] [--batch-size 2] [--workers 0 1 2]
"""
from __future__ import annotations

import argparse
import itertools
import os
import platform
import time
from pathlib import Path

import torch

from detres.data import COCODetection, build_detection_loader, read_image, train_transform

COCO128 = Path(__file__).resolve().parents[2] / "shared" / "data" / "coco128"


def decode_only(ds: COCODetection, n: int) -> float:
    start = time.perf_counter()
    for i in range(n):
        read_image(ds.index.path(i % len(ds)))
    return n / (time.perf_counter() - start)


def pipeline(ds: COCODetection, n: int, batch_size: int, workers: int) -> float:
    loader = build_detection_loader(ds, batch_size, num_workers=workers, seed=0,
                                    persistent_workers=False)
    it = iter(loader)
    next(it)  # worker start-up and first batch are not timed
    batches = max(n // batch_size, 1)
    start = time.perf_counter()
    for images, targets in itertools.islice(it, batches):
        pass
    rate = batches * batch_size / (time.perf_counter() - start)
    del it
    return rate


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", type=Path, default=COCO128)
    p.add_argument("--images", type=int, default=128, help="images timed per setting")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    args = p.parse_args()
    torch.set_num_threads(1)
    ds = COCODetection(args.root / "annotations.json", args.root / "images", filter_empty=True,
                       transform=train_transform((600,), 1000, flip_prob=0.5, seed=0))
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"torch {torch.__version__}; {len(ds)} images of {args.root}")
    base = decode_only(ds, args.images)
    print(f"baseline  decode only, main process: {base:7.1f} images/s")
    for w in args.workers:
        rate = pipeline(ds, args.images, args.batch_size, w)
        print(f"pipeline  {w} workers, batch {args.batch_size}, short 600 / max 1000: "
              f"{rate:7.1f} images/s  ({rate / base:.2f} x decode only)")


if __name__ == "__main__":
    main()
