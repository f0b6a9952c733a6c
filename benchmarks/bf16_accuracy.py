"""What CPU bf16 autocast costs in accuracy and gains in time: a trained checkpoint evaluated
on its val split in fp32 and under bf16 autocast (``test.cpu_amp``), both in the inference
form evaluation runs (models/inference_form.py), with the verdict on the 0.3 AP budget.

    python benchmarks/bf16_accuracy.py --weights output/frcnn_r18_shapes/model_final.pth
    python benchmarks/bf16_accuracy.py --weights W.pth data.val.type=coco \\
        data.val.annotations=../shared/data/coco128/annotations.json \\
        data.val.images=../shared/data/coco128/images

Without native bf16 (AVX-512 BF16 or AMX) oneDNN emulates it: the accuracy figure still
holds, the time does not, and ``test.cpu_amp=auto`` keeps such CPUs in fp32.
"""
from __future__ import annotations

import argparse
import os
import time

import torch

from detres.cpu import cpu_has_native_bf16
from detres.data.loader import build_detection_loader
from detres.evaluation.detection import COCOEvaluator
from detres.evaluation.inference import inference_on_dataset
from detres.models.inference_form import inference_amp_dtype
from detres.tasks.detection.build import build_det_dataset
from detres.tasks.detection.inference import dataset_info, ready_detector
from detres.tasks.detection.load import load_detector

AP_BUDGET = 0.3


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--weights", required=True, help="a checkpoint of tools/train_det.py")
    p.add_argument("overrides", nargs="*", help="key=value over the checkpoint's config")
    p.add_argument("--batch", type=int, default=4)
    args = p.parse_args(argv)
    loaded = load_detector(args.weights, overrides=args.overrides)
    cfg = loaded.cfg
    dataset = build_det_dataset(cfg.data.val, cfg.data, train=False, key="data.val",
                                test_scales=cfg.test.scales)
    loader = build_detection_loader(dataset, args.batch, training=False, num_workers=0)
    device = torch.device("cpu")
    detector = ready_detector(loaded.model, device)
    info = dataset_info(dataset)
    source = getattr(dataset, "source", cfg.data.val.type)
    print(f"{args.weights}: {len(dataset)} images of {source}, "
          f"{torch.get_num_threads()} threads, native bf16: {cpu_has_native_bf16()}, "
          f"load average {os.getloadavg()[0]:.1f}")
    results = {}
    for setting in ("none", "bf16"):
        start = time.perf_counter()
        metrics = inference_on_dataset(detector, loader, COCOEvaluator(info), device,
                                       inference_amp_dtype(device, setting))
        results[setting] = (metrics, time.perf_counter() - start)
        print(f"  {'fp32' if setting == 'none' else 'bf16':5s} AP {metrics['AP']:6.2f}  "
              f"AP50 {metrics['AP50']:6.2f}  AP75 {metrics['AP75']:6.2f}  "
              f"{results[setting][1]:6.1f} s (evaluation included)")
    cost = results["none"][0]["AP"] - results["bf16"][0]["AP"]
    speedup = results["none"][1] / results["bf16"][1]
    verdict = ("within the budget: test.cpu_amp=auto may turn it on" if cost <= AP_BUDGET
               else "over the budget: refused")
    print(f"bf16 costs {cost:.2f} AP (budget {AP_BUDGET}) and runs x{speedup:.2f} as fast; "
          f"{verdict}; load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
