"""The localizer's other test forms (Table 13): the RPN on one centre crop with its boxes mapped
back, ensembles (hand cases), and R-CNN context padding."""
import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

from detres.config import ConfigError
from detres.data.loc_transforms import centre_crop_batch
from detres.models.loc_inference import (LocalizerEnsemble, LocTestSettings, LocViews,
                                         average_refinements, dense_proposals, localize,
                                         to_original, union_proposals)
from detres.models.localizer import RCNNRefiner, crop_and_warp, pad_boxes
from detres.models.pixels import normalize
from detres.models.resnet import ResNet
from detres.structures import ImageBatch
from detres.tasks.localization.build import build_rcnn_refiner
from detres.tasks.localization.config import LocalizationConfig
from detres.tasks.localization.inference import loc_views


class BrightBoxRPN(nn.Module):
    """A stand-in RPN whose one proposal per class is the box of the bright pixels (> 127) of
    each image of the batch, in the batch's pixels: where it lands in the original image shows
    how the view's boxes are mapped back."""

    def propose(self, images, classes, *, topk, pre_nms_topk, nms_threshold):
        out = []
        for i, wanted in enumerate(classes):
            h, w = images.sizes[i]
            ys, xs = torch.nonzero(images.tensor[i, 0, :h, :w] > 127, as_tuple=True)
            box = torch.tensor([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]],
                               dtype=torch.float32)
            out.append([(box, torch.ones(1)) for _ in wanted])
        return out


def test_one_crop_boxes_map_back_to_the_original_pixels():
    image = np.zeros((60, 90, 3), np.uint8)
    image[20:32, 50:62] = 255                       # x 50..62, y 20..32 in original pixels
    settings = LocTestSettings(scales=(120,), rpn_mode="one_crop", rpn_crop=96,
                               cls_test_size=32, cls_crop=32)
    views = loc_views([image], settings, originals=False)
    (batch, factors, offsets), = views.scales
    # shorter side 60 -> 120 (x2): 120 x 180, centre 96-crop at left (180-96)//2, top 12
    assert batch.sizes == [(96, 96)] and factors == [2.0] and offsets == [(42.0, 12.0)]
    classes = [torch.tensor([3, 1])]
    (found,) = dense_proposals(BrightBoxRPN(), views.scales, classes, settings,
                               torch.device("cpu"))
    for boxes, _ in found:
        torch.testing.assert_close(boxes, torch.tensor([[50.0, 20.0, 62.0, 32.0]]))
    dense = dataclasses.replace(settings, rpn_mode="dense")
    (whole,) = dense_proposals(BrightBoxRPN(), loc_views([image], dense, False).scales, classes,
                               dense, torch.device("cpu"))
    torch.testing.assert_close(whole[0][0], found[0][0])


def test_crop_view_is_the_centre_of_the_resized_image_and_maps_by_hand():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)
    batch, factors, offsets = centre_crop_batch([image], 50, 40)     # no resize
    assert factors == [1.0] and offsets == [(15.0, 5.0)]
    assert batch.sizes == [(40, 40)]
    np.testing.assert_array_equal(batch.tensor[0, :, :40, :40].permute(1, 2, 0).numpy(),
                                  image[5:45, 15:55])
    mapped = to_original(torch.tensor([[0.0, 0.0, 40.0, 40.0]]), 2.0, (42.0, 12.0))
    torch.testing.assert_close(mapped, torch.tensor([[21.0, 6.0, 41.0, 26.0]]))
    # an image narrower than the crop keeps all of that side (the offset is 0 there)
    batch, _, offsets = centre_crop_batch([image[:, :30]], 30, 40)
    assert batch.sizes == [(40, 30)] and offsets == [(0.0, 5.0)]


def test_union_and_average_on_hand_cases():
    a = [[(torch.tensor([[0.0, 0, 10, 10]]), torch.tensor([0.5]))]]
    b = [[(torch.tensor([[1.0, 1, 9, 9], [2.0, 2, 8, 8]]), torch.tensor([0.7, 0.2]))]]
    (((boxes, scores),),) = union_proposals([a, b])
    torch.testing.assert_close(scores, torch.tensor([0.7, 0.5, 0.2]))
    torch.testing.assert_close(boxes, torch.tensor([[1.0, 1, 9, 9], [0, 0, 10, 10],
                                                    [2, 2, 8, 8]]))
    r1 = [[(torch.tensor([[0.0, 0, 10, 10], [4.0, 4, 8, 8]]), torch.tensor([0.2, 0.9]))]]
    r2 = [[(torch.tensor([[2.0, 2, 12, 12], [4.0, 6, 8, 10]]), torch.tensor([0.6, 0.3]))]]
    (((boxes, scores),),) = average_refinements([r1, r2])
    torch.testing.assert_close(boxes, torch.tensor([[1.0, 1, 11, 11], [4, 5, 8, 9]]))
    torch.testing.assert_close(scores, torch.tensor([0.4, 0.6]))


