"""LocPredictor: a trained localizer (or an ensemble of them) applied to image files or arrays.

    predictor = LocPredictor.from_checkpoint("output/loc_r18_builtin/model_final.pth")
    guesses = predictor("photo.jpg")     # LocPrediction: the top-k (class, box) guesses
    many = predictor([array, "b.png"])   # list[LocPrediction]

Each image goes through the test pipeline of the evaluation (``Localizer.predict``, with the
checkpoint's ``test`` settings and any ``key=value`` overrides, e.g. ``test.cls_mode=multiscale``
or ``test.rpn_mode=one_crop``); boxes come back in the pixels of the image as given.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from detres.data.image_files import Image, is_one_image, load_image
from detres.engine.distributed import resolve_device
from detres.models.loc_inference import LocalizerEnsemble, LocTestSettings
from detres.models.localizer import Localizer
from detres.tasks.localization.build import load_localizers, loc_test_settings
from detres.tasks.localization.inference import localize_batch



@dataclass
class LocPrediction:
    """The top-k guesses of one image, best first.

    Attributes:
        labels: (k,) int64 classes.
        class_scores: (k,) the classifier's softmax score of each class.
        boxes: (k, 4) float32 xyxy, the box of each class in the image's pixels.
        box_scores: (k,) the score of each box (R-CNN, or RPN without one).
        method: "RPN+R-CNN" or "RPN", what found the boxes.
    """

    labels: torch.Tensor
    class_scores: torch.Tensor
    boxes: torch.Tensor
    box_scores: torch.Tensor
    method: str


class LocPredictor:
    """Runs a localizer in eval mode on images.

    Args:
        model: a ``Localizer`` or ``LocalizerEnsemble``.
        class_names: the K names in label order.
        settings: the test pipeline (``tasks.localization.build.loc_test_settings``).
        device: where the networks run.
        batch_size: images per pass.
    """

    def __init__(self, model: Localizer | LocalizerEnsemble, class_names: Sequence[str],
                 settings: LocTestSettings, device: torch.device | str = "cpu",
                 batch_size: int = 8) -> None:
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.class_names = list(class_names)
        self.settings = settings
        self.batch_size = batch_size
        self.method = "RPN+R-CNN" if model.has_rcnn else "RPN"

    @classmethod
    def from_checkpoint(cls, weights: str | os.PathLike | Sequence[str | os.PathLike],
                        device: str = "auto", overrides: Sequence[str] = (),
                        batch_size: int = 8) -> LocPredictor:
        """The localizer of a tools/train_loc.py ``model_final.pth``, or several as one
        ensemble, rebuilt from the (first) stored config with ``overrides``."""
        paths = [os.fspath(weights)] if isinstance(weights, (str, os.PathLike)) else \
            [os.fspath(w) for w in weights]
        model, cfg, meta = load_localizers(paths, overrides)
        return cls(model, meta["class_names"], loc_test_settings(cfg), resolve_device(device),
                   batch_size)

    def __call__(self, images: Image | Sequence[Image]) -> LocPrediction | list[LocPrediction]:
        if is_one_image(images):
            return self.predict([images])[0]
        return self.predict(list(images))

    @torch.no_grad()
    def predict(self, images: Sequence[Image]) -> list[LocPrediction]:
        """The guesses of each image, boxes in its pixels (as given; a file: as stored, EXIF
        orientation ignored, as in training)."""
        out = []
        for start in range(0, len(images), self.batch_size):
            chunk = [load_image(im) for im in images[start:start + self.batch_size]]
            records = localize_batch(self.model, chunk, [[] for _ in chunk], self.settings,
                                     self.device)
            for r in records:
                found = r[self.method]
                out.append(LocPrediction(torch.from_numpy(r["guesses"]),
                                         torch.from_numpy(r["guess_scores"]),
                                         torch.from_numpy(found["boxes"]).float(),
                                         torch.from_numpy(found["box_scores"]), self.method))
        return out

    def to_json(self, prediction: LocPrediction) -> list[dict]:
        """The guesses as JSON-ready dicts (rank, class, class_id, score, box xyxy, box_score)."""
        return [{"rank": k + 1, "class": self.class_names[int(c)], "class_id": int(c),
                 "score": round(float(s), 5), "box": [round(float(v), 2) for v in b],
                 "box_score": round(float(bs), 5)}
                for k, (c, s, b, bs) in enumerate(zip(prediction.labels, prediction.class_scores,
                                                      prediction.boxes, prediction.box_scores))]
