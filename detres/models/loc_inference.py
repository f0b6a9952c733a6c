"""Test-time pieces of the localizer (He et al. 2015, Appendix C), used by
``Localizer.predict`` and by the R-CNN's training proposals: the test settings, the views of
the images that the data side makes (``detres.data.loc_transforms``), the dense per-class
proposals of several scales merged into one list per class, the R-CNN run on pieces of at
most ``LocTestSettings.rcnn_chunk`` proposals, and how an ensemble merges its members
(Appendix C: "an ensemble of networks for both classification and localization").

This module runs any model that has the methods of :class:`LocModel` (``Localizer`` in
``models/localizer.py``, which imports this module, or :class:`LocalizerEnsemble`); it imports
nothing of ``localizer.py``, so the two depend one way.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor
from torchvision.ops import nms

from detres.models.inference_form import autocast, inference_amp_dtype
from detres.structures import ImageBatch

# per image, per class: (boxes (P, 4), scores (P,)), best first
ClassProposals = list[list[tuple[Tensor, Tensor]]]


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
    # "single": the view above; "ten_crop": 10 crops of cls_crop at cls_test_size;
    # "multiscale": the whole image at each of cls_scales (Sec. 3.4), softmax averaged
    cls_mode: str = "single"
    cls_scales: tuple[int, ...] = (224, 256, 384, 480, 640)
    # "dense": the RPN on the whole image at each scale; "one_crop": on the rpn_crop x rpn_crop
    # centre crop of the image at scales[0] only (Table 13's first row)
    rpn_mode: str = "dense"
    rpn_crop: int = 224
    # proposals the R-CNN warps and runs per forward; a whole batch's at once (4 images x 6
    # classes x 200 proposals at 224 px through ResNet-101) take tens of GB of activations
    rcnn_chunk: int = 256
    # autocast dtype on CUDA (training's train.amp), None for fp32; a CPU runs in fp32
    cuda_amp: torch.dtype | None = None


# One view of N images for the RPN: the padded batch, each image's resized/original factor, and
# each image's (x, y) position of the batch's pixel (0, 0) in the resized image (0 unless
# cropped); a box b of the view is (b + (x, y, x, y)) / factor in original pixels.
RPNView = tuple[ImageBatch, list[float], list[tuple[float, float]]]


@dataclass
class LocViews:
    """N images as the three networks see them at test time (CPU, uint8).

    Attributes:
        classifier: per image its (3, h, w) views: one centre crop or whole resized image, ten
            crops, or the whole image at several scales (scores averaged over them).
        scales: the RPN's views (``RPNView``): per test scale, or the one centre crop.
        originals: the original images, for the R-CNN's crops (None without an R-CNN).
    """

    classifier: list[list[Tensor]]
    scales: list[RPNView]
    originals: ImageBatch | None = None


class Proposer(Protocol):
    """The RPN side that :func:`dense_proposals` runs (``PerClassRPN.propose``)."""

    def propose(self, images: ImageBatch, classes: list[Tensor], *, topk: int,
                pre_nms_topk: int, nms_threshold: float | None) -> ClassProposals: ...


class LocModel(Protocol):
    """What :func:`localize` runs: a ``Localizer`` or a :class:`LocalizerEnsemble`."""

    @property
    def has_rcnn(self) -> bool: ...

    def class_scores(self, views: list[list[Tensor]], device: torch.device) -> Tensor: ...

    def proposals(self, views: Sequence[RPNView], wanted: list[Tensor],
                  settings: LocTestSettings, device: torch.device) -> ClassProposals: ...

    def refine(self, originals: ImageBatch, proposals: ClassProposals, wanted: list[Tensor],
               device: torch.device) -> ClassProposals: ...


def inference_autocast(settings: LocTestSettings, device: torch.device) -> torch.autocast:
    """Autocast of the test pipeline, as detection's evaluation: ``settings.cuda_amp`` on CUDA,
    fp32 on a CPU (the localization config has no ``test.cpu_amp``)."""
    return autocast(device, inference_amp_dtype(device, "none", settings.cuda_amp))


def to_original(boxes: Tensor, factor: float, offset: tuple[float, float]) -> Tensor:
    """Boxes of a (cropped) resized view in original pixels: ``(b + (x, y, x, y)) / factor``."""
    x, y = offset
    return (boxes + boxes.new_tensor([x, y, x, y])) / factor


def rank_and_cut(boxes: Tensor, scores: Tensor, nms_threshold: float | None,
                 topk: int | None) -> tuple[Tensor, Tensor]:
    """Boxes best first after NMS at ``nms_threshold`` (None: none), the top ``topk`` (None:
    all): how the proposals of several views or several RPNs become one list."""
    keep = (nms(boxes, scores, nms_threshold) if nms_threshold is not None
            else scores.argsort(descending=True, stable=True))
    keep = keep[:topk]
    return boxes[keep], scores[keep]


@torch.no_grad()
def dense_proposals(rpn: Proposer, scales: Sequence[RPNView], classes: list[Tensor],
                    settings: LocTestSettings, device: torch.device) -> ClassProposals:
    """Per image, per requested class: (boxes (P, 4) in original pixels, scores (P,)) on the
    CPU, best first; proposals of several views are merged by NMS (or by score without)."""
    per_scale = []
    for batch, factors, offsets in scales:
        out = rpn.propose(batch.to(device), [c.to(device) for c in classes],
                          topk=settings.proposals_per_class, pre_nms_topk=settings.pre_nms_topk,
                          nms_threshold=settings.nms_threshold)
        per_scale.append([[(to_original(b.cpu(), f, o), s.cpu()) for b, s in image_out]
                          for image_out, f, o in zip(out, factors, offsets)])
    if len(per_scale) == 1:
        return per_scale[0]
    return [[rank_and_cut(torch.cat([scale_out[i][j][0] for scale_out in per_scale]),
                          torch.cat([scale_out[i][j][1] for scale_out in per_scale]),
                          settings.nms_threshold, settings.proposals_per_class)
             for j in range(len(wanted))] for i, wanted in enumerate(classes)]


def best_box(boxes: Tensor, scores: Tensor) -> tuple[Tensor, float]:
    """The highest-scoring box and its score, or a degenerate box scored 0 when there is none
    (it counts as a miss)."""
    if len(boxes) == 0:
        return boxes.new_zeros(4), 0.0
    i = int(scores.argmax())
    return boxes[i], float(scores[i])


def union_proposals(members: Sequence[ClassProposals], nms_threshold: float | None = None,
                    topk: int | None = None) -> ClassProposals:
    """The union of several RPNs' proposals (an ensemble, Appendix C): per image and class
    all members' boxes together, best score first, then NMS at ``nms_threshold`` and the top
    ``topk``, as a detection ensemble merges its RPNs (Appendix B): each R-CNN of the
    ensemble then refines as many proposals as one member's RPN gives, not M times as many."""
    return [[rank_and_cut(torch.cat([b for b, _ in per_class]),
                          torch.cat([s for _, s in per_class]), nms_threshold, topk)
             for per_class in zip(*per_image)] for per_image in zip(*members)]


