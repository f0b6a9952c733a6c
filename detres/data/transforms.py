"""Image + box transforms: original image -> network input (docs/architecture.md, Carriers).

The resize is the only step that changes the coordinate frame, and it is done here, not with
albumentations, so that boxes are multiplied by exactly the recorded ``scale``:

    scale = short_side / min(h, w), lowered to max_size / max(h, w) if the long side would
            exceed max_size (Faster R-CNN, Ren et al. 2015, sec. 3.3: shorter side 600, longer
            side at most 1000; He et al. 2015 use the same for detection)
    resized size = (round(h * scale), round(w * scale))
    resized boxes = original boxes * scale, clipped to the resized image

so ``scale`` is resized / original along the side that set it (the shorter one, or the longer
one when capped); the other side is rounded to whole pixels, off by less than 0.5 px.
Evaluation and the predictor divide boxes by ``scale``.

Everything else (horizontal flip, photometric jitter, any extra albumentations transform) runs
before the resize through ``albumentations.Compose`` with ``BboxParams(format="pascal_voc")``
on the original image; a ``box_index`` label field keeps labels aligned with the boxes that a
user-supplied crop may drop. The test-time transform is the resize alone: deterministic.

Randomness (the short side drawn from ``short_sides``, albumentations' own generator). In
training each sample comes with a seed from the sampler (a function of the run's seed and the
sample's position in the stream, ``detres.data.samplers``): its augmentation depends on that
alone, so a resumed run sees exactly the augmentations of an uninterrupted one, with or without
DataLoader workers. Called without a seed, the transform draws from a generator seeded once
per process from ``seed`` and the DataLoader worker's seed.
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, NamedTuple, Sequence

import cv2
import numpy as np
import torch

if TYPE_CHECKING:
    import albumentations as A


class TransformOutput(NamedTuple):
    image: np.ndarray   # (H', W', 3) uint8 RGB
    boxes: np.ndarray   # (M', 4) float32 xyxy in pixels of the transformed image
    labels: np.ndarray  # (M',) int64, aligned with boxes
    scale: float        # resized / original


def resize_scale(h: int, w: int, short_side: int, max_size: int | None) -> float:
    """Factor that brings the shorter side to ``short_side`` and the longer to <= max_size."""
    scale = short_side / min(h, w)
    if max_size and max(h, w) * scale > max_size:
        scale = max_size / max(h, w)
    return scale


def resized_size(h: int, w: int, scale: float) -> tuple[int, int]:
    return int(h * scale + 0.5), int(w * scale + 0.5)


def resize(image: np.ndarray, boxes: np.ndarray, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Resizes an (h, w, 3) image by ``scale`` and multiplies (M, 4) xyxy boxes by it."""
    h, w = image.shape[:2]
    new_h, new_w = resized_size(h, w, scale)
    if (new_h, new_w) != (h, w):
        image = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4) * np.float32(scale)
    boxes[:, 0::2] = boxes[:, 0::2].clip(0, new_w)
    boxes[:, 1::2] = boxes[:, 1::2].clip(0, new_h)
    return image, boxes


class PerProcessRng:
    """A numpy generator seeded once per process from ``seed`` and the DataLoader worker's
    seed, so workers do not repeat each other's draws; or, for one sample, from that sample's
    seed alone."""

    def __init__(self, seed: int | None) -> None:
        self.seed = seed
        self._pid: int | None = None
        self._rng = np.random.default_rng(seed)

    def get(self, sample_seed: int | None = None) -> tuple[np.random.Generator, bool]:
        """The generator to draw from, and whether it is a new one (seeded by this call)."""
        if sample_seed is not None:
            self._rng = np.random.default_rng(sample_seed)
            self._pid = None      # the next unseeded call starts its process stream afresh
            return self._rng, True
        if self._pid == os.getpid():
            return self._rng, False
        self._pid = os.getpid()
        info = torch.utils.data.get_worker_info()
        entropy = self.seed if info is None else [self.seed or 0, info.seed % 2**63]
        self._rng = np.random.default_rng(entropy)
        return self._rng, True


def _compose(flip_prob: float, color_jitter: float, extra: Sequence[A.BasicTransform],
             seed: int | None) -> A.Compose:
    # albumentations is imported only when augmenting (it takes seconds to import), and
    # without its PyPI version check: a library import should not touch the network.
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    import albumentations as A

    augs: list[A.BasicTransform] = []
    if flip_prob > 0:
        augs.append(A.HorizontalFlip(p=flip_prob))
    if color_jitter > 0:
        augs.append(A.ColorJitter(brightness=color_jitter, contrast=color_jitter,
                                  saturation=color_jitter, hue=0.0, p=0.8))
    augs.extend(extra)
    return A.Compose(augs, bbox_params=A.BboxParams(
        format="pascal_voc", label_fields=["labels", "box_index"]), seed=seed)


