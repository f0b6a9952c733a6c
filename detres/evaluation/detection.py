"""Box evaluators: a detector's detections on a test set -> COCO mAP (``COCOEvaluator``), VOC
or ILSVRC DET AP (``VOCEvaluator``), or an evaluation server's results files, unscored
(``FormatOnlyEvaluator``); each runs in :func:`~detres.evaluation.inference.inference_on_dataset`.

Each rank processes the images its loader gives it; ``evaluate`` gathers their detections on
the main rank, which scores them, logs the table and writes ``eval/metrics.json``
(``{"bbox": {...}}``, percent) and, for COCO, ``eval/coco_results.json`` (COCO results format:
original pixels, dataset category ids). Every rank returns the metrics.

With ``data.skip_bad_images`` an unreadable test image is never replaced by another one (that
image's detections would count twice): it arrives as ``SkippedImageTargets`` under its own id,
gets no detections (its ground truth counts as missed) and is named in a warning.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from detres.atomic import atomic_write_bytes
from detres.engine.logging import write_json
from detres.evaluation.coco_eval import (detections_to_coco_results, evaluate_coco,
                                         format_metrics_table, load_ground_truth, load_results)
from detres.evaluation.ilsvrc_det_eval import evaluate_imagenet_det
from detres.evaluation.inference import DatasetEvaluator, score_on_main
from detres.evaluation.voc_eval import coco_to_voc_inputs, evaluate_voc
from detres.structures import Detections, ImageBatch, SkippedImageTargets, Targets

logger = logging.getLogger("detres")


@dataclass(frozen=True)
class DatasetInfo:
    """What the box evaluators read of a test set; the task fills it from its dataset
    (``tasks/detection/inference.py::dataset_info``).

    Attributes:
        class_names: K names, by label.
        image_ids: every image of the set (what COCO scores over; the count in messages).
        annotation_file: its COCO-format ground truth (``COCOEvaluator``), crowd regions
            included.
        label_to_category_id: label k -> the dataset's category id (COCO results).
        annotations: image id -> ``boxes`` (M, 4) xyxy in original pixels, ``labels`` (M,),
            ``ignore`` (M,) bool (difficult / crowd): the ground truth of ``VOCEvaluator``.
        file_stem: image id -> its file name without extension (the VOC results files).
    """

    class_names: Sequence[str]
    image_ids: Sequence[int]
    annotation_file: str | os.PathLike | None = None
    label_to_category_id: Sequence[int] = ()
    annotations: Callable[[int], Mapping[str, np.ndarray]] | None = None
    file_stem: Callable[[int], str] | None = None


class ImageResult(NamedTuple):
    """One test image's detections, as the box evaluators keep and gather them."""

    image_id: int
    scale: float                 # resized / original: boxes are divided by it
    skipped: bool                # unreadable (SkippedImageTargets): no detections
    detections: Detections       # on the CPU, pixels of the resized image


class BoxEvaluator(DatasetEvaluator):
    """Keeps the detections of every image this rank processes; ``evaluate`` gathers them on
    the main rank, which warns about unreadable images and calls ``score`` once. Every rank
    returns the result, without ``per_class`` when ``summary_only`` (the training log takes
    the summary; the files have everything)."""

    def __init__(self, info: DatasetInfo, output_dir: str | Path | None = None,
                 summary_only: bool = True) -> None:
        self.info = info
        self.output_dir = None if output_dir is None else Path(output_dir)
        self.summary_only = summary_only
        self._results: list[ImageResult] = []

    def reset(self) -> None:
        self._results = []

    def process(self, inputs: tuple[ImageBatch, Sequence[Targets]],
                outputs: Sequence[Detections]) -> None:
        """``inputs``: the loader's (images, targets); ``outputs``: one ``Detections`` per
        image, in the resized image's pixels."""
        _, targets = inputs
        if len(outputs) != len(targets):
            raise ValueError(f"{len(outputs)} Detections for {len(targets)} images")
        for t, d in zip(targets, outputs):
            skipped = isinstance(t, SkippedImageTargets)
            self._results.append(ImageResult(int(t.image_id), float(t.scale), skipped,
                                             Detections.empty() if skipped else d.to("cpu")))

    def evaluate(self) -> dict[str, Any]:
        metrics = score_on_main(self._results, self._score_all)
        return {k: v for k, v in metrics.items() if not (self.summary_only and k == "per_class")}

    def _score_all(self, results: list[ImageResult]) -> dict[str, Any]:
        results = first_per_image(results)
        report_skipped(results, len(self.info.image_ids))
        return self.score(results)

    def score(self, results: list[ImageResult]) -> dict[str, Any]:
        """The metrics of every rank's images (main rank only); writes the files."""
        raise NotImplementedError

    def _write_metrics(self, name: str, metrics: dict[str, Any]) -> None:
        logger.info(f"{name} box evaluation on {len(self.info.image_ids)} images:\n"
                    + format_metrics_table(metrics))
        if self.output_dir is not None:
            write_eval(self.output_dir / "eval" / "metrics.json", metrics)


