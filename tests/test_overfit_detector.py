"""A small detector memorises two built-in shapes images: AP50 >= 0.9 on them (pycocotools).

ResNet-18 at width 16 with GroupNorm (trained from scratch: no pretrained weights offline),
RoIAlign at 8x8 (conv5_x -> 4x4) to keep conv5_x cheap on a CPU, 32 RoIs per image, AdamW with
a one-cycle schedule. About 25-40 s on 2 idle cores; training stops once AP50 >= 0.95.
"""
import numpy as np
import pytest
import torch

from helpers import narrow_detector

from detres.data.builtin import SHAPE_CLASSES, render_shapes_image
from detres.evaluation.coco_eval import detections_to_coco_results, evaluate_coco
from detres.structures import Detections, ImageBatch, Targets

IMAGE_INDICES = (1, 4)   # 3 + 4 shapes, 14..75 px, four classes
MAX_ITERS, CHECK_EVERY = 250, 50


def builtin_images() -> tuple[ImageBatch, list[Targets]]:
    """Images 1 and 4 of the built-in shapes train split (seed 0), as the COCO set has them."""
    images, targets = [], []
    for image_id, index in enumerate(IMAGE_INDICES, start=1):
        rng = np.random.default_rng([0, 0, index])   # data/builtin.py: (seed, split, index)
        image, boxes, labels, _ = render_shapes_image(rng, 128, 10)
        images.append(torch.from_numpy(image).permute(2, 0, 1))
        targets.append(Targets(torch.from_numpy(boxes), torch.from_numpy(labels), image_id))
    return ImageBatch.from_tensors(images), targets


def coco_ap50(targets: list[Targets], detections: list[Detections]) -> float:
    """AP at IoU 0.5 (fraction) by pycocotools, from COCO ground truth and results."""
    gt = {"images": [{"id": t.image_id, "width": 128, "height": 128} for t in targets],
          "categories": [{"id": k + 1, "name": n} for k, n in enumerate(SHAPE_CLASSES)],
          "annotations": []}
    for t in targets:
        for (x1, y1, x2, y2), label in zip(t.boxes.tolist(), t.labels.tolist()):
            gt["annotations"].append({"id": len(gt["annotations"]) + 1, "image_id": t.image_id,
                                      "category_id": label + 1, "bbox": [x1, y1, x2 - x1, y2 - y1],
                                      "area": (x2 - x1) * (y2 - y1), "iscrowd": 0})
    results = detections_to_coco_results(detections, targets, range(1, len(SHAPE_CLASSES) + 1))
    if not results:
        return 0.0
    return evaluate_coco(gt, results, engine="pycocotools")["AP50"] / 100


@pytest.mark.slow
def test_small_detector_memorises_two_builtin_images():
    torch.manual_seed(0)
    batch, targets = builtin_images()
    model = narrow_detector(   # built as the tools build it
        "backbone.width=16", "backbone.norm=gn", "backbone.gn_groups=8", "backbone.freeze_at=0",
        "anchors.sizes=[16,32,64,128]", "roi_head.roi_op=align", "roi_head.pooled_size=8",
        "rpn.pre_nms_topk_train=1000", "rpn.pre_nms_topk_test=500", "rpn.proposals_train=256",
        "rpn.proposals_test=100", "roi_head.batch_size_per_image=32", "rpn.box_loss=l1",
        "roi_head.box_loss=l1", num_classes=len(SHAPE_CLASSES), seed=None)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=2e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=MAX_ITERS,
                                                   pct_start=0.1)
    first_loss, ap50 = None, 0.0
    for iteration in range(1, MAX_ITERS + 1):
        model.train()
        loss = sum(model(batch, targets).losses.values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        first_loss = first_loss if first_loss is not None else loss.item()
        if iteration % CHECK_EVERY == 0 and iteration >= 150:
            model.eval()
            with torch.no_grad():
                ap50 = coco_ap50(targets, model(batch).detections)
            if ap50 >= 0.95:
                break
    # Not 10x: the L1 box losses (deltas x10, x5) plateau near 0.3 while boxes are ~3% off.
    assert loss.item() < first_loss / 5, (first_loss, loss.item())
    assert ap50 >= 0.9, f"AP50 {ap50:.3f} after {iteration} iterations"