class DetectionTransform:
    """Augment, then resize the shorter side.

    Args:
        short_sides: shorter-side lengths; one is drawn uniformly per image (multi-scale
            training), a single value is deterministic.
        max_size: cap on the longer side (None: no cap).
        flip_prob: probability of a horizontal flip.
        color_jitter: strength of brightness/contrast/saturation jitter (0: none), applied
            with probability 0.8.
        extra: more albumentations transforms, run after flip and jitter, before the resize.
        seed: base seed (None: fresh entropy).
        upscale: False: an image smaller than the resize target keeps its size (scale 1), as
            multi-scale testing wants its pyramid resized from the decoded image itself.
    """

    def __init__(self, short_sides: Sequence[int] | int = (600,), max_size: int | None = 1000,
                 *, flip_prob: float = 0.0, color_jitter: float = 0.0,
                 extra: Sequence[A.BasicTransform] = (), seed: int | None = None,
                 upscale: bool = True) -> None:
        self.short_sides = [short_sides] if isinstance(short_sides, int) else list(short_sides)
        if not self.short_sides or min(self.short_sides) <= 0:
            raise ValueError(f"short_sides must be positive lengths, got {short_sides!r}")
        self.max_size = max_size
        self.flip_prob = flip_prob
        self.color_jitter = color_jitter
        self.seed = seed
        self.upscale = upscale
        self.augment = (_compose(flip_prob, color_jitter, extra, seed)
                        if flip_prob > 0 or color_jitter > 0 or extra else None)
        self._rng = PerProcessRng(seed)

    def __call__(self, image: np.ndarray, boxes: np.ndarray, labels: np.ndarray,
                 seed: int | None = None) -> TransformOutput:
        """(h, w, 3) uint8, (M, 4) float32 xyxy original pixels, (M,) int64 -> TransformOutput;
        with ``seed`` the sample's augmentation is a function of it alone."""
        rng, fresh = self._rng.get(seed)
        if fresh and self.augment is not None:
            self.augment.set_random_seed(int(rng.integers(2**31)))
        boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
        labels = np.asarray(labels, np.int64)
        if self.augment is not None:
            out = self.augment(image=image, bboxes=boxes.astype(np.float64), labels=labels,
                               box_index=np.arange(len(boxes)))
            image = out["image"]
            boxes = np.asarray(out["bboxes"], np.float32).reshape(-1, 4)
            labels = labels[np.asarray(out["box_index"], np.int64)]
        h, w = image.shape[:2]
        k = int(rng.integers(len(self.short_sides))) if len(self.short_sides) > 1 else 0
        scale = resize_scale(h, w, self.short_sides[k], self.max_size)
        if not self.upscale:
            scale = min(scale, 1.0)
        image, boxes = resize(image, boxes, scale)
        return TransformOutput(np.ascontiguousarray(image), boxes, labels, scale)


def train_transform(short_sides: Sequence[int] | int = (600,), max_size: int | None = 1000, *,
                    flip_prob: float = 0.5, color_jitter: float = 0.0,
                    seed: int | None = None) -> DetectionTransform:
    """Training: multi-scale shorter side, horizontal flip, optional colour jitter."""
    return DetectionTransform(short_sides, max_size, flip_prob=flip_prob,
                              color_jitter=color_jitter, seed=seed)


def eval_transform(short_side: int = 600, max_size: int | None = 1000) -> DetectionTransform:
    """Evaluation and inference: the deterministic resize alone."""
    return DetectionTransform((short_side,), max_size)


def inference_transform(min_size: int, max_size: int | None, scales: Sequence[int] = ()
                        ) -> DetectionTransform:
    """The test resize. Single-scale: shorter side ``min_size``, longer at most ``max_size``.
    Multi-scale (``scales``, Appendix B; models/test_time.py resizes each pyramid level from
    the image this returns): the decoded image itself, or, when it is larger than the
    pyramid's top level (shorter side max(scales, min_size), longer side at most
    ``max_size * top / min_size``), the image shrunk to that level, so that memory is bounded
    by the top level and no level is resized from an upsampled image."""
    if not scales:
        return eval_transform(min_size, max_size)
    top = max(max(scales), min_size)
    return DetectionTransform((top,), max_size * top / min_size if max_size else None,
                              upscale=False)
