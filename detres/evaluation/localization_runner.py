"""Runs the localizer of Appendix C over a dataset and scores it (Table 13).

The loader yields lists of samples with untransformed images (the dataset is built with
``transform=None``); :func:`localize_batch` makes their test-time views on the data side
(``detres.data.loc_transforms``) and runs ``Localizer.predict``. Each rank runs its shard; the
predictions are gathered and the main rank scores them with ``evaluation/localization.py`` and
writes ``eval/metrics.json`` and ``eval/predictions.json``.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from detres.data.loc_transforms import (centre_crop_batch, classifier_views, original_batch,
                                        scaled_batch)
from detres.engine import distributed as du
from detres.engine.logging import write_json
from detres.evaluation.inference import run_inference
from detres.evaluation.localization import LocalizationResult, format_table, localization_errors
from detres.models.loc_inference import LocalizerEnsemble, LocTestSettings, LocViews
from detres.models.localizer import Localizer

logger = logging.getLogger("detres")
METHODS = ("RPN", "RPN+R-CNN")


def loc_views(images: Sequence[np.ndarray], settings: LocTestSettings, originals: bool
              ) -> LocViews:
    """The views of original images that ``Localizer.predict`` needs (``originals``: for
    an R-CNN): the classifier's (``settings.cls_mode``), the RPN's (``settings.rpn_mode``:
    every test scale, or the one centre crop at the first)."""
    if settings.rpn_mode == "one_crop":
        rpn_views = [centre_crop_batch(images, settings.scales[0], settings.rpn_crop)]
    elif settings.rpn_mode == "dense":
        rpn_views = [scaled_batch(images, s, settings.max_size) for s in settings.scales]
    else:
        raise ValueError(f"unknown RPN test mode {settings.rpn_mode!r}; valid: dense, one_crop")
    return LocViews([classifier_views(im, settings.cls_mode, settings.cls_test_size,
                                      settings.cls_crop, settings.cls_scales) for im in images],
                    rpn_views, original_batch(images) if originals else None)


def localize_batch(model: Localizer | LocalizerEnsemble, images: Sequence[np.ndarray],
                   gt_classes: Sequence[Sequence[int]], settings: LocTestSettings,
                   device: torch.device) -> list[dict[str, Any]]:
    """The pipeline on a few original images; per image ``guesses`` (k,), ``guess_scores``
    (k,) and, per method, ``boxes`` (k, 4) and ``box_scores`` (k,) for the guesses and
    ``gt_boxes`` {class: (4,)} for the oracle (numpy, original pixels)."""
    views = loc_views(images, settings, model.has_rcnn)
    out = []
    for record in model.predict(views, gt_classes, settings, device):
        item: dict[str, Any] = {"guesses": record["guesses"].numpy(),
                                "guess_scores": record["guess_scores"].numpy()}
        for method in METHODS:
            if method in record:
                r = record[method]
                item[method] = {"boxes": r["boxes"].numpy(), "box_scores": r["box_scores"].numpy(),
                                "gt_boxes": {c: b.numpy() for c, b in r["gt_boxes"].items()}}
        out.append(item)
    return out


def score(records: Sequence[tuple[int, dict[str, Any]]], dataset: Any
          ) -> dict[str, dict[str, float]]:
    """Errors (percent) per method, from records in any order (duplicates dropped)."""
    unique = dict(records)
    order = sorted(unique)
    annotations = [dataset.get_annotations(index) for index in order]
    metrics = {}
    for method in METHODS:
        if method not in unique[order[0]]:
            continue
        results = [LocalizationResult(unique[i]["guesses"], unique[i][method]["boxes"],
                                      unique[i][method]["gt_boxes"]) for i in order]
        metrics[method] = localization_errors(results, [a["labels"] for a in annotations],
                                              [a["boxes"] for a in annotations])
    return metrics


def evaluate_localizer(model: Localizer | LocalizerEnsemble, loader: Iterable, dataset: Any,
                       settings: LocTestSettings, device: torch.device,
                       output_dir: str | Path | None = None) -> dict[str, dict[str, float]]:
    """Runs and scores the pipeline on every rank; the main rank logs the Table-13-style table
    and writes ``eval/metrics.json`` ({method: {error: percent}}) and ``eval/predictions.json``
    (per image: file, guessed classes and each method's boxes, original pixels)."""
    def step(samples: list[Any]) -> list[tuple[int, dict[str, Any]]]:
        gt = [dataset.get_annotations(s.index)["labels"] for s in samples]
        records = localize_batch(model, [s.image for s in samples], gt, settings, device)
        return list(zip((s.index for s in samples), records))

    records = run_inference(model, loader, step, desc="localize")
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
        item: dict[str, Any] = {"file": str(dataset.path(index)),
                                "guesses": [names[c] for c in r["guesses"].tolist()]}
        for method in METHODS:
            if method in r:
                item[method] = np.round(r[method]["boxes"], 2).tolist()
        preds.append(item)
    write_json(output_dir / "eval" / "metrics.json", metrics, indent=1)
    write_json(output_dir / "eval" / "predictions.json", preds, indent=1)