class FixedMember(nn.Module):
    """A localizer with fixed answers: class probabilities, one proposal per class, and an
    R-CNN that moves each proposal by ``shift`` and scores it ``refined``."""

    num_classes = 3

    def __init__(self, probs, proposal, score, shift=None, refined=None):
        super().__init__()
        self.probs, self.proposal, self.score = torch.tensor([probs]), proposal, score
        self.shift, self.refined = shift, refined

    @property
    def has_rcnn(self):
        return self.shift is not None

    def class_scores(self, views, device):
        return self.probs

    def proposals(self, views, wanted, settings, device):
        return [[(torch.tensor([self.proposal]), torch.tensor([self.score])) for _ in w]
                for w in wanted]

    def refine(self, originals, proposals, wanted, device):
        return [[(b + self.shift, torch.full((len(b),), self.refined)) for b, _ in image]
                for image in proposals]


def test_ensemble_pipeline_on_a_hand_case():
    m1 = FixedMember([0.6, 0.3, 0.1], [0.0, 0, 10, 10], 0.9, shift=2.0, refined=0.1)
    m2 = FixedMember([0.1, 0.5, 0.4], [5.0, 5, 15, 15], 0.95, shift=4.0, refined=0.7)
    m3 = FixedMember([0.2, 0.1, 0.7], [1.0, 1, 3, 3], 0.5)          # no R-CNN
    views = LocViews([[torch.zeros(3, 4, 4)]], [], None)
    settings = LocTestSettings(topk_classes=2)
    (record,) = localize(LocalizerEnsemble([m1, m2, m3]), views, [[0]], settings, "cpu")
    # probabilities (0.3, 0.3, 0.4): class 2, then class 0 (the lower index on a tie)
    assert record["guesses"].tolist() == [2, 0]
    torch.testing.assert_close(record["guess_scores"], torch.tensor([0.4, 0.3]))
    # RPN: the union of 3 proposals per class, the best scored (m2's)
    torch.testing.assert_close(record["RPN"]["boxes"][0], torch.tensor([5.0, 5, 15, 15]))
    # R-CNN: m1 and m2 refine all 3 proposals; boxes moved by (2 + 4) / 2 = 3, scores
    # (0.1 + 0.7) / 2 = 0.4 for each: the first of the union (m2's) stays the best
    torch.testing.assert_close(record["RPN+R-CNN"]["boxes"][0], torch.tensor([8.0, 8, 18, 18]))
    torch.testing.assert_close(record["RPN+R-CNN"]["box_scores"], torch.tensor([0.4, 0.4]))
    assert set(record["RPN"]["gt_boxes"]) == {0}


def test_ensemble_members_must_agree_on_classes():
    other = FixedMember([0.5, 0.5], [0.0, 0, 1, 1], 1.0)
    other.num_classes = 2
    with pytest.raises(ValueError, match="different numbers of classes"):
        LocalizerEnsemble([FixedMember([0.2, 0.3, 0.5], [0.0, 0, 1, 1], 1.0), other])


def test_context_padding_dilates_the_box_by_hand():
    padded = pad_boxes(torch.tensor([[10.0, 10.0, 30.0, 50.0]]), 32, 4)   # 4 / 24 = 1/6
    torch.testing.assert_close(padded, torch.tensor([[10 - 20 / 6, 10 - 40 / 6,
                                                      30 + 20 / 6, 50 + 40 / 6]]))


def test_padded_warp_holds_the_tight_warp_in_its_centre():
    images = torch.rand(1, 3, 64, 80) * 255
    box = [torch.tensor([[12.0, 9.0, 52.0, 41.0]])]
    tight = crop_and_warp(images, box, 24)
    padded = crop_and_warp(images, box, 32, context_padding=4)
    torch.testing.assert_close(padded[:, :, 4:28, 4:28], tight, rtol=1e-4, atol=1e-3)
    with pytest.raises(ValueError, match="context_padding"):
        crop_and_warp(images, box, 32, context_padding=16)


def test_refiner_context_past_the_border_is_the_mean_colour():
    mean, std = (120.0, 110.0, 100.0), (50.0, 50.0, 50.0)
    refiner = RCNNRefiner(ResNet(8, stem="cifar", num_classes=None, width=4), 2, 16, mean, std,
                          context_padding=4).eval()
    seen = []
    refiner.net.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    image = torch.full((3, 20, 20), 200.0)
    batch = ImageBatch.from_tensors([image, torch.zeros(3, 40, 40)])   # image 0 padded to 64
    with torch.no_grad():
        refiner.predict(batch, [torch.tensor([[0.0, 0.0, 20.0, 20.0]]), torch.zeros(0, 4)],
                        [torch.tensor([1]), torch.zeros(0, dtype=torch.int64)])
    crop = seen[0][0]
    inside = normalize(torch.full((1, 3, 1, 1), 200.0), refiner.pixel_mean, refiner.pixel_std)
    torch.testing.assert_close(crop[:, 5:11, 5:11], inside[0].expand(3, 6, 6))
    assert crop[:, :3].abs().max() == 0 and crop[:, :, -3:].abs().max() == 0   # the mean


def test_context_padding_too_large_is_a_config_error():
    cfg = LocalizationConfig()
    cfg = dataclasses.replace(cfg, rcnn=dataclasses.replace(cfg.rcnn, input_size=32,
                                                            context_padding=16))
    with pytest.raises(ConfigError, match="rcnn.context_padding"):
        build_rcnn_refiner(cfg, 3)
