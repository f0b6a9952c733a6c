"""Runs the localization pipeline of Appendix C over a dataset and scores it (Table 13).

For each image (original pixels throughout the output):

1. the classifier sees the shorter side resized to ``cls_test_size`` and a centre crop of
   ``cls_crop`` (or the whole image); its top-k classes are the guesses (paper: top-5);
2. the per-class RPN runs densely over the whole image at each test scale; for each guessed
   class (and each ground-truth class, for the oracle "error on the ground-truth class") the
   proposals of all scales are merged, NMS-ed and cut to the top ``proposals_per_class``;
3. RPN-only answer: the best-scoring proposal of the class; with the R-CNN: every proposal is
   cropped from the original image, warped, rescored and regressed, and the best-scoring
   refined box is the answer.

The loader yields lists of samples with untransformed images (the dataset is built with
``transform=None``); resizing for each scale happens here, on the data side, so the models
never resize. Each rank runs its shard; the predictions are gathered and the main rank scores
them with ``evaluation/localization.py`` and writes ``eval/metrics.json`` and
``eval/predictions.json``.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torchvision.ops import nms
from tqdm import tqdm

from detres.data.io import image_to_tensor
from detres.data.transforms import resize, resize_scale
from detres.engine import distributed as du
from detres.engine.checkpoint import atomic_write_bytes
from detres.evaluation.localization import (LocalizationResult, format_table,
                                            localization_errors)
from detres.models.localizer import Localizer, PerClassRPN
from detres.structures import ImageBatch

logger = logging.getLogger("detres")
METHODS = ("RPN", "RPN+R-CNN")


@dataclass(frozen=True)
class LocTestSettings:
    """Test-time choices (config ``test`` plus the classifier's test view)."""

    scales: tuple[int, ...] = (256,)
    max_size: int | None = None
    topk_classes: int = 5
    proposals_per_class: int = 200
    pre_nms_topk: int = 6000
    nms_threshold: float | None = 0.7
    cls_test_size: int = 256
    cls_crop: int | None = 224          # None: the whole image, fully convolutional


def _resized(image: np.ndarray, short_side: int, max_size: int | None
             ) -> tuple[np.ndarray, float]:
    """The image with its shorter side at ``short_side`` (longer capped at ``max_size``)."""
    scale = resize_scale(image.shape[0], image.shape[1], short_side, max_size)
    return resize(image, np.zeros((0, 4), np.float32), scale)[0], scale


def classifier_view(image: np.ndarray, test_size: int, crop: int) -> np.ndarray:
    """Shorter side to ``test_size``, then the centre ``crop`` x ``crop`` (zero-padded if the
    resized image is smaller), as the classification test recipe."""
    image, _ = _resized(image, test_size, None)
    h, w = image.shape[:2]
    out = np.zeros((crop, crop, 3), np.uint8)
    top, left = max((h - crop) // 2, 0), max((w - crop) // 2, 0)
    part = image[top:top + crop, left:left + crop]
    oy, ox = (crop - part.shape[0]) // 2, (crop - part.shape[1]) // 2
    out[oy:oy + part.shape[0], ox:ox + part.shape[1]] = part
    return out


def scaled_batch(images: Sequence[np.ndarray], short_side: int, max_size: int | None,
                 device: torch.device) -> tuple[ImageBatch, list[float]]:
    """The images resized to ``short_side`` (capped at ``max_size``), padded into one batch."""
    tensors, scales = [], []
    for image in images:
        resized, s = _resized(image, short_side, max_size)
        tensors.append(image_to_tensor(resized))
        scales.append(s)
    return ImageBatch.from_tensors(tensors).to(device), scales


@torch.no_grad()
def dense_proposals(rpn: PerClassRPN, images: Sequence[np.ndarray], classes: list[Tensor],
                    settings: LocTestSettings, device: torch.device
                    ) -> list[list[tuple[Tensor, Tensor]]]:
    """Per image, per requested class: (boxes (P, 4) in original pixels, scores (P,)), best
    first; proposals of several scales are merged by NMS (or by score when NMS is off)."""
    per_scale = []
    for short_side in settings.scales:
        batch, factors = scaled_batch(images, short_side, settings.max_size, device)
        out = rpn.propose(batch, [c.to(device) for c in classes],
                          topk=settings.proposals_per_class, pre_nms_topk=settings.pre_nms_topk,
                          nms_threshold=settings.nms_threshold)
        per_scale.append([[(b.cpu() / f, s.cpu()) for b, s in image_out]
                          for image_out, f in zip(out, factors)])
    if len(per_scale) == 1:
        return per_scale[0]
    merged = []
    for i in range(len(images)):
        per_class = []
        for j in range(len(classes[i])):
            boxes = torch.cat([scale_out[i][j][0] for scale_out in per_scale])
            scores = torch.cat([scale_out[i][j][1] for scale_out in per_scale])
            keep = (nms(boxes, scores, settings.nms_threshold) if settings.nms_threshold
                    is not None else scores.argsort(descending=True))
            keep = keep[:settings.proposals_per_class]
            per_class.append((boxes[keep], scores[keep]))
        merged.append(per_class)
    return merged


def _best(boxes: Tensor, scores: Tensor) -> np.ndarray:
    """The highest-scoring box, or a degenerate box when there is none (counts as a miss)."""
    if len(boxes) == 0:
        return np.zeros(4, np.float32)
    return boxes[int(scores.argmax())].numpy().astype(np.float32)


@torch.no_grad()
def classify(model: Localizer, images: Sequence[np.ndarray], settings: LocTestSettings,
             device: torch.device) -> Tensor:
    """(N, K) class logits: centre crops in one batch, or each whole image on its own (their
    sizes differ, and padding would change the global average)."""
    if settings.cls_crop is not None:
        views = [image_to_tensor(classifier_view(im, settings.cls_test_size, settings.cls_crop))
                 for im in images]
        return model.classifier(torch.stack(views).to(device)).logits.float()
    out = []
    for im in images:
        view, _ = _resized(im, settings.cls_test_size, None)
        out.append(model.classifier(image_to_tensor(view)[None].to(device)).logits.float())
    return torch.cat(out)


@torch.no_grad()
def localize_batch(model: Localizer, images: Sequence[np.ndarray], gt_classes: list[np.ndarray],
                   settings: LocTestSettings, device: torch.device
                   ) -> list[dict[str, Any]]:
    """The pipeline on a few original images; returns per image ``guesses`` (k,) and, per
    method, ``boxes`` (k, 4) for the guesses and ``gt_boxes`` {class: (4,)} for the oracle."""
    logits = classify(model, images, settings, device)
    k = min(settings.topk_classes, logits.shape[1])
    guesses = logits.topk(k, dim=1).indices.cpu()
    wanted = []
    for g, gt in zip(guesses, gt_classes):
        extra = [c for c in dict.fromkeys(int(x) for x in gt) if c not in g.tolist()]
        wanted.append(torch.cat([g, torch.tensor(extra, dtype=torch.int64)]))
    proposals = dense_proposals(model.rpn, images, wanted, settings, device)
    refined = None
    if model.rcnn is not None:
        originals = ImageBatch.from_tensors([image_to_tensor(im) for im in images]).to(device)
        boxes = [torch.cat([b for b, _ in per_class]).to(device) if per_class else
                 torch.zeros(0, 4, device=device) for per_class in proposals]
        classes = [torch.cat([torch.full((len(b),), int(c), dtype=torch.int64)
                              for (b, _), c in zip(per_class, w)]).to(device)
                   if per_class else torch.zeros(0, dtype=torch.int64, device=device)
                   for per_class, w in zip(proposals, wanted)]
        new_boxes, new_scores = model.rcnn.refine(originals, boxes, classes)
        refined = []
        for per_class, nb, ns in zip(proposals, new_boxes, new_scores):
            sizes = [len(b) for b, _ in per_class]
            refined.append(list(zip(nb.cpu().split(sizes), ns.cpu().split(sizes))))
    out = []
    for i, (g, w) in enumerate(zip(guesses, wanted)):
        record: dict[str, Any] = {"guesses": g.numpy()}
        for method, per_class in (("RPN", proposals[i]),
                                  ("RPN+R-CNN", refined[i] if refined is not None else None)):
            if per_class is None:
                continue
            best = {int(c): _best(b, s) for c, (b, s) in zip(w.tolist(), per_class)}
            record[method] = {"boxes": np.stack([best[int(c)] for c in g.tolist()]),
                              "gt_boxes": {int(c): best[int(c)] for c in gt_classes[i]}}
        out.append(record)
    return out


@torch.no_grad()
def run_localizer(model: Localizer, loader: Iterable[list[Any]], dataset: Any,
                  settings: LocTestSettings, device: torch.device, progress: bool = True
                  ) -> list[tuple[int, dict[str, Any]]]:
    """(dataset index, record of ``localize_batch``) for every image this rank sees."""
    was_training = model.training
    model.eval()
    out = []
    bar = tqdm(loader, desc="localize", dynamic_ncols=True, leave=False,
               disable=not (progress and du.get_dist_info().is_main))
    try:
        for samples in bar:
            gt = [dataset.annotations(s.index)[1] for s in samples]
            records = localize_batch(model, [s.image for s in samples], gt, settings, device)
            out.extend(zip((s.index for s in samples), records))
    finally:
        model.train(was_training)
    return out


def score(records: Sequence[tuple[int, dict[str, Any]]], dataset: Any
          ) -> dict[str, dict[str, float]]:
    """Errors (percent) per method, from records in any order (duplicates dropped)."""
    unique = dict(records)
    order = sorted(unique)
    gt_boxes, gt_labels = [], []
    for index in order:
        boxes, labels = dataset.annotations(index)
        gt_boxes.append(boxes)
        gt_labels.append(labels)
    metrics = {}
    for method in METHODS:
        if method not in unique[order[0]]:
            continue
        results = [LocalizationResult(unique[i]["guesses"], unique[i][method]["boxes"],
                                      unique[i][method]["gt_boxes"]) for i in order]
        metrics[method] = localization_errors(results, gt_labels, gt_boxes)
    return metrics


def evaluate_localizer(model: Localizer, loader: Iterable, dataset: Any,
                       settings: LocTestSettings, device: torch.device,
                       output_dir: str | Path | None = None) -> dict[str, dict[str, float]]:
    """Runs and scores the pipeline on every rank; the main rank logs the Table-13-style table
    and writes ``eval/metrics.json`` ({method: {error: percent}}) and ``eval/predictions.json``
    (per image: file, guessed classes and each method's boxes, original pixels)."""
    records = run_localizer(model, loader, dataset, settings, device)
    gathered = [r for part in du.all_gather_objects(records) for r in part]
    metrics = score(gathered, dataset) if du.get_dist_info().is_main else {}
    metrics = du.all_gather_objects(metrics)[0]
    if du.get_dist_info().is_main:
        logger.info(f"localization on {len(dataset)} images (scales {list(settings.scales)}):\n"
                    + format_table(metrics))
        if output_dir is not None:
            write_eval(Path(output_dir), metrics, gathered, dataset)
    return metrics


def write_eval(output_dir: Path, metrics: dict, records: Sequence[tuple[int, dict]],
               dataset: Any) -> None:
    names = list(dataset.class_names)
    preds = []
    for index, r in sorted(dict(records).items()):
        item: dict[str, Any] = {"file": str(dataset.image_paths[index]),
                                "guesses": [names[c] for c in r["guesses"].tolist()]}
        for method in METHODS:
            if method in r:
                item[method] = np.round(r[method]["boxes"], 2).tolist()
        preds.append(item)
    for name, obj in (("metrics.json", metrics), ("predictions.json", preds)):
        text = json.dumps(obj, indent=1)
        atomic_write_bytes(output_dir / "eval" / name, lambda f, t=text: f.write(t.encode()))


@torch.no_grad()
def training_proposals(rpn: PerClassRPN, loader: Iterable[list[Any]], dataset: Any,
                       settings: LocTestSettings, device: torch.device, progress: bool = True
                       ) -> dict[int, tuple[Tensor, Tensor]]:
    """The R-CNN's training samples (Appendix C): the RPN's top proposals for the
    ground-truth classes of each training image, as {index: (boxes (P, 4) original pixels,
    classes (P,))}, gathered from all ranks."""
    was_training = rpn.training
    rpn.eval()
    out = {}
    bar = tqdm(loader, desc="proposals", dynamic_ncols=True, leave=False,
               disable=not (progress and du.get_dist_info().is_main))
    try:
        for samples in bar:
            classes = [torch.as_tensor(np.unique(dataset.annotations(s.index)[1]),
                                       dtype=torch.int64) for s in samples]
            props = dense_proposals(rpn, [s.image for s in samples], classes, settings, device)
            for s, c, per_class in zip(samples, classes, props):
                boxes = torch.cat([b for b, _ in per_class]) if per_class else torch.zeros(0, 4)
                cls = torch.cat([torch.full((len(b),), int(k), dtype=torch.int64)
                                 for (b, _), k in zip(per_class, c.tolist())]) \
                    if per_class else torch.zeros(0, dtype=torch.int64)
                out[s.index] = (boxes, cls)
    finally:
        rpn.train(was_training)
    merged: dict[int, tuple[Tensor, Tensor]] = {}
    for part in du.all_gather_objects(out):
        merged.update(part)
    return merged
