"""Matcher and balanced sampler: oracle against torchvision's Matcher, and invariants."""
import pytest
import torch
from torchvision.models.detection._utils import Matcher as TVMatcher

from detres.models.matching import Matcher, gather_sampled, sample_balanced


def random_iou(num_gt, num_pred, seed=0):
    g = torch.Generator().manual_seed(seed)
    iou = torch.rand(num_gt, num_pred, generator=g)
    return iou * (torch.rand(num_gt, num_pred, generator=g) < 0.3)   # mostly no overlap


@pytest.mark.parametrize("low_quality", [False, True])
def test_matcher_equals_torchvision(low_quality):
    iou = random_iou(5, 400)
    iou[3] = 0.0
    iou[3, 17] = 0.2  # a box whose best anchor is a low-quality match
    idx, labels = Matcher(0.3, 0.7, low_quality)(iou)
    ref = TVMatcher(0.7, 0.3, low_quality)(iou.clone())
    expected = torch.where(ref >= 0, 1, torch.where(ref == -1, 0, -1))
    assert torch.equal(labels.long(), expected)
    assert set(labels.unique().tolist()) <= {-1, 0, 1}
    fg = labels == 1
    torch.testing.assert_close(iou[idx[fg], fg.nonzero()[:, 0]], iou.max(0).values[fg])
    assert (idx >= 0).all() and (idx < 5).all()
    if low_quality:
        assert labels[17] == 1


def test_matcher_single_threshold_has_no_ignored():
    _, labels = Matcher(0.5, 0.5)(random_iou(3, 100))
    assert set(labels.unique().tolist()) <= {0, 1}


def test_matcher_empty_ground_truth_is_all_background():
    idx, labels = Matcher(0.3, 0.7, True)(torch.zeros(0, 50))
    assert idx.shape == labels.shape == (50,)
    assert (labels == 0).all() and (idx == 0).all()


def test_low_quality_match_ignores_boxes_without_overlap():
    iou = torch.zeros(2, 10)
    iou[0, 3] = 0.1
    _, labels = Matcher(0.3, 0.7, True)(iou)
    assert labels.tolist() == [0, 0, 0, 1, 0, 0, 0, 0, 0, 0]


@pytest.mark.parametrize("num_pos,num_neg,num_ignored", [(500, 2000, 300), (10, 2000, 0),
                                                         (5, 30, 10), (0, 100, 0), (300, 20, 0)])
@pytest.mark.parametrize("num_samples,fraction", [(256, 0.5), (512, 0.25)])
def test_sampler_counts_and_fractions(num_pos, num_neg, num_ignored, num_samples, fraction):
    labels = torch.cat((torch.ones(num_pos), torch.zeros(num_neg), -torch.ones(num_ignored)))
    labels = labels.to(torch.int8)
    labels = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(1))]
    sampled = sample_balanced(labels, num_samples, fraction)
    pos, neg = (sampled & (labels == 1)).sum().item(), (sampled & (labels == 0)).sum().item()
    assert not (sampled & (labels == -1)).any()
    quota = int(num_samples * fraction)
    assert pos == min(num_pos, quota)
    assert neg == min(num_neg, num_samples - pos)
    idx, valid = gather_sampled(sampled, num_samples)
    assert len(idx) == min(num_samples, len(labels))
    assert valid.sum() == sampled.sum() and sampled[idx[valid]].all()
    assert len(set(idx.tolist())) == len(idx)


def test_sampler_is_random_and_uniform():
    labels = torch.cat((torch.ones(100), torch.zeros(100))).to(torch.int8)
    counts = sum(sample_balanced(labels, 20, 0.5).float() for _ in range(500))
    assert counts[:100].sum() == 500 * 10 and counts[100:].sum() == 500 * 10
    assert counts.min() > 15 and counts.max() < 90   # each element drawn about 50 times


def test_sampler_generator_reproducible():
    labels = (torch.rand(1000, generator=torch.Generator().manual_seed(0)) > 0.9).to(torch.int8)
    a = sample_balanced(labels, 256, 0.5, torch.Generator().manual_seed(3))
    b = sample_balanced(labels, 256, 0.5, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
