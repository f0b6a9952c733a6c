"""Localization transforms and test-time views (He et al. 2015, Appendix C).

``LocTrainTransform`` is the paper's classification augmentation (Sec. 3.4, Appendix C:
shorter side drawn from [256, 480], random 224x224 crop, flip) carrying the boxes along.

Test-time views: the localizer sees each original image several ways (the classifier's
centre crop, ten crops or scales, the RPN's test scales or its one centre crop, the R-CNN's
original pixels). ``classifier_views``, ``scaled_batch`` and ``centre_crop_batch`` make them
here, on the data side, so the models never resize numpy images.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from detres.data.classification import ten_crop
from detres.data.images import image_to_tensor
from detres.data.transforms import PerProcessRng, TransformOutput, resize, resize_scale
from detres.structures import ImageBatch


class LocTrainTransform:
    """Scale augmentation, random square crop, horizontal flip (Sec. 3.4, Appendix C).

    The shorter side is drawn uniformly from ``scale_range`` (inclusive) and the image resized
    with ``detres.data.transforms.resize`` (boxes times the recorded ``scale``); then a
    ``crop_size`` square is cut at a uniform random position (an image smaller than that is
    zero-padded at the bottom/right first) and flipped with ``flip_prob``. Boxes are shifted
    and clipped to the crop; a box whose visible part is narrower or shorter than 1 px, or
    keeps less than ``min_visible`` (30 %) of its area in the resized image, is dropped along
    with its label. Returns ``(image, boxes, labels, scale)``; ``scale`` is resized/original
    (the crop does not change it).
    """

    def __init__(self, scale_range: tuple[int, int] = (256, 480), crop_size: int = 224,
                 flip_prob: float = 0.5, seed: int | None = None, *,
                 min_visible: float = 0.3) -> None:
        lo, hi = (int(v) for v in scale_range)
        if not 0 < lo <= hi:
            raise ValueError(f"scale_range must be 0 < lo <= hi, got {scale_range!r}")
        if crop_size <= 0:
            raise ValueError(f"crop_size must be positive, got {crop_size}")
        self.scale_range = (lo, hi)
        self.crop_size = int(crop_size)
        self.flip_prob = float(flip_prob)
        self.min_visible = float(min_visible)
        self.seed = seed
        self._rng = PerProcessRng(seed)

    def __call__(self, image: np.ndarray, boxes: np.ndarray, labels: np.ndarray
                 ) -> TransformOutput:
        rng, _ = self._rng.get()
        labels = np.asarray(labels, np.int64)
        h, w = image.shape[:2]
        short = int(rng.integers(self.scale_range[0], self.scale_range[1] + 1))
        scale = resize_scale(h, w, short, None)
        image, boxes = resize(image, boxes, scale)
        c = self.crop_size
        image = _pad_to_at_least(image, c)
        top = int(rng.integers(image.shape[0] - c + 1))
        left = int(rng.integers(image.shape[1] - c + 1))
        image = image[top:top + c, left:left + c]
        area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        boxes = boxes - np.array([left, top, left, top], np.float32)
        boxes = boxes.clip(0, c)  # the crop is square
        bw, bh = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
        keep = (bw >= 1) & (bh >= 1) & (bw * bh >= self.min_visible * area)
        boxes, labels = boxes[keep], labels[keep]
        if self.flip_prob > 0 and rng.uniform() < self.flip_prob:
            image = image[:, ::-1]
            boxes = np.stack([c - boxes[:, 2], boxes[:, 1], c - boxes[:, 0], boxes[:, 3]], 1)
        return TransformOutput(np.ascontiguousarray(image),
                               np.ascontiguousarray(boxes, np.float32).reshape(-1, 4),
                               labels, float(scale))


def _pad_to_at_least(image: np.ndarray, size: int) -> np.ndarray:
    """(h, w, 3) zero-padded at the bottom/right to at least ``size`` x ``size``."""
    h, w = image.shape[:2]
    if h >= size and w >= size:
        return image
    padded = np.zeros((max(h, size), max(w, size), 3), image.dtype)
    padded[:h, :w] = image
    return padded


def resized(image: np.ndarray, short_side: int, max_size: int | None
            ) -> tuple[np.ndarray, float]:
    """The image with its shorter side at ``short_side`` (longer capped at ``max_size``)."""
    scale = resize_scale(image.shape[0], image.shape[1], short_side, max_size)
    return resize(image, np.zeros((0, 4), np.float32), scale)[0], scale


def classifier_view(image: np.ndarray, test_size: int, crop: int | None) -> torch.Tensor:
    """(3, h, w) uint8: shorter side to ``test_size``, then the centre ``crop`` x ``crop``
    (zero-padded if the resized image is smaller), as the classification test recipe; with
    ``crop`` None the whole resized image."""
    image, _ = resized(image, test_size, None)
    if crop is None:
        return image_to_tensor(image)
    h, w = image.shape[:2]
    out = np.zeros((crop, crop, 3), np.uint8)
    top, left = max((h - crop) // 2, 0), max((w - crop) // 2, 0)
    part = image[top:top + crop, left:left + crop]
    oy, ox = (crop - part.shape[0]) // 2, (crop - part.shape[1]) // 2
    out[oy:oy + part.shape[0], ox:ox + part.shape[1]] = part
    return image_to_tensor(out)


def classifier_views(image: np.ndarray, mode: str, test_size: int, crop: int | None,
                     scales: Sequence[int] = ()) -> list[torch.Tensor]:
    """The classifier's test views of one image (Sec. 3.4): ``"single"``, the one
    ``classifier_view``; ``"ten_crop"``, the 4 corner and centre ``crop`` squares of the image
    at ``test_size`` and their flips (zero-padded to ``crop`` first if smaller);
    ``"multiscale"``, the whole image at each shorter side of ``scales``."""
    if mode == "single":
        return [classifier_view(image, test_size, crop)]
    if mode == "ten_crop":
        if crop is None:
            raise ValueError("ten_crop testing needs a crop size")
        image, _ = resized(image, test_size, None)
        return [image_to_tensor(c) for c in ten_crop(_pad_to_at_least(image, crop), crop)]
    if mode == "multiscale":
        return [image_to_tensor(resized(image, s, None)[0]) for s in scales]
    raise ValueError(f"unknown classifier test mode {mode!r}; valid: single, ten_crop, "
                     f"multiscale")


def scaled_batch(images: Sequence[np.ndarray], short_side: int, max_size: int | None
                 ) -> tuple[ImageBatch, list[float], list[tuple[float, float]]]:
    """The images resized to ``short_side`` (capped at ``max_size``), padded into one batch,
    each image's resized/original factor, and (0, 0) offsets (an RPN view, models/
    loc_inference.py)."""
    tensors, scales = [], []
    for image in images:
        out, s = resized(image, short_side, max_size)
        tensors.append(image_to_tensor(out))
        scales.append(s)
    return ImageBatch.from_tensors(tensors), scales, [(0.0, 0.0)] * len(images)


def centre_crop_batch(images: Sequence[np.ndarray], short_side: int, crop: int
                      ) -> tuple[ImageBatch, list[float], list[tuple[float, float]]]:
    """The RPN's 1-crop view (Table 13, "1-crop"): each image resized to ``short_side``, then
    its centre ``crop`` x ``crop`` square (all of a side shorter than ``crop``, as the training
    crops pad at the bottom/right), padded into one batch; each image's resized/original
    factor and the (x, y) of the crop in the resized image, so a box b of the crop is
    ``(b + (x, y, x, y)) / factor`` in the original image."""
    tensors, scales, offsets = [], [], []
    for image in images:
        out, s = resized(image, short_side, None)
        h, w = out.shape[:2]
        top, left = max((h - crop) // 2, 0), max((w - crop) // 2, 0)
        tensors.append(image_to_tensor(out[top:top + crop, left:left + crop]))
        scales.append(s)
        offsets.append((float(left), float(top)))
    return ImageBatch.from_tensors(tensors), scales, offsets


def original_batch(images: Sequence[np.ndarray]) -> ImageBatch:
    """The original images padded into one batch (the R-CNN crops from them)."""
    return ImageBatch.from_tensors([image_to_tensor(im) for im in images])
