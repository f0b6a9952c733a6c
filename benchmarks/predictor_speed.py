"""End-to-end inference throughput: ``Predictor`` over a folder of images (decode, resize,
batch, model, post-processing, boxes back to original pixels) in images/s, against the same
pipeline built on torchvision's FasterRCNN with the same weights, in one run.

Both pipelines are the same ``Predictor`` (reading and resizing the next batch in a background
thread while the model runs); only the model differs: ours in the form the Predictor runs by
default (frozen BN folded, channels-last, and bf16 autocast on CPUs with native bf16), ours
in fp32, and torchvision's twin (tests/helpers.py ``torchvision_twin``: same trunk, conv5_x,
RPN, anchors, RoIAlign 14x14 aligned=False, NMS settings) as torchvision runs it. The
detector is ResNet-101 C4 with random weights: the RPN keeps its ~300 proposals per image, so
conv5_x runs on as many regions as a trained model's would; the random classifier passes few
boxes through the score threshold, so post-processing is light for every pipeline alike.
Runs are interleaved; each pipeline's time over the folder is the median of ``--repeats``.

    python benchmarks/predictor_speed.py                       # 8 images of ../shared/data/coco128
    python benchmarks/predictor_speed.py --images DIR --num-images 32 --batch-size 4
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from detector_speed import torchvision_twin   # this folder's benchmark, tests/helpers.py's twin

from detres.config import replace as replace_config
from detres.cpu import cpu_has_native_bf16
from detres.tasks.detection.predictor import Predictor
from detres.structures import Detections, DetectorOutput, ImageBatch
from detres.tasks.detection.build import build_detector
from detres.tasks.detection.config import DetModelConfig

ROOT = Path(__file__).resolve().parents[1]
SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}


class TorchvisionDetector(nn.Module):
    """torchvision's FasterRCNN behind our detector interface: ``ImageBatch`` in (each image
    unpadded, as torchvision batches itself), ``DetectorOutput`` out (labels 0..K-1)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: ImageBatch) -> DetectorOutput:
        inputs = [images.tensor[i, :, :h, :w] for i, (h, w) in enumerate(images.sizes)]
        out = self.model(inputs)
        return DetectorOutput(detections=[Detections(o["boxes"], o["scores"], o["labels"] - 1)
                                          for o in out])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--images", default=str(ROOT.parent / "shared" / "data" / "coco128" /
                                           "images"), help="a folder of images (recursive)")
    p.add_argument("--num-images", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--depth", type=int, default=101)
    p.add_argument("--min-size", type=int, default=600)
    p.add_argument("--max-size", type=int, default=1000)
    args = p.parse_args(argv)
    files = sorted(f for f in Path(args.images).rglob("*") if f.suffix.lower() in SUFFIXES)
    files = files[: args.num_images]
    if not files:
        raise SystemExit(f"{args.images}: no images")
    torch.manual_seed(0)
    # zero-initialised residual branches keep a random ResNet-101's features near 1 (else they
    # reach 1e5, every RPN box decodes to nothing and no region reaches conv5_x)
    cfg = replace_config(DetModelConfig(), [
        f"backbone.depth={args.depth}", "backbone.zero_init_residual=true",
        "anchors.sizes=[128,256,512]", "roi_head.roi_op=align", "roi_head.aligned=false",
        "roi_head.sampling_ratio=2"])
    ours = build_detector(cfg, 80).eval()
    tv = TorchvisionDetector(torchvision_twin(ours, (args.min_size, args.max_size)).eval())
    names = [str(k) for k in range(80)]
    common = dict(min_size=args.min_size, max_size=args.max_size, batch_size=args.batch_size)
    pipelines = {"torchvision": Predictor(tv, names, fast_path=False, cpu_amp="none", **common),
                 "ours fp32": Predictor(ours, names, cpu_amp="none", **common)}
    if cpu_has_native_bf16():
        pipelines["ours (default: bf16 autocast)"] = Predictor(ours, names, **common)
    print(f"{len(files)} images from {args.images}, batch {args.batch_size}, "
          f"{torch.get_num_threads()} threads, ResNet-{args.depth} C4 (random weights), "
          f"load average {os.getloadavg()[0]:.1f}")
    for predictor in pipelines.values():      # warm-up: first-call costs, one batch
        predictor(files[: args.batch_size])
    times: dict[str, list[float]] = {name: [] for name in pipelines}
    for _ in range(args.repeats):
        for name, predictor in pipelines.items():
            start = time.perf_counter()
            detections = predictor(files)
            times[name].append(time.perf_counter() - start)
            assert len(detections) == len(files)
    with torch.no_grad():
        image = ImageBatch.from_tensors([torch.rand(3, 600, 800) * 255])
        proposals = ours.rpn.propose(ours.trunk(ours.normalize(image)), image.sizes)[0]
    print(f"RPN proposals on a 600x800 noise image: {len(proposals[0])} (conv5_x runs on each)")
    base = statistics.median(times["torchvision"])
    for name, t in times.items():
        med = statistics.median(t)
        print(f"  {name:32s} {len(files) / med:6.3f} images/s   {med / len(files):6.2f} s/image"
              f"   throughput x{base / med:.2f} torchvision's")
    print(f"load average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