def average_refinements(members: Sequence[ClassProposals]) -> ClassProposals:
    """Several R-CNNs' refinements of the same proposals averaged (an ensemble, Appendix C):
    per proposal the mean of the refined boxes and the mean of the scores."""
    return [[(torch.stack([b for b, _ in per_class]).mean(0),
              torch.stack([s for _, s in per_class]).mean(0))
             for per_class in zip(*per_image)] for per_image in zip(*members)]


def flat_proposals(per_class: list[tuple[Tensor, Tensor]], classes: Tensor
                   ) -> tuple[Tensor, Tensor]:
    """One image's proposals of all its classes as (boxes (P, 4), classes (P,)), class by
    class in ``classes`` order."""
    if not per_class:
        return torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64)
    return (torch.cat([b for b, _ in per_class]),
            torch.cat([torch.full((len(b),), int(c), dtype=torch.int64)
                       for (b, _), c in zip(per_class, classes.tolist())]))


def refine_in_chunks(model: LocModel, originals: ImageBatch, proposals: ClassProposals,
                     wanted: list[Tensor], device: torch.device, chunk: int) -> ClassProposals:
    """``model.refine`` of ``proposals`` on pieces of at most ``chunk`` proposals (so an R-CNN
    forward never warps more), put back together as ``proposals``; the same result as one
    call, since each proposal is refined on its own."""
    pieces: list[list[tuple[int, int, int, int]]] = [[]]   # (image, class, begin, end)
    filled = 0
    for i, per_class in enumerate(proposals):
        for j, (boxes, _) in enumerate(per_class):
            for begin in range(0, len(boxes), chunk):
                end = min(begin + chunk, len(boxes))
                if filled + end - begin > chunk:
                    pieces.append([])
                    filled = 0
                pieces[-1].append((i, j, begin, end))
                filled += end - begin
    parts: list[list[list[tuple[Tensor, Tensor]]]] = [
        [[(b[:0], s[:0])] for b, s in per_class] for per_class in proposals]
    for piece in pieces:
        if not piece:
            continue
        sub: ClassProposals = [[] for _ in proposals]
        sub_classes: list[list[int]] = [[] for _ in proposals]
        for i, j, begin, end in piece:
            boxes, scores = proposals[i][j]
            sub[i].append((boxes[begin:end], scores[begin:end]))
            sub_classes[i].append(int(wanted[i][j]))
        refined = model.refine(originals, sub, [torch.tensor(c, dtype=torch.int64)
                                                for c in sub_classes], device)
        position = [0] * len(proposals)
        for i, j, _, _ in piece:
            parts[i][j].append(refined[i][position[i]])
            position[i] += 1
    return [[(torch.cat([b for b, _ in p]), torch.cat([s for _, s in p])) for p in per_class]
            for per_class in parts]


