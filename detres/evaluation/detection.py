"""Runs a detector over a dataset and scores it: COCO mAP (COCO-format sets) or VOC AP.

Each rank runs its slice of the test set; the results are gathered on every rank (in any order:
the scores do not depend on it) and the main rank evaluates and writes ``eval/metrics.json``
(``{"bbox": {...}}``, percent) and ``eval/coco_results.json`` (COCO results format: original
pixels, dataset category ids).

With ``data.skip_bad_images`` an unreadable test image is never replaced by another one (that
image's detections would count twice): it arrives as ``SkippedImageTargets`` under its own id,
gets no detections (its ground truth counts as missed) and is named in a warning.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from detres.atomic import atomic_write_bytes
from detres.data.io import SkippedImageTargets
from detres.engine import distributed as du
from detres.engine.logging import write_json
from detres.evaluation.coco_eval import (detections_to_coco_results, evaluate_coco,
                                         format_metrics_table, load_ground_truth, load_results,
                                         merge_results)
from detres.evaluation.ilsvrc_det_eval import evaluate_imagenet_det
from detres.evaluation.inference import run_inference
from detres.evaluation.voc_eval import coco_to_voc_inputs, evaluate_voc
from detres.models.fast import autocast, inference_amp_dtype, prepare_for_inference
from detres.structures import Detections, ImageBatch, Targets

logger = logging.getLogger("detres")


def run_detector(model: nn.Module, loader: Iterable[tuple[ImageBatch, list[Targets]]],
                 device: torch.device, amp_dtype: torch.dtype | None = None,
                 progress: bool = True, fast_path: bool = True, cpu_amp: str = "auto",
                 compile: bool = False) -> list[tuple[Targets, Detections]]:
    """(targets, detections on the CPU) of every image this rank sees, in loader order; an
    image that could not be read (``SkippedImageTargets``) has empty detections.

    The model runs in its inference form (:func:`detres.models.fast.prepare_for_inference`,
    on a copy: ``model`` and its checkpoints keep their form) unless ``fast_path`` is False,
    under autocast to ``amp_dtype`` on CUDA and as ``cpu_amp`` says on the CPU
    (``test.fast_path``, ``test.cpu_amp``, ``test.compile``)."""
    if fast_path or compile:
        model = prepare_for_inference(model, fuse=fast_path, channels_last=fast_path,
                                      compile=compile)
    if amp_dtype is None:
        amp_dtype = inference_amp_dtype(device, cpu_amp)

    def step(batch: tuple[ImageBatch, list[Targets]]) -> list[tuple[Targets, Detections]]:
        images, targets = batch
        skipped = [isinstance(t, SkippedImageTargets) for t in targets]
        detections = [Detections.empty()] * len(targets)
        if not all(skipped):
            with autocast(device, amp_dtype):
                detections = model(images.to(device, non_blocking=True)).detections
        return [(t, Detections.empty() if s else d.to("cpu"))
                for t, s, d in zip(targets, skipped, detections)]

    return run_inference(model, loader, step, desc="eval", progress=progress)


def coco_results(pairs: Sequence[tuple[Targets, Detections]],
                 label_to_category_id: Sequence[int]) -> list[dict]:
    """Every rank's detections in COCO results format, gathered on every rank."""
    return merge_results(du.all_gather_objects(detections_to_coco_results(
        [d for _, d in pairs], [t for t, _ in pairs], label_to_category_id)))


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
                      amp_dtype: torch.dtype | None = None, summary_only: bool = True,
                      engine: str = "faster", format_only: bool = False,
                      voc_split: tuple[str, str] = ("2012", "test"), fast_path: bool = True,
                      cpu_amp: str = "auto", compile: bool = False) -> dict[str, Any]:
    """Scores ``model`` on ``dataset`` (whose test loader is ``loader``) on every rank.

    Args:
        amp_dtype, fast_path, cpu_amp, compile: how the model runs (:func:`run_detector`).
        metric: ``coco`` for COCO-format datasets (``dataset.annotation_file`` is the ground
            truth, crowd regions included), ``voc07`` or ``voc12`` for any dataset with
            ``get_annotations`` (difficult boxes ignored), ``imagenet_det`` likewise with
            ILSVRC DET's matching (evaluation/ilsvrc_det_eval.py).
        engine: the COCO engine, ``faster`` (faster-coco-eval) or ``pycocotools``.
        output_dir: the run's folder; the main rank writes ``eval/`` there.
        format_only: no scoring (a test set without public ground truth): write the results
            for the evaluation server, ``eval/coco_results.json`` (metric ``coco``: dataset
            image and category ids) or the VOC submission files ``eval/results/VOC<year>/Main/
            comp4_det_<split>_<class>.txt`` (``voc07``/``voc12``: image names, 1-based boxes;
            year and split from ``voc_split``), and return the counts written.

    Returns:
        The metrics, the same on every rank: the summary numbers, plus ``per_class`` unless
        ``summary_only`` (the training log takes the summary).
    """
    for d in (dataset, getattr(loader, "dataset", None)):
        if hasattr(d, "substitute_bad_images"):
            d.substitute_bad_images = False   # a bad test image must not stand in for another
    pairs = run_detector(model, loader, device, amp_dtype, fast_path=fast_path, cpu_amp=cpu_amp,
                         compile=compile)
    _report_skipped(pairs, len(dataset))
    if format_only:
        return write_results_only(pairs, dataset, metric, output_dir, voc_split)
    if metric == "coco":
        results = coco_results(pairs, dataset.label_to_category_id)
        metrics = {}
        if du.get_dist_info().is_main:
            metrics = evaluate_coco(dataset.annotation_file, results, engine=engine,
                                    class_names=list(dataset.class_names),
                                    image_ids=[int(i) for i in dataset.image_ids])
    else:
        gathered = du.all_gather_objects(voc_inputs(dataset, pairs))
        gts = [g for rank_gts, _ in gathered for g in rank_gts]
        dets = [d for _, rank_dets in gathered for d in rank_dets]
        results, metrics = None, {}
        if du.get_dist_info().is_main:
            metrics = evaluate_box_ap(gts, dets, list(dataset.class_names), metric)
    metrics = du.all_gather_objects(metrics)[0]
    if du.get_dist_info().is_main:
        logger.info(f"{metric} box evaluation on {len(dataset)} images:\n"
                    + format_metrics_table(metrics))
        if output_dir is not None:
            write_eval(Path(output_dir) / "eval" / "metrics.json", metrics)
            if results is not None:
                write_json(Path(output_dir) / "eval" / "coco_results.json", results, indent=None)
    return {k: v for k, v in metrics.items() if not (summary_only and k == "per_class")}