class COCOEvaluator(BoxEvaluator):
    """COCO box AP/AR against ``info.annotation_file`` (:func:`evaluate_coco`; ``engine``:
    ``faster`` (faster-coco-eval) or ``pycocotools``); also writes the detections as
    ``eval/coco_results.json``."""

    def __init__(self, info: DatasetInfo, output_dir: str | Path | None = None,
                 engine: str = "faster", summary_only: bool = True) -> None:
        if info.annotation_file is None:
            raise ValueError("COCO evaluation needs the test set's COCO-format annotation file; "
                             "score other sets with voc07, voc12 or imagenet_det")
        super().__init__(info, output_dir, summary_only)
        self.engine = engine

    def score(self, results: list[ImageResult]) -> dict[str, Any]:
        coco = coco_results(results, self.info.label_to_category_id)
        metrics = evaluate_coco(self.info.annotation_file, coco, engine=self.engine,
                                class_names=list(self.info.class_names),
                                image_ids=[int(i) for i in self.info.image_ids])
        self._write_metrics("coco", metrics)
        if self.output_dir is not None:
            write_json(self.output_dir / "eval" / "coco_results.json", coco, indent=None)
        return metrics


class VOCEvaluator(BoxEvaluator):
    """Box AP per class and its mean against ``info.annotations`` (difficult boxes ignored):
    ``metric`` ``voc07`` (11-point) or ``voc12`` (area), VOC's matching at IoU 0.5, or
    ``imagenet_det`` (ILSVRC DET's matching, evaluation/ilsvrc_det_eval.py)."""

    def __init__(self, info: DatasetInfo, metric: str = "voc07",
                 output_dir: str | Path | None = None, summary_only: bool = True) -> None:
        if metric not in ("voc07", "voc12", "imagenet_det"):
            raise ValueError(f"metric must be voc07, voc12 or imagenet_det, got {metric!r}")
        if info.annotations is None:
            raise ValueError("VOCEvaluator needs the test set's annotations")
        super().__init__(info, output_dir, summary_only)
        self.metric = metric

    def score(self, results: list[ImageResult]) -> dict[str, Any]:
        gts, dets = [], []
        for r in results:
            ann = self.info.annotations(r.image_id)
            gts.append({"boxes": ann["boxes"], "labels": ann["labels"],
                        "difficult": ann["ignore"]})
            d = r.detections
            dets.append({"boxes": d.boxes.numpy() / r.scale, "scores": d.scores.numpy(),
                         "labels": d.labels.numpy()})
        metrics = evaluate_box_ap(gts, dets, list(self.info.class_names), self.metric)
        self._write_metrics(self.metric, metrics)
        return metrics