@torch.no_grad()
def localize(model: LocModel, views: LocViews, gt_classes: Sequence[Sequence[int]],
             settings: LocTestSettings, device: torch.device) -> list[dict]:
    """The test pipeline of Appendix C on N images: the classifier's top-k classes are the
    guesses; the RPN proposes for each guess (and each ground-truth class, for the oracle
    "error on the ground-truth class"); the RPN-only answer is a class's best proposal, with
    an R-CNN the best of the refined ones (refined ``settings.rcnn_chunk`` at a time). The
    networks run under ``inference_autocast``.

    Returns per image ``guesses`` (k,) and ``guess_scores`` (k,) (class probabilities) and,
    per method ("RPN", and "RPN+R-CNN" with an R-CNN), ``boxes`` (k, 4) and ``box_scores``
    (k,) for the guesses and ``gt_boxes`` {class: (4,)} for the oracle; CPU tensors,
    original pixels.
    """
    with inference_autocast(settings, device):
        probs = model.class_scores(views.classifier, device).float().cpu()
        k = min(settings.topk_classes, probs.shape[1])
        guess_scores, guesses = probs.topk(k, dim=1)
        wanted = []
        for g, gt in zip(guesses, gt_classes):
            extra = [c for c in dict.fromkeys(int(x) for x in gt) if c not in g.tolist()]
            wanted.append(torch.cat([g, torch.tensor(extra, dtype=torch.int64)]))
        methods = {"RPN": model.proposals(views.scales, wanted, settings, device)}
        if model.has_rcnn:
            originals = views.originals.to(device) if views.originals is not None else None
            methods["RPN+R-CNN"] = refine_in_chunks(model, originals, methods["RPN"], wanted,
                                                    device, settings.rcnn_chunk)
    out = []
    for i, (g, w) in enumerate(zip(guesses, wanted)):
        record: dict = {"guesses": g, "guess_scores": guess_scores[i]}
        for method, found in methods.items():
            best = {int(c): best_box(b, s) for c, (b, s) in zip(w.tolist(), found[i])}
            record[method] = {
                "boxes": torch.stack([best[int(c)][0] for c in g.tolist()]),
                "box_scores": torch.tensor([best[int(c)][1] for c in g.tolist()]),
                "gt_boxes": {int(c): best[int(c)][0] for c in gt_classes[i]}}
        out.append(record)
    return out


class LocalizerEnsemble(torch.nn.Module):
    """Several trained localizers tested as one (Appendix C: "an ensemble of networks for both
    classification and localization", 8.9% / 9.0% top-5 error in Tables 13 / 14): the class
    scores are the mean of the members' softmax scores, a class's proposals the union of the
    members' RPN proposals, NMS-ed and cut to the top ``proposals_per_class``
    (:func:`union_proposals`), and with R-CNNs each proposal's refined box and score the mean
    over the members that have one. ``predict`` takes and returns what ``Localizer.predict``
    does."""

    def __init__(self, members: Sequence[torch.nn.Module]) -> None:
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one localizer")
        counts = {m.num_classes for m in members}
        if len(counts) != 1:
            raise ValueError(f"the members predict different numbers of classes: "
                             f"{[m.num_classes for m in members]}")
        self.members = torch.nn.ModuleList(members)

    @property
    def num_classes(self) -> int:
        return self.members[0].num_classes

    @property
    def has_rcnn(self) -> bool:
        return any(m.has_rcnn for m in self.members)

    def predict(self, views: LocViews, gt_classes: Sequence[Sequence[int]],
                settings: LocTestSettings, device: torch.device) -> list[dict]:
        return localize(self, views, gt_classes, settings, device)

    def class_scores(self, views: list[list[Tensor]], device: torch.device) -> Tensor:
        return torch.stack([m.class_scores(views, device) for m in self.members]).mean(0)

    def proposals(self, views: Sequence[RPNView], wanted: list[Tensor],
                  settings: LocTestSettings, device: torch.device) -> ClassProposals:
        return union_proposals([m.proposals(views, wanted, settings, device)
                                for m in self.members],
                               settings.nms_threshold, settings.proposals_per_class)

    def refine(self, originals: ImageBatch, proposals: ClassProposals, wanted: list[Tensor],
               device: torch.device) -> ClassProposals:
        return average_refinements([m.refine(originals, proposals, wanted, device)
                                    for m in self.members if m.has_rcnn])
