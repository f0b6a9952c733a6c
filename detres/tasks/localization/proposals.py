"""The R-CNN's training samples (He et al. 2015, Appendix C): the per-class RPN's top
proposals for the ground-truth classes of each training image, made once after the RPN stage
and cached in ``rcnn/proposals.pth`` so a resumed run does not make them again.
"""
from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from detres.data.loc_transforms import scaled_batch
from detres.engine import distributed as du
from detres.engine.checkpoint import atomic_save
from detres.evaluation.inference import run_inference
from detres.models.loc_inference import LocTestSettings, dense_proposals, flat_proposals
from detres.models.localizer import PerClassRPN

Proposals = dict[int, tuple[Tensor, Tensor]]


def training_proposals(rpn: PerClassRPN, loader: Iterable[list[Any]], dataset: Any,
                       settings: LocTestSettings, device: torch.device) -> Proposals:
    """{index: (boxes (P, 4) original pixels, classes (P,))} for every image of ``dataset``
    (the loader yields lists of untransformed samples), gathered from all ranks."""
    def step(samples: list[Any]) -> list[tuple[int, tuple[Tensor, Tensor]]]:
        images = [s.image for s in samples]
        classes = [torch.as_tensor(np.unique(dataset.get_annotations(s.index)["labels"]),
                                   dtype=torch.int64) for s in samples]
        scales = [scaled_batch(images, s, settings.max_size) for s in settings.scales]
        props = dense_proposals(rpn, scales, classes, settings, device)
        return [(s.index, flat_proposals(p, c)) for s, p, c in zip(samples, props, classes)]

    merged: Proposals = {}
    for part in du.all_gather_objects(dict(run_inference(rpn, loader, step, desc="proposals"))):
        merged.update(part)
    return merged


def cached_training_proposals(path: Path, resume: bool, rpn: PerClassRPN,
                              loader: Iterable[list[Any]], dataset: Any,
                              settings: LocTestSettings, device: torch.device) -> Proposals:
    """``training_proposals``, read from ``path`` when resuming and it exists, else made and
    written there by the main rank."""
    if resume and path.is_file():
        stored = torch.load(path, map_location="cpu", weights_only=True)
        return {int(k): (v[0], v[1]) for k, v in stored.items()}
    proposals = training_proposals(rpn, loader, dataset, settings, device)
    if du.get_dist_info().is_main:
        atomic_save({k: list(v) for k, v in proposals.items()}, path)
    return proposals
