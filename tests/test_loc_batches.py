"""R-CNN training samples (data/loc_batches.py): RoIs drawn from proposals and ground truth,
image and boxes flipped together."""
from __future__ import annotations

import itertools
from types import SimpleNamespace

import numpy as np
import torch

from detres.data import loc_batches
from detres.data.loc_batches import RCNNSamples, collate_list, collate_rcnn
from detres.data.samplers import TrainingSampler


class OneImage:
    """A 20x30 image whose pixel (y, x) holds x, with one ground-truth box of class 2."""

    def __len__(self) -> int:
        return 1

    def __getitem__(self, i: int) -> SimpleNamespace:
        image = np.broadcast_to(np.arange(30, dtype=np.uint8)[None, :, None], (20, 30, 3)).copy()
        return SimpleNamespace(image=image, boxes=np.array([[2.0, 3.0, 12.0, 15.0]], np.float32),
                               labels=np.array([2]))


def test_rois_come_from_proposals_and_ground_truth_with_their_classes():
    proposals = {0: (torch.tensor([[0.0, 0.0, 5.0, 5.0]]), torch.tensor([2]))}
    samples = RCNNSamples(OneImage(), proposals, rois_per_image=64, flip_prob=0.0)
    image, rois, classes, target = samples[(0, 7)]
    found = {tuple(r) for r in rois.tolist()}
    assert found == {(0.0, 0.0, 5.0, 5.0), (2.0, 3.0, 12.0, 15.0)}    # both drawn among 64
    assert classes.tolist() == [2] * 64 and target.labels.tolist() == [2]
    assert image[0, 0].tolist() == list(range(30)) and target.orig_size == (20, 30)
    again = samples[(0, 7)]
    assert torch.equal(again[1], rois)                                  # the seed fixes the draw


def test_flip_mirrors_image_rois_and_ground_truth_together():
    proposals = {0: (torch.tensor([[0.0, 0.0, 5.0, 5.0]]), torch.tensor([2]))}
    flipped = RCNNSamples(OneImage(), proposals, rois_per_image=4, flip_prob=1.0)[(0, 3)]
    plain = RCNNSamples(OneImage(), proposals, rois_per_image=4, flip_prob=0.0)[(0, 3)]
    assert flipped[0][0, 0].tolist() == list(range(29, -1, -1))
    expected = torch.stack([30 - plain[1][:, 2], plain[1][:, 1], 30 - plain[1][:, 0],
                            plain[1][:, 3]], 1)
    torch.testing.assert_close(flipped[1], expected)
    torch.testing.assert_close(flipped[3].boxes, torch.tensor([[18.0, 3.0, 28.0, 15.0]]))
    images, rois, classes, targets = collate_rcnn([flipped, plain])
    assert images.tensor.shape == (2, 3, 32, 32) and len(rois) == 2 and len(targets) == 2


class Numbers:
    """Sample i is a namespace holding ``index = i`` (the test loader's untransformed samples)."""

    def __len__(self) -> int:
        return 7

    def __getitem__(self, i: int) -> SimpleNamespace:
        return SimpleNamespace(index=i)


def test_loaders_read_the_shared_samplers():
    sampler = TrainingSampler(7, 4, seed=2, rank=1, world_size=2)
    loader = loc_batches.train_loader(Numbers(), collate_list, sampler, 0)
    batches = itertools.islice(iter(loader), 3)
    got = [[s.index for s in batch] for batch in batches]      # seeds dropped for the dataset
    expected = [[i for i, _ in b] for b in itertools.islice(iter(sampler), 3)]
    assert got == expected
    shards = [[s.index for batch in loc_batches.inference_loader(Numbers(), 2, r, 2, 0)
               for s in batch] for r in range(2)]
    assert shards == [[0, 1, 2, 3], [4, 5, 6]]                 # contiguous, ordered, no repeats
