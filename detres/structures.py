"""Data that flows between the parts of detres (docs/architecture.md, Carriers).

Shapes: N images, M ground-truth boxes of one image, D detections of one image.
Boxes are always (..., 4) float32 xyxy in pixels of the *resized* image; only the
transforms (original -> resized) and evaluation/predictor (resized -> original) change
coordinates, using ``Targets.scale``.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

SIZE_DIVISIBILITY = 32  # conv5_x output has stride 32; padding keeps every stage aligned


def pad_images(images: Sequence[Tensor], size_divisibility: int = SIZE_DIVISIBILITY,
               dtype: torch.dtype = torch.float32) -> tuple[Tensor, list[tuple[int, int]]]:
    """(3, h_i, w_i) images -> (N, 3, H, W) ``dtype`` on the first image's device, zero-padded
    at the bottom/right to the largest h and w rounded up to ``size_divisibility``; and the
    (h_i, w_i) of each image."""
    if not images:
        raise ValueError("a batch needs at least one image")
    sizes = [(int(im.shape[-2]), int(im.shape[-1])) for im in images]
    d = size_divisibility
    h = (max(h for h, _ in sizes) + d - 1) // d * d
    w = (max(w for _, w in sizes) + d - 1) // d * d
    batch = images[0].new_zeros((len(images), 3, h, w), dtype=dtype)
    for i, im in enumerate(images):
        batch[i, :, : im.shape[-2], : im.shape[-1]].copy_(im)
    return batch, sizes


@dataclass(frozen=True)
class ImageBatch:
    """A padded batch of images.

    Attributes:
        tensor: (N, 3, H, W) float32 RGB in 0..255, zero-padded at the bottom/right so that
            H and W are multiples of 32.
        sizes: ``sizes[i] = (h, w)`` of image i before padding.
        scales: resized / original per image (``Targets.scale``), or None when unknown (1);
            the RPN's minimum proposal size is stated in original pixels.
    """

    tensor: Tensor
    sizes: list[tuple[int, int]]
    scales: list[float] | None = None

    def __post_init__(self) -> None:
        if self.tensor.dim() != 4 or self.tensor.shape[1] != 3:
            raise ValueError(f"ImageBatch.tensor must be (N, 3, H, W), got {tuple(self.tensor.shape)}")
        if len(self.sizes) != self.tensor.shape[0]:
            raise ValueError(f"ImageBatch has {self.tensor.shape[0]} images but {len(self.sizes)} sizes")
        if self.scales is not None and len(self.scales) != len(self.sizes):
            raise ValueError(f"ImageBatch has {len(self.sizes)} images but {len(self.scales)} scales")

    @classmethod
    def from_tensors(cls, images: list[Tensor], size_divisibility: int = SIZE_DIVISIBILITY,
                     scales: list[float] | None = None) -> ImageBatch:
        """Pads (3, h, w) images (any dtype, values 0..255) into one float32 batch."""
        batch, sizes = pad_images(images, size_divisibility, torch.float32)
        return cls(batch, sizes, scales)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> ImageBatch:
        return ImageBatch(self.tensor.to(device, non_blocking=non_blocking), list(self.sizes),
                          self.scales)

    def __len__(self) -> int:
        return self.tensor.shape[0]


@dataclass(frozen=True)
class Targets:
    """Ground truth of one image.

    Attributes:
        boxes: (M, 4) float32 xyxy, pixels of the resized image.
        labels: (M,) int64 in [0, K); background never appears here.
        image_id: the dataset's image id (COCO ``image_id``; VOC: index in the split).
        scale: resized / original; evaluation divides by it.
        orig_size: (h, w) of the image as stored on disk.
    """

    boxes: Tensor
    labels: Tensor
    image_id: int
    scale: float = 1.0
    orig_size: tuple[int, int] = (0, 0)

    def __post_init__(self) -> None:
        if self.boxes.dim() != 2 or self.boxes.shape[-1] != 4:
            raise ValueError(f"Targets(image_id={self.image_id}).boxes must be (M, 4), "
                             f"got {tuple(self.boxes.shape)}")
        if self.labels.shape != (self.boxes.shape[0],):
            raise ValueError(f"Targets(image_id={self.image_id}) has {self.boxes.shape[0]} boxes "
                             f"but labels of shape {tuple(self.labels.shape)}")

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Targets:
        return replace(self, boxes=self.boxes.to(device, non_blocking=non_blocking),
                       labels=self.labels.to(device, non_blocking=non_blocking))

    def __len__(self) -> int:
        return self.boxes.shape[0]


@dataclass(frozen=True)
class SkippedImageTargets(Targets):
    """The ``Targets`` of a test image that could not be read (``skip_bad_images`` without
    substitution): its own image id, no boxes. Evaluation gives it no detections, so its ground
    truth counts as missed and no other image is counted twice."""


@dataclass(frozen=True)
class Detections:
    """Detections of one image.

    Which pixels the boxes are in depends on who made them: a detector's output is in pixels
    of the resized image it was given (``ImageBatch``); the ``Predictor``'s (a ``Prediction``)
    and COCO results are in pixels of the original image, as given to it (a file: its pixels
    as stored, EXIF orientation ignored).

    Attributes:
        boxes: (D, 4) float32 xyxy, in the pixels said above.
        scores: (D,) float32 in [0, 1].
        labels: (D,) int64 in [0, K).
    """

    boxes: Tensor
    scores: Tensor
    labels: Tensor

    def __post_init__(self) -> None:
        d = self.boxes.shape[0]
        if self.boxes.shape != (d, 4) or self.scores.shape != (d,) or self.labels.shape != (d,):
            raise ValueError("Detections need boxes (D, 4), scores (D,) and labels (D,); got "
                             f"{tuple(self.boxes.shape)}, {tuple(self.scores.shape)}, "
                             f"{tuple(self.labels.shape)}")

    @classmethod
    def empty(cls, device: torch.device | str = "cpu") -> Detections:
        return cls(torch.zeros((0, 4), device=device), torch.zeros((0,), device=device),
                   torch.zeros((0,), dtype=torch.int64, device=device))

    def to(self, device: torch.device | str) -> Detections:
        return Detections(self.boxes.to(device), self.scores.to(device), self.labels.to(device))

    def __len__(self) -> int:
        return self.boxes.shape[0]


@dataclass
class DetectorOutput:
    """What a detector returns, in train and eval mode alike.

    ``losses`` is filled whenever targets are given, ``detections`` whenever the model is
    not training (one entry per image), ``stats`` carries diagnostics such as positive anchor
    counts (plain Python numbers or 0-dim tensors), never written to a global.
    """

    losses: dict[str, Tensor] = field(default_factory=dict)
    detections: list[Detections] | None = None
    stats: dict[str, float | Tensor] = field(default_factory=dict)
