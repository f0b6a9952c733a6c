"""Predictor: a trained detector applied to image files or arrays, answers in original pixels.

    predictor = Predictor.from_checkpoint("output/frcnn_r18_shapes/model_final.pth")
    detections = predictor("photo.jpg")          # Detections, boxes in the photo's pixels
    batch = predictor([array1, "b.png"])         # list[Detections]

Images are resized exactly as in evaluation (shorter side ``min_size``, longer side capped at
``max_size``), batched and padded as in training, and the boxes divided by each image's scale.
The model runs in its inference form (frozen BN folded, channels-last: ``test.fast_path``) and,
on CPUs with native bf16, under bf16 autocast (``test.cpu_amp``; models/fast.py); the next
batch is read and resized in a background thread while the model runs on the current one.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch import nn

from detres.data.io import read_image
from detres.data.transforms import eval_transform
from detres.engine.checkpoint import load_checkpoint
from detres.engine.distributed import resolve_device
from detres.models.fast import autocast, inference_amp_dtype, prepare_for_inference
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
        fast_path: run a copy of ``model`` with frozen BN folded and channels-last (exact);
            ``model`` itself is left as it is.
        cpu_amp: ``auto`` (bf16 autocast where the CPU computes bf16 natively), ``bf16`` or
            ``none`` (fp32).
        compile: ``torch.compile`` the trunk and conv5_x (falls back to eager where it fails).
    """

    def __init__(self, model: nn.Module, class_names: Sequence[str], min_size: int = 600,
                 max_size: int | None = 1000, device: torch.device | str = "cpu",
                 category_ids: Sequence[int] | None = None, batch_size: int = 4,
                 fast_path: bool = True, cpu_amp: str = "auto", compile: bool = False) -> None:
        self.device = torch.device(device)
        self.amp_dtype = inference_amp_dtype(self.device, cpu_amp)
        if fast_path or compile:
            model = prepare_for_inference(model, fuse=fast_path, channels_last=fast_path,
                                          compile=compile)
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
                                                  detectors_for_checkpoints, stored_config)
        paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
        if len(paths) == 1:
            model, cfg, meta = detector_from_checkpoint(paths[0], overrides)
            models = [model]
        else:
            cfg = stored_config(load_checkpoint(paths[0]), paths[0], overrides)
            models, meta = detectors_for_checkpoints(cfg.model, paths)
        t = cfg.test
        return cls(build_test_detector(cfg, models), meta["class_names"], cfg.data.min_size_test,
                   cfg.data.max_size_test, resolve_device(device), meta.get("category_ids"),
                   batch_size, fast_path=t.fast_path, cpu_amp=t.cpu_amp, compile=t.compile)

    def __call__(self, images: Image | Sequence[Image]) -> Detections | list[Detections]:
        if isinstance(images, (str, os.PathLike, np.ndarray)):
            return self.predict([images])[0]
        return self.predict(list(images))

    @torch.no_grad()
    def predict(self, images: Sequence[Image]) -> list[Detections]:
        """Detections per image, boxes xyxy in the pixels of the image as given (a file: its
        pixels as stored, EXIF orientation ignored, as in training)."""
        out: list[Detections] = []
        chunks = [images[k:k + self.batch_size] for k in range(0, len(images), self.batch_size)]
        if len(chunks) <= 1:
            return [d for chunk in chunks for d in self._detect(*self._batch(chunk))]
        # decoding and resizing (PIL and numpy release the GIL) overlap the model's compute
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="predictor-io") as pool:
            pending = pool.submit(self._batch, chunks[0])
            for k in range(len(chunks)):
                loaded = pending.result()
                if k + 1 < len(chunks):
                    pending = pool.submit(self._batch, chunks[k + 1])
                out.extend(self._detect(*loaded))
        return out

    def _batch(self, chunk: Sequence[Image]) -> tuple[ImageBatch, list[tuple[int, int]]]:
        """Reads and resizes ``chunk``: (padded batch with scales, original (h, w) sizes)."""
        tensors, scales, sizes = [], [], []
        for image in map(load_image, chunk):
            resized = self.transform(image, np.zeros((0, 4), np.float32),
                                     np.zeros((0,), np.int64))
            tensors.append(torch.from_numpy(resized.image).permute(2, 0, 1))
            scales.append(resized.scale)
            sizes.append(image.shape[:2])
        return ImageBatch.from_tensors(tensors, scales=scales), sizes

    def _detect(self, batch: ImageBatch, sizes: list[tuple[int, int]]) -> list[Detections]:
        """The model on one batch; boxes back in each image's original pixels."""
        with autocast(self.device, self.amp_dtype):
            detections = self.model(batch.to(self.device)).detections
        out = []
        for d, scale, (h, w) in zip(detections, batch.scales, sizes):
            boxes = (d.boxes.float().cpu() / scale)
            boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)
            boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
            out.append(Detections(boxes, d.scores.float().cpu(), d.labels.cpu()))
        return out

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


def load_image(image: Image) -> np.ndarray:
    """An image file (its pixels as stored, EXIF orientation ignored, as in training) or an
    (H, W, 3) uint8 RGB array, as an array."""
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"Predictor needs (H, W, 3) uint8 RGB arrays, got "
                             f"{image.shape} {image.dtype}")
        return image
    return read_image(Path(image))
