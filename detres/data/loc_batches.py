"""Batches for the three training stages of the localizer (Appendix C) and its test loader.

All read a ``LocalizationDataset`` (data/localization.py):

- classifier: random crops -> ``(images (N, 3, S, S) uint8, labels (N,))``, the classification
  recipe on the localization images;
- per-class RPN: the same crops with their boxes -> ``(ImageBatch, list[Targets])``;
- R-CNN: RoI-centric samples: each image of a batch contributes ``rois_per_image`` proposals
  drawn from the RPN's top proposals for its ground-truth classes, plus its ground-truth boxes
  as candidates (as R-CNN fine-tuning does), on the original image (flipped at random) ->
  ``(ImageBatch, proposals, classes, list[Targets])``, boxes in original pixels;
- test: lists of untransformed samples (evaluation/localization_runner.py resizes them per
  scale with data/loc_transforms.py).

Training loaders take ``TrainingSampler`` batches of ``(index, seed)``; the seed makes
the R-CNN's RoI draw and flip a function of the position in the stream, so a resumed run sees
the same samples.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from detres import boxes as box_ops
from detres.data.images import image_to_tensor
from detres.data.loader import make_loader
from detres.data.samplers import DropSeed, InferenceSampler, TrainingSampler
from detres.structures import ImageBatch, Targets


def collate_classifier(samples: list[Any]) -> tuple[Tensor, Tensor]:
    return (torch.stack([image_to_tensor(s.image) for s in samples]),
            torch.tensor([s.image_label for s in samples], dtype=torch.int64))


def collate_rpn(samples: list[Any]) -> tuple[ImageBatch, list[Targets]]:
    images = ImageBatch.from_tensors([image_to_tensor(s.image) for s in samples])
    targets = [Targets(torch.as_tensor(s.boxes, dtype=torch.float32).reshape(-1, 4),
                       torch.as_tensor(s.labels, dtype=torch.int64), int(s.index),
                       float(s.scale), tuple(s.orig_size)) for s in samples]
    return images, targets


class RCNNSamples(Dataset):
    """RoI-centric training samples of the R-CNN stage.

    Args:
        dataset: a LocalizationDataset without transform (original images).
        proposals: ``{index: (boxes (P, 4) original pixels, classes (P,))}``, the RPN's top
            proposals for the ground-truth classes of each image.
        rois_per_image: RoIs drawn per image (with replacement when it has fewer).
        flip_prob: probability of a horizontal flip of the image and its boxes.
    """

    def __init__(self, dataset: Any, proposals: dict[int, tuple[Tensor, Tensor]],
                 rois_per_image: int, flip_prob: float = 0.5) -> None:
        self.dataset, self.proposals = dataset, proposals
        self.rois_per_image, self.flip_prob = rois_per_image, flip_prob

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: tuple[int, int]) -> tuple[Tensor, Tensor, Tensor, Targets]:
        index, seed = item
        rng = np.random.default_rng(seed)
        sample = self.dataset[index]
        gt_boxes = np.asarray(sample.boxes, np.float32).reshape(-1, 4)
        gt_labels = np.asarray(sample.labels, np.int64)
        boxes, classes = self.proposals.get(index, (torch.zeros(0, 4), torch.zeros(0)))
        pool_boxes = np.concatenate([boxes.numpy().reshape(-1, 4), gt_boxes])
        pool_classes = np.concatenate([classes.numpy().astype(np.int64), gt_labels])
        pick = rng.choice(len(pool_boxes), self.rois_per_image,
                          replace=len(pool_boxes) < self.rois_per_image)
        rois = torch.from_numpy(pool_boxes[pick].astype(np.float32))
        gt = torch.from_numpy(gt_boxes)
        image = sample.image
        if rng.uniform() < self.flip_prob:
            image = image[:, ::-1]
            rois, gt = box_ops.hflip(rois, image.shape[1]), box_ops.hflip(gt, image.shape[1])
        target = Targets(gt, torch.from_numpy(gt_labels), int(index), 1.0, image.shape[:2])
        return image_to_tensor(image), rois, torch.from_numpy(pool_classes[pick]), target


def collate_rcnn(samples: list[tuple[Tensor, Tensor, Tensor, Targets]]
                 ) -> tuple[ImageBatch, list[Tensor], list[Tensor], list[Targets]]:
    images = ImageBatch.from_tensors([s[0] for s in samples])
    return images, [s[1] for s in samples], [s[2] for s in samples], [s[3] for s in samples]


def collate_list(samples: list[Any]) -> list[Any]:
    return list(samples)


def train_loader(dataset: Dataset, collate: Any, sampler: TrainingSampler,
                 num_workers: int, pin_memory: bool = False, positions: bool = True
                 ) -> DataLoader:
    """An endless loader over ``sampler``'s batches; ``positions=False`` passes the
    ``(index, seed)`` items to the dataset unchanged (``RCNNSamples``)."""
    return make_loader(DropSeed(dataset) if positions else dataset, batch_sampler=sampler,
                       collate_fn=collate, num_workers=num_workers, pin_memory=pin_memory,
                       seed=sampler.seed, rank=sampler.rank)


def inference_loader(dataset: Dataset, batch_size: int, rank: int, world_size: int,
                     num_workers: int) -> DataLoader:
    """Lists of untransformed samples; each rank a contiguous slice of the images, in order."""
    return make_loader(dataset, sampler=InferenceSampler(len(dataset), rank, world_size),
                       batch_size=batch_size, collate_fn=collate_list, num_workers=num_workers,
                       rank=rank)