def write_results_only(pairs: Sequence[tuple[Targets, Detections]], dataset: Any, metric: str,
                       output_dir: str | Path | None,
                       voc_split: tuple[str, str] = ("2012", "test")) -> dict[str, Any]:
    """The format-only branch of :func:`evaluate_detector`: gathers every rank's detections
    and writes the server's files under ``output_dir/eval`` (main rank)."""
    if output_dir is None:
        raise ValueError("test.format_only needs an output folder for the results files")
    if metric == "coco":
        results = coco_results(pairs, dataset.label_to_category_id)
        path = Path(output_dir) / "eval" / "coco_results.json"
        if du.get_dist_info().is_main:
            write_json(path, results, indent=None)
    else:
        lines = du.all_gather_objects(voc_result_lines(dataset, pairs))
        results = [line for rank in lines for line in rank]
        path = Path(output_dir) / "eval" / "results"
        if du.get_dist_info().is_main:
            write_voc_results(path, dataset.class_names, results, voc_split)
    summary = {"format_only": str(path), "num_images": len(dataset),
               "num_detections": len(results)}
    if du.get_dist_info().is_main:
        logger.info(f"format only: {len(results)} detections on {len(dataset)} images written "
                    f"to {path} (no ground truth scored)")
    return summary


def voc_result_lines(dataset: Any, pairs: Sequence[tuple[Targets, Detections]]
                     ) -> list[tuple[int, str]]:
    """(label, line) per detection in the VOC devkit's results format: ``name score xmin
    ymin xmax ymax`` with VOC's 1-based inclusive pixels (the inverse of data/voc.py)."""
    index_of = {int(i): k for k, i in enumerate(dataset.image_ids)}
    out = []
    for targets, d in pairs:
        name = dataset.path(index_of[targets.image_id]).stem
        boxes = d.boxes.double().numpy() / targets.scale
        for (x1, y1, x2, y2), score, label in zip(boxes, d.scores.tolist(), d.labels.tolist()):
            out.append((label, f"{name} {score:.6f} {x1 + 1:.1f} {y1 + 1:.1f} {x2:.1f} {y2:.1f}"))
    return out


def write_voc_results(folder: Path, class_names: Sequence[str], lines: Sequence[tuple[int, str]],
                      voc_split: tuple[str, str]) -> None:
    """One ``comp4_det_<split>_<class>.txt`` per class (every class, empty ones too) under
    ``folder/VOC<year>/Main/``, the layout the VOC evaluation server takes as a tar."""
    year, split = voc_split
    main = folder / f"VOC{year}" / "Main"
    for label, name in enumerate(class_names):
        text = "".join(line + "\n" for k, line in lines if k == label)
        data = text.encode()
        atomic_write_bytes(main / f"comp4_det_{split}_{name}.txt", lambda f: f.write(data))


def _report_skipped(pairs: Sequence[tuple[Targets, Detections]], num_images: int) -> None:
    """Warns (main rank) about the test images, of all ranks, that could not be read."""
    ids = [t.image_id for t, _ in pairs if isinstance(t, SkippedImageTargets)]
    ids = sorted(i for rank_ids in du.all_gather_objects(ids) for i in rank_ids)
    if ids and du.get_dist_info().is_main:
        logger.warning(f"{len(ids)} of {num_images} test images could not be read and count as "
                       f"having no detections (image ids {ids[:20]}"
                       f"{' ...' if len(ids) > 20 else ''})")


def write_eval(path: str | Path, metrics: dict[str, Any]) -> None:
    """``{"bbox": metrics}`` as JSON at ``path`` (percent; nan written as null)."""
    write_json(path, {"bbox": metrics})


def evaluate_files(gt: str | os.PathLike, dt: str | os.PathLike, metric: str = "coco",
                   engine: str = "faster") -> dict[str, Any]:
    """Metrics of a COCO results file against a COCO-format ground-truth file."""
    if metric == "coco":
        return evaluate_coco(gt, dt, engine=engine)
    gt_dataset = load_ground_truth(gt)
    results = load_results(dt, gt_dataset)
    gt_per_image, dets_per_image, class_names = coco_to_voc_inputs(gt_dataset, results)
    return evaluate_box_ap(gt_per_image, dets_per_image, class_names, metric)


def evaluate_box_ap(gt_per_image: Sequence[Any], detections_per_image: Sequence[Any],
                    class_names: Sequence[str], metric: str) -> dict[str, Any]:
    """Box AP by ``metric``: ``voc07``/``voc12`` (VOC, IoU 0.5) or ``imagenet_det`` (ILSVRC
    DET: per-box IoU of at most 0.5, its matching, area AP)."""
    if metric == "imagenet_det":
        return evaluate_imagenet_det(gt_per_image, detections_per_image, class_names)
    return evaluate_voc(gt_per_image, detections_per_image, class_names, metric=metric)
