"""What detection hands to evaluation's one loop (``evaluation/inference.py``): the detector
in the form it is tested in, as a model of the test loader's batches, and what the box
evaluators read of the test set. Evaluation imports nothing of ``models/`` or ``data/``
(docs/architecture.md, Layers); the choice of inference form is made here.

    model = ready_detector(build_test_detector(cfg, models), device)
    metrics = inference_on_dataset(model, loader, COCOEvaluator(dataset_info(dataset)),
                                   device, inference_amp_dtype(device, cfg.test.cpu_amp))
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from detres.evaluation.detection import DatasetInfo
from detres.models.inference_form import prepare_for_inference
from detres.structures import Detections, ImageBatch, SkippedImageTargets, Targets


class BatchDetector(nn.Module):
    """A detector (or ``TestTimeDetector``) as evaluation runs it: a test batch
    ``(ImageBatch, list[Targets])`` -> one ``Detections`` per image, on the CPU, in the
    resized image's pixels. A batch of images that could not be read only
    (``SkippedImageTargets``) is not run: they get no detections."""

    def __init__(self, detector: nn.Module, device: torch.device | str) -> None:
        super().__init__()
        self.detector = detector
        self.device = torch.device(device)

    def forward(self, batch: tuple[ImageBatch, Sequence[Targets]]) -> list[Detections]:
        images, targets = batch
        if all(isinstance(t, SkippedImageTargets) for t in targets):
            return [Detections.empty() for _ in targets]
        detections = self.detector(images.to(self.device, non_blocking=True)).detections
        return [d.to("cpu") for d in detections]


def ready_detector(model: nn.Module, device: torch.device | str, fast_path: bool = True,
                   compile: bool = False) -> BatchDetector:
    """``model`` in the form evaluation tests (``test.fast_path``, ``test.compile``): the
    inference form of :func:`detres.models.inference_form.prepare_for_inference` on a copy (``model``
    and its checkpoints keep their form) unless ``fast_path`` is False."""
    if fast_path or compile:
        model = prepare_for_inference(model, fuse=fast_path, channels_last=fast_path,
                                      compile=compile)
    return BatchDetector(model, device)


def dataset_info(dataset: Any) -> DatasetInfo:
    """What the box evaluators read of a detection dataset (``data/io.py::DetectionDataset``
    or any with its ``image_ids``, ``class_names``, ``get_annotations`` and ``path``; COCO
    sets also ``annotation_file`` and ``label_to_category_id``)."""
    index_of = {int(i): k for k, i in enumerate(dataset.image_ids)}
    return DatasetInfo(
        class_names=tuple(dataset.class_names), image_ids=tuple(index_of),
        annotation_file=getattr(dataset, "annotation_file", None),
        label_to_category_id=tuple(int(c) for c in getattr(dataset, "label_to_category_id",
                                                            ())),
        annotations=lambda image_id: dataset.get_annotations(index_of[image_id]),
        file_stem=lambda image_id: dataset.path(index_of[image_id]).stem)
