"""Predictor: a trained detector applied to image files or arrays, answers in original pixels.

    predictor = Predictor.from_checkpoint("output/frcnn_r18_shapes/model_final.pth")
    detections = predictor("photo.jpg")          # Detections, boxes in the photo's pixels
    batch = predictor([array1, "b.png"])         # list[Detections]

Images are resized exactly as in evaluation (shorter side ``min_size``, longer side capped at
``max_size``), batched and padded as in training, and the boxes divided by each image's scale.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from detres.data.io import read_image
from detres.data.transforms import eval_transform
from detres.engine.distributed import resolve_device
from detres.structures import Detections, ImageBatch

Image = str | os.PathLike | np.ndarray


class Predictor:
    """Runs ``model`` in eval mode on images.

    Args:
        model: a detector taking ``ImageBatch`` and returning ``DetectorOutput``.
        class_names: K names, in label order.
        min_size, max_size: the test-time resize (``data.min_size_test`` / ``max_size_test``).
        device: where the model runs.
        category_ids: the dataset id of each label (COCO ``category_id``), for results files.
        batch_size: images per forward pass.
    """

    def __init__(self, model: nn.Module, class_names: Sequence[str], min_size: int = 600,
                 max_size: int | None = 1000, device: torch.device | str = "cpu",
                 category_ids: Sequence[int] | None = None, batch_size: int = 4) -> None:
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.class_names = list(class_names)
        self.category_ids = list(category_ids) if category_ids else list(
            range(1, len(self.class_names) + 1))
        self.transform = eval_transform(min_size, max_size)
        self.batch_size = batch_size

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike | Sequence[str | os.PathLike],
                        device: str = "auto", overrides: Sequence[str] = (),
                        batch_size: int = 4) -> Predictor:
        """Rebuilds the detector from the config stored in a training checkpoint.

        ``overrides`` (``key=value``) adjust that config, e.g. ``model.roi_head.score_threshold=0.3``
        or Appendix B's ``test.box_refinement=true``, ``test.scales=[400,600,800]``,
        ``test.flip=true``. Several paths are an ensemble, configured by the first one's config.
        """
        # the detection task's build sits above this module in the layering
        from detres.tasks.detection.build import (build_test_detector, detector_from_checkpoint,
                                                  detectors_for_checkpoints)
        paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
        model, cfg, meta = detector_from_checkpoint(paths[0], overrides)
        models = [model]
        if len(paths) > 1:
            models, meta = detectors_for_checkpoints(cfg.model, paths)
        return cls(build_test_detector(cfg, models), meta["class_names"], cfg.data.min_size_test,
                   cfg.data.max_size_test, resolve_device(device), meta.get("category_ids"),
                   batch_size)

    def __call__(self, images: Image | Sequence[Image]) -> Detections | list[Detections]:
        if isinstance(images, (str, os.PathLike, np.ndarray)):
            return self.predict([images])[0]
        return self.predict(list(images))

    @torch.no_grad()
    def predict(self, images: Sequence[Image]) -> list[Detections]:
        """Detections per image, boxes xyxy in the pixels of the image as given (or as stored,
        EXIF orientation applied)."""
        out: list[Detections] = []
        for start in range(0, len(images), self.batch_size):
            chunk = [self._load(im) for im in images[start:start + self.batch_size]]
            tensors, scales = [], []
            for image in chunk:
                resized = self.transform(image, np.zeros((0, 4), np.float32),
                                         np.zeros((0,), np.int64))
                tensors.append(torch.from_numpy(resized.image).permute(2, 0, 1))
                scales.append(resized.scale)
            batch = ImageBatch.from_tensors(tensors, scales=scales).to(self.device)
            for d, scale, image in zip(self.model(batch).detections, scales, chunk):
                h, w = image.shape[:2]
                boxes = (d.boxes.float().cpu() / scale)
                boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)
                boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
                out.append(Detections(boxes, d.scores.float().cpu(), d.labels.cpu()))
        return out

    @staticmethod
    def _load(image: Image) -> np.ndarray:
        if isinstance(image, np.ndarray):
            if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
                raise ValueError(f"Predictor needs (H, W, 3) uint8 RGB arrays, got "
                                 f"{image.shape} {image.dtype}")
            return image
        return read_image(Path(image))

    def to_coco_results(self, detections: Detections, image_id: int) -> list[dict]:
        """One image's detections in COCO results format (xywh, dataset category ids)."""
        results = []
        for box, score, label in zip(detections.boxes.tolist(), detections.scores.tolist(),
                                     detections.labels.tolist()):
            x1, y1, x2, y2 = box
            results.append({"image_id": int(image_id), "category_id": self.category_ids[label],
                            "bbox": [round(x1, 2), round(y1, 2), round(x2 - x1, 2),
                                     round(y2 - y1, 2)], "score": round(float(score), 5)})
        return results
