"""Runs a detector over a dataset and scores it: COCO mAP (COCO-format sets) or VOC AP.

Each rank runs its slice of the test set; the results are gathered on every rank, images that
a padded sampler repeated are dropped, and the main rank evaluates and writes
``eval/metrics.json`` (``{"bbox": {...}}``, percent) and ``eval/coco_results.json`` (COCO results
format: original pixels, dataset category ids).
"""
from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from detres.engine import distributed as du
from detres.engine.checkpoint import atomic_write_bytes
from detres.evaluation.coco_eval import (detections_to_coco_results, evaluate_coco,
                                         format_metrics_table, merge_results)
from detres.evaluation.voc_eval import evaluate_voc
from detres.structures import Detections, ImageBatch, Targets

logger = logging.getLogger("detres")


@torch.no_grad()
def run_detector(model: nn.Module, loader: Iterable[tuple[ImageBatch, list[Targets]]],
                 device: torch.device, amp_dtype: torch.dtype | None = None,
                 progress: bool = True) -> list[tuple[Targets, Detections]]:
    """(targets, detections on the CPU) of every image this rank sees, in loader order."""
    was_training = model.training
    model.eval()
    out: list[tuple[Targets, Detections]] = []
    total = len(loader) if hasattr(loader, "__len__") else None
    bar = tqdm(loader, total=total, desc="eval", dynamic_ncols=True, leave=False,
               disable=not (progress and du.get_dist_info().is_main))
    try:
        for images, targets in bar:
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32,
                                enabled=amp_dtype is not None):
                detections = model(images.to(device, non_blocking=True)).detections
            out.extend(zip(targets, (d.to("cpu") for d in detections)))
    finally:
        model.train(was_training)
    return out


def coco_results(pairs: Sequence[tuple[Targets, Detections]],
                 label_to_category_id: Sequence[int]) -> list[dict]:
    return detections_to_coco_results([d for _, d in pairs], [t for t, _ in pairs],
                                      label_to_category_id)


def voc_inputs(dataset: Any, pairs: Sequence[tuple[Targets, Detections]]
               ) -> tuple[list[dict], list[dict]]:
    """Ground truth (with difficult flags) and detections, both in original pixels."""
    index_of = {int(i): k for k, i in enumerate(dataset.image_ids)}
    gts, dets = [], []
    for targets, d in pairs:
        ann = dataset.get_annotations(index_of[targets.image_id])
        gts.append({"boxes": ann["boxes"], "labels": ann["labels"], "difficult": ann["ignore"]})
        dets.append({"boxes": d.boxes.numpy() / targets.scale, "scores": d.scores.numpy(),
                     "labels": d.labels.numpy()})
    return gts, dets


def evaluate_detector(model: nn.Module, loader: Iterable, dataset: Any, device: torch.device,
                      metric: str = "coco", output_dir: str | Path | None = None,
                      amp_dtype: torch.dtype | None = None,
                      summary_only: bool = True) -> dict[str, Any]:
    """Scores ``model`` on ``dataset`` (whose test loader is ``loader``) on every rank.

    Args:
        metric: ``coco`` for COCO-format datasets (``dataset.annotation_file`` is the ground
            truth, crowd regions included), ``voc07`` or ``voc12`` for any dataset with
            ``get_annotations`` (difficult boxes ignored).
        output_dir: the run's folder; the main rank writes ``eval/`` there.

    Returns:
        The metrics, the same on every rank: the summary numbers, plus ``per_class`` unless
        ``summary_only`` (the training log takes the summary).
    """
    pairs = run_detector(model, loader, device, amp_dtype)
    if metric == "coco":
        gathered = du.all_gather_objects(coco_results(pairs, dataset.label_to_category_id))
        results = merge_results(gathered)
        metrics = {}
        if du.get_dist_info().is_main:
            metrics = evaluate_coco(dataset.annotation_file, results,
                                    class_names=list(dataset.class_names),
                                    image_ids=[int(i) for i in dataset.image_ids])
    else:
        gathered = du.all_gather_objects(voc_inputs(dataset, pairs))
        gts = [g for rank_gts, _ in gathered for g in rank_gts]
        dets = [d for _, rank_dets in gathered for d in rank_dets]
        results, metrics = None, {}
        if du.get_dist_info().is_main:
            metrics = evaluate_voc(gts, dets, list(dataset.class_names), metric=metric)
    metrics = du.all_gather_objects(metrics)[0]
    if du.get_dist_info().is_main:
        logger.info(f"{metric} box evaluation on {len(dataset)} images:\n"
                    + format_metrics_table(metrics))
        if output_dir is not None:
            write_eval(Path(output_dir), metrics, results)
    return {k: v for k, v in metrics.items() if not (summary_only and k == "per_class")}


def write_eval(output_dir: Path, metrics: dict[str, Any], results: list[dict] | None) -> None:
    """``eval/metrics.json`` (nan written as null) and ``eval/coco_results.json``, atomically."""
    def clean(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (float, np.floating)):
            return None if math.isnan(v) else float(v)
        return v
    text = json.dumps({"bbox": clean(metrics)}, indent=2)
    atomic_write_bytes(output_dir / "eval" / "metrics.json", lambda f: f.write(text.encode()))
    if results is not None:
        body = json.dumps(results)
        atomic_write_bytes(output_dir / "eval" / "coco_results.json",
                           lambda f: f.write(body.encode()))