class FormatOnlyEvaluator(BoxEvaluator):
    """No scoring (a test set without public ground truth): writes the results for the
    evaluation server under ``output_dir/eval`` and returns the counts written.

    ``style`` ``coco``: ``eval/coco_results.json`` (dataset image and category ids); ``voc``:
    the devkit's ``eval/results/VOC<year>/Main/comp4_det_<split>_<class>.txt`` (image names,
    1-based boxes), year and split from ``voc_split``; ``ilsvrc_det``: the ILSVRC devkit's
    detection submission, ``eval/ilsvrc_det_results.txt`` (image indices, DET ids from the
    dataset's ``label_to_category_id``, 1-based boxes).
    """

    def __init__(self, info: DatasetInfo, output_dir: str | Path | None, style: str = "coco",
                 voc_split: tuple[str, str] = ("2012", "test")) -> None:
        if output_dir is None:
            raise ValueError("test.format_only needs an output folder for the results files")
        if style not in ("coco", "voc", "ilsvrc_det"):
            raise ValueError(f"style must be coco, voc or ilsvrc_det, got {style!r}")
        if style == "voc" and info.file_stem is None:
            raise ValueError("the VOC results files need the test set's file names")
        if style == "ilsvrc_det" and len(info.label_to_category_id) != len(info.class_names):
            raise ValueError("the ILSVRC DET results file needs each class's DET id: put the "
                             "ILSVRC devkit (devkit/data/map_det.txt) in the data folder")
        super().__init__(info, output_dir)
        self.style, self.voc_split = style, voc_split

    def score(self, results: list[ImageResult]) -> dict[str, Any]:
        if self.style == "coco":
            written = coco_results(results, self.info.label_to_category_id)
            path = self.output_dir / "eval" / "coco_results.json"
            write_json(path, written, indent=None)
        elif self.style == "ilsvrc_det":
            written = ilsvrc_det_result_lines(results, self.info.label_to_category_id)
            path = self.output_dir / "eval" / "ilsvrc_det_results.txt"
            data = "".join(line + "\n" for line in written).encode()
            atomic_write_bytes(path, lambda f: f.write(data))
        else:
            written = voc_result_lines(results, self.info.file_stem)
            path = self.output_dir / "eval" / "results"
            write_voc_results(path, self.info.class_names, written, self.voc_split)
        num_images = len(self.info.image_ids)
        logger.info(f"format only: {len(written)} detections on {num_images} images written "
                    f"to {path} (no ground truth scored)")
        return {"format_only": str(path), "num_images": num_images,
                "num_detections": len(written)}


def first_per_image(results: Sequence[ImageResult]) -> list[ImageResult]:
    """``results`` without the repeats of an image id (a padded distributed sampler repeats a
    few images so that every rank gets as many): the first one of each image is kept."""
    seen: set[int] = set()
    out = []
    for r in results:
        if r.image_id not in seen:
            seen.add(r.image_id)
            out.append(r)
    return out


def coco_results(results: Sequence[ImageResult], label_to_category_id: Sequence[int]
                 ) -> list[dict]:
    """The detections in COCO results format (original pixels, dataset category ids)."""
    return detections_to_coco_results([r.detections for r in results],
                                      [(r.image_id, r.scale) for r in results],
                                      label_to_category_id)


def devkit_detections(r: ImageResult) -> list[tuple[str, float, int]]:
    """(box, score, label) per detection of one image, the box as ``xmin ymin xmax ymax`` in
    the original image's 1-based inclusive pixels of the VOC and ILSVRC devkits (the inverse
    of data/voc.py::read_pascal_xml)."""
    d = r.detections
    boxes = d.boxes.double().numpy() / r.scale
    return [(f"{x1 + 1:.1f} {y1 + 1:.1f} {x2:.1f} {y2:.1f}", score, label)
            for (x1, y1, x2, y2), score, label in zip(boxes, d.scores.tolist(),
                                                      d.labels.tolist())]


def voc_result_lines(results: Sequence[ImageResult], file_stem: Callable[[int], str]
                     ) -> list[tuple[int, str]]:
    """(label, line) per detection in the VOC devkit's results format: ``name score xmin
    ymin xmax ymax`` with VOC's 1-based inclusive pixels (the inverse of data/voc.py)."""
    return [(label, f"{file_stem(r.image_id)} {score:.6f} {box}")
            for r in results for box, score, label in devkit_detections(r)]


def ilsvrc_det_result_lines(results: Sequence[ImageResult], det_ids: Sequence[int]
                            ) -> list[str]:
    """One line per detection in the ILSVRC devkit's detection submission format,
    ``<image_index> <DET id> <confidence> <xmin> <ymin> <xmax> <ymax>``, with the 1-based
    pixels of its XMLs (the inverse of data/ilsvrc_det.py), images in index order."""
    return [f"{r.image_id} {det_ids[label]} {score:.6f} {box}"
            for r in sorted(results, key=lambda r: r.image_id)
            for box, score, label in devkit_detections(r)]


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


def report_skipped(results: Sequence[ImageResult], num_images: int) -> None:
    """Warns about the test images, of all ranks, that could not be read."""
    ids = sorted(r.image_id for r in results if r.skipped)
    if ids:
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
