"""R-CNN training samples (data/loc_batches.py): RoIs drawn from proposals and ground truth,
image and boxes flipped together."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch

from detres.data.loc_batches import RCNNSamples, collate_rcnn


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
