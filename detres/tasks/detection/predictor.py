"""Predictor: a trained detector applied to images, answers in original pixels.

    from detres import Predictor
    predictor = Predictor.from_checkpoint("output/frcnn_r18_shapes/model_final.pth")
    found = predictor("photo.jpg")               # Prediction, boxes in the photo's pixels
    found.plot(), found.save("drawn.png"), found.to_coco(image_id=1)
    batch = predictor([array1, "b.png", pil_image, chw_tensor])   # list[Prediction]
    predictor(opencv_frame, channels="bgr")

Images are files, PIL images, arrays or tensors (``detres.data.image_files.ACCEPTED``).

Images are resized exactly as in evaluation (shorter side ``min_size``, longer side capped at
``max_size``), batched and padded as in training, and the boxes divided by each image's scale.
The model runs in its inference form (frozen BN folded, channels-last: ``test.fast_path``) and,
on CPUs with native bf16, under bf16 autocast (``test.cpu_amp``; models/inference_form.py); the next
batch is read and resized in a background thread while the model runs on the current one.
``ids_in_annotations`` gives results the ids of a dataset's annotation file (tools/infer.py --gt).
"""
from __future__ import annotations

import os
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch import nn

from detres.data.coco import COCODetection
from detres.data.image_files import CHANNEL_ORDERS, Image, is_one_image, load_image
from detres.data.images import DatasetError
from detres.data.transforms import inference_transform
from detres.engine.distributed import resolve_device
from detres.evaluation.coco_eval import detections_to_coco_results
from detres.models.inference_form import autocast, inference_amp_dtype, prepare_for_inference
from detres.structures import Detections, ImageBatch
from detres.tasks.detection.config import DetectionConfig
from detres.tasks.detection.load import load_detector
from detres.tasks.detection.prediction import Prediction


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
        channels: the colour order of arrays and tensors given (``rgb``, or ``bgr`` for
            OpenCV's); a call's ``channels`` overrides it. Files and PIL images know theirs.
    """

    def __init__(self, model: nn.Module, class_names: Sequence[str], min_size: int = 600,
                 max_size: int | None = 1000, device: torch.device | str = "cpu",
                 category_ids: Sequence[int] | None = None, batch_size: int = 4,
                 fast_path: bool = True, cpu_amp: str = "auto", compile: bool = False,
                 channels: str = "rgb") -> None:
        if channels not in CHANNEL_ORDERS:
            raise ValueError(f"channels must be one of {CHANNEL_ORDERS}, got {channels!r}")
        self.channels = channels
        self.device = torch.device(device)
        self.amp_dtype = inference_amp_dtype(self.device, cpu_amp)
        if fast_path or compile:
            model = prepare_for_inference(model, fuse=fast_path, channels_last=fast_path,
                                          compile=compile)
        self.model = model.to(self.device).eval()
        self.class_names = list(class_names)
        self.category_ids = list(category_ids) if category_ids else list(
            range(1, len(self.class_names) + 1))
        self.transform = inference_transform(min_size, max_size, getattr(model, "scales", ()))
        self.batch_size = batch_size

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike | Sequence[str | os.PathLike],
                        device: str = "auto", overrides: Sequence[str] = (),
                        batch_size: int = 4, cfg: DetectionConfig | None = None) -> Predictor:
        """The detector of a training checkpoint (``load_detector``), under ``cfg`` or, without
        it, the config stored in the checkpoint.

        ``overrides`` (``key=value``) adjust that config, e.g.
        ``model.roi_head.score_threshold=0.3`` or Appendix B's ``test.box_refinement=true``,
        ``test.scales=[400,600,800]``, ``test.flip=true``. Several paths are an ensemble,
        configured by the first one's config.
        """
        loaded = load_detector(path, cfg, overrides)
        cfg, t = loaded.cfg, loaded.cfg.test
        return cls(loaded.model, loaded.class_names, cfg.data.min_size_test,
                   cfg.data.max_size_test, resolve_device(device), loaded.category_ids,
                   batch_size, fast_path=t.fast_path, cpu_amp=t.cpu_amp, compile=t.compile)

    def __call__(self, images: Image | Sequence[Image], channels: str | None = None
                 ) -> Prediction | list[Prediction]:
        """One image (``Image``: a path, array, PIL image or tensor) -> its ``Prediction``;
        a list of them -> a list."""
        if is_one_image(images):
            return self.predict([images], channels)[0]
        return self.predict(list(images), channels)

    @torch.no_grad()
    def predict(self, images: Sequence[Image], channels: str | None = None) -> list[Prediction]:
        """A ``Prediction`` (``Detections`` that draw and convert themselves) per image,
        boxes xyxy in the pixels of the image as given (a file: its pixels as stored, EXIF
        orientation ignored, as in training). ``channels`` is the colour order of arrays and
        tensors (default: the Predictor's); see ``detres.data.image_files.ACCEPTED``."""
        channels = channels or self.channels
        found = self._detect_all(images, channels)
        return [Prediction(d.boxes, d.scores, d.labels, im, channels, tuple(self.class_names),
                           tuple(self.category_ids)) for d, im in zip(found, images)]

    def _detect_all(self, images: Sequence[Image], channels: str) -> list[Detections]:
        out: list[Detections] = []
        # (index of the first image, images): a refused image is named by its index
        chunks = [(k, images[k:k + self.batch_size], channels)
                  for k in range(0, len(images), self.batch_size)]
        if len(chunks) <= 1:
            return [d for chunk in chunks for d in self._detect(*self._batch(*chunk))]
        # decoding and resizing (PIL and numpy release the GIL) overlap the model's compute
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="predictor-io") as pool:
            pending = pool.submit(self._batch, *chunks[0])
            for k in range(len(chunks)):
                loaded = pending.result()
                if k + 1 < len(chunks):
                    pending = pool.submit(self._batch, *chunks[k + 1])
                out.extend(self._detect(*loaded))
        return out

    def _batch(self, start: int, chunk: Sequence[Image], channels: str
               ) -> tuple[ImageBatch, list[tuple[int, int]]]:
        """Reads and resizes ``chunk``, images ``start``...: (padded batch with scales,
        original (h, w) sizes)."""
        tensors, scales, sizes = [], [], []
        for k, given in enumerate(chunk):
            image = load_image(given, channels, start + k)
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
        """One image's detections (as this predictor returns them, in original pixels) in COCO
        results format: xywh boxes, dataset category ids."""
        return detections_to_coco_results([detections], [(image_id, 1.0)], self.category_ids)


def ids_in_annotations(files: Sequence[str | os.PathLike], annotation_file: str | os.PathLike,
                       class_names: Sequence[str]) -> tuple[list[int], list[int]]:
    """(image id of each file, category id of each class) in a COCO-format annotation file, so
    that detections on those files can be scored against it: an image is matched by its file
    name (the last part of ``file_name``), a class by its name. A file that matches no image
    or several, and a class the file does not name once, are a DatasetError naming them."""
    # the data layer's checks of a file from anywhere; its images are never read here
    gt = COCODetection(annotation_file, Path(annotation_file).parent, skip_bad_images=True,
                       allow_outside_paths=True)
    ids_by_name: dict[str, list[int]] = {}
    for k, image_id in enumerate(gt.image_ids.tolist()):
        ids_by_name.setdefault(gt.path(k).name, []).append(int(image_id))
    names = [Path(f).name for f in files]
    given = Counter(names)
    unmatched = [str(f) for f, n in zip(files, names) if n not in ids_by_name]
    ambiguous = [str(f) for f, n in zip(files, names)
                 if len(ids_by_name.get(n, ())) > 1 or given[n] > 1]
    if unmatched:
        raise DatasetError(f"{_some(unmatched)}: not in {annotation_file}'s images (an image "
                           f"is matched by its file name)")
    if ambiguous:
        raise DatasetError(f"{_some(ambiguous)}: the file name matches more than one image of "
                           f"{annotation_file}, or more than one input; give each image once")
    category_of = {name: c for name, c in zip(gt.class_names, gt.label_to_category_id)}
    missing = [n for n in class_names if n not in category_of or gt.class_names.count(n) > 1]
    if missing:
        raise DatasetError(f"classes {missing[:5]} of the detector are not named once in "
                           f"{annotation_file}'s categories ({gt.class_names[:5]}...)")
    return [ids_by_name[n][0] for n in names], [category_of[n] for n in class_names]


def _some(files: list[str]) -> str:
    return ", ".join(files[:3]) + (f" ... ({len(files)} files)" if len(files) > 3 else "")
