"""Prediction: what the Predictor answers for one image, ``Detections`` that can draw and
convert themselves.

    found = predictor("photo.jpg")
    found.boxes, found.scores, found.labels      # (D, 4) xyxy in photo.jpg's pixels, (D,), (D,)
    found.names                                  # the class name of each detection
    found.plot(min_score=0.5)                    # (H, W, 3) uint8 RGB, boxes drawn
    found.save("drawn.jpg", min_score=0.5)       # the same, as a PNG or JPEG file
    found.to_coco(image_id=7)                    # COCO results dicts (xywh, category ids)
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from detres.data.image_files import Image, load_image
from detres.evaluation.coco_eval import detections_to_coco_results
from detres.structures import Detections
from detres.visualize import draw_detections, save_detections

DRAWING_SUFFIXES = (".png", ".jpg", ".jpeg")


@dataclass(frozen=True, eq=False)
class Prediction(Detections):
    """The detections of one image, boxes (D, 4) float32 xyxy in the pixels of the image as
    given (``Detections``), with what is needed to draw and report them.

    Attributes:
        source: the image as given to the Predictor (a path, array, PIL image or tensor); not
            copied, so drawing shows it as it is when drawn (a file is read again).
        channels: the channel order it was read in (``rgb`` or ``bgr``).
        class_names: the K class names, in label order.
        category_ids: the dataset category id of each label, for COCO results.
    """

    source: Image = field(repr=False)
    channels: str
    class_names: tuple[str, ...]
    category_ids: tuple[int, ...]

    @property
    def names(self) -> list[str]:
        """The class name of each detection."""
        return [self.class_names[k] for k in self.labels.tolist()]

    def image(self) -> np.ndarray:
        """The image the boxes refer to, (H, W, 3) uint8 RGB."""
        return load_image(self.source, self.channels)

    def plot(self, min_score: float = 0.0) -> np.ndarray:
        """A copy of the image, (H, W, 3) uint8 RGB, with the boxes, class names and scores
        of the detections scoring at least ``min_score`` drawn (as tools/infer.py draws)."""
        return np.asarray(draw_detections(self.image(), *self._numpy(), list(self.class_names),
                                          min_score))

    def save(self, path: str | os.PathLike, min_score: float = 0.0) -> Path:
        """Writes ``plot(min_score)`` to ``path``, a PNG or JPEG by its suffix; returns it."""
        if Path(path).suffix.lower() not in DRAWING_SUFFIXES:
            raise ValueError(f"{path}: a drawing is written as {', '.join(DRAWING_SUFFIXES)}")
        return save_detections(path, self.image(), *self._numpy(), list(self.class_names),
                               min_score)

    def to_coco(self, image_id: int) -> list[dict]:
        """COCO results dicts (``image_id``, ``category_id``, ``bbox`` xywh in the image's
        pixels, ``score``), one per detection."""
        return detections_to_coco_results([self], [(image_id, 1.0)], self.category_ids)

    def _numpy(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self.boxes.numpy(), self.scores.numpy(), self.labels.numpy()
