"""The localizer's test pipeline on a few images, as evaluation, the ``LocPredictor`` and the
tests run it (He et al. 2015, Appendix C): the test-time views of the original images (the
data side, ``data/loc_transforms.py``) and ``Localizer.predict`` on them. Evaluation only loops
and scores (``evaluation/localization_runner.py``): it imports nothing of ``data/`` or
``models/`` (docs/architecture.md, Layers), so the views and the networks are chosen here.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from detres.data.loc_transforms import (centre_crop_batch, classifier_views, original_batch,
                                        scaled_batch)
from detres.evaluation.localization_runner import METHODS
from detres.models.loc_inference import LocalizerEnsemble, LocTestSettings, LocViews
from detres.models.localizer import Localizer


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


class BatchLocalizer(nn.Module):
    """A localizer (or an ensemble) as evaluation runs it: a test batch (samples of the
    dataset built with ``transform=None``) -> one :func:`localize_batch` record per sample;
    the oracle's ground-truth classes come from ``dataset.get_annotations``."""

    def __init__(self, model: Localizer | LocalizerEnsemble, dataset: Any,
                 settings: LocTestSettings, device: torch.device) -> None:
        super().__init__()
        self.model, self.dataset, self.settings, self.device = model, dataset, settings, device

    def forward(self, samples: Sequence[Any]) -> list[dict[str, Any]]:
        gt = [self.dataset.get_annotations(s.index)["labels"] for s in samples]
        return localize_batch(self.model, [s.image for s in samples], gt, self.settings,
                              self.device)
