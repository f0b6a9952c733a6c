"""Batching: aspect grouping, distributed shards, exact resume, collate, workers."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from detres.data.builtin import ensure_builtin_shapes, shapes_split
from detres.data.coco import COCODetection
from detres.data.loader import (DetectionBatch, InferenceSampler, TrainingBatchSampler,
                                aspect_group_ids, build_detection_loader, collate_detection)
from detres.data.transforms import train_transform
from detres.structures import ImageBatch, Targets

N = 37
GROUPS = np.random.default_rng(0).integers(0, 2, N)


def _take(sampler, n: int) -> list[list[int]]:
    return list(itertools.islice(iter(sampler), n))


def test_aspect_group_ids():
    sizes = np.array([[480, 640], [640, 480], [500, 500]])  # (h, w)
    assert aspect_group_ids(sizes).tolist() == [0, 1, 0]


def test_batches_never_mix_groups_and_cover_each_epoch():
    s = TrainingBatchSampler(N, 4, group_ids=GROUPS, seed=5)
    batches = _take(s, 40)
    assert all(len(b) == 4 and len(set(GROUPS[b])) == 1 for b in batches)
    first = [i for b in batches[:8] for i in b]
    assert len(set(first)) == len(first)  # no repeats before the first epoch is used up
    assert _take(TrainingBatchSampler(N, 4, group_ids=GROUPS, seed=5), 40) == batches
    assert _take(TrainingBatchSampler(N, 4, group_ids=GROUPS, seed=6), 40) != batches


@pytest.mark.parametrize("start", [0, 1, 9, 10, 23, 57])
def test_start_iter_resumes_the_same_stream(start):
    full = _take(TrainingBatchSampler(N, 3, group_ids=GROUPS, seed=1, rank=1, world_size=2), 80)
    resumed = TrainingBatchSampler(N, 3, group_ids=GROUPS, seed=1, rank=1, world_size=2,
                                   start_iter=start)
    assert _take(resumed, 80 - start) == full[start:]


def test_ranks_take_disjoint_shards_of_each_epoch():
    world = 3
    per_rank = [TrainingBatchSampler(N, 1, shuffle=True, seed=2, rank=r, world_size=world)
                for r in range(world)]
    epoch0 = [set(s.epoch_indices(0).tolist()) for s in per_rank]
    assert set.union(*epoch0) == set(range(N)) and sum(map(len, epoch0)) == N
    assert per_rank[0].epoch_indices(0).tolist() != per_rank[0].epoch_indices(1).tolist()


def test_one_epoch_finite_and_inference_sampler():
    s = TrainingBatchSampler(N, 4, group_ids=GROUPS, seed=0, epochs=1)
    batches = list(s)
    assert sorted(i for b in batches for i in b) == list(range(N)) and len(s) == len(batches)
    assert len(TrainingBatchSampler(N, 4, group_ids=GROUPS, epochs=1, drop_last=True)) == 8
    shards = [list(InferenceSampler(10, r, 3)) for r in range(3)]
    assert shards == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]


def test_collate_pads_to_multiple_of_32():
    a = torch.full((3, 40, 50), 7, dtype=torch.uint8)
    b = torch.full((3, 33, 70), 9, dtype=torch.uint8)
    t = Targets(torch.zeros((0, 4)), torch.zeros(0, dtype=torch.int64), 1)
    images, targets = collate_detection([(a, t), (b, t)])
    assert isinstance(images, ImageBatch) and images.tensor.dtype == torch.float32
    assert images.tensor.shape == (2, 3, 64, 96) and images.sizes == [(40, 50), (33, 70)]
    assert images.tensor[0, :, :40, :50].eq(7).all() and images.tensor[0, :, 40:].eq(0).all()
    assert images.tensor[1, :, :33, :70].eq(9).all() and images.tensor[1, :, :, 70:].eq(0).all()
    assert targets == [t, t]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory needs CUDA")
def test_pin_memory_keeps_types():
    t = Targets(torch.zeros((1, 4)), torch.zeros(1, dtype=torch.int64), 1)
    batch = collate_detection([(torch.zeros(3, 8, 8), t)])
    images, targets = DetectionBatch(batch).pin_memory()
    assert images.tensor.is_pinned() and targets[0].boxes.is_pinned()


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> COCODetection:
    folder = ensure_builtin_shapes(tmp_path_factory.mktemp("cache"), num_train=16, num_val=2,
                                   image_size=64)
    ann, images = shapes_split(folder, "train")
    return COCODetection(ann, images, filter_empty=True,
                         transform=train_transform((48, 64), 96, flip_prob=0.5,
                                                   color_jitter=0.3))


def test_loader_with_workers_is_deterministic(shapes):
    def batches(workers: int) -> list:
        loader = build_detection_loader(shapes, 4, num_workers=workers, seed=3,
                                        persistent_workers=False)
        return list(itertools.islice(iter(loader), 3))

    a, b = batches(2), batches(2)
    for (ia, ta), (ib, tb) in zip(a, b):
        assert ia.tensor.dtype == torch.float32 and isinstance(ia, ImageBatch)
        assert ia.tensor.shape[-1] % 32 == 0 and ia.tensor.shape[-2] % 32 == 0
        assert torch.equal(ia.tensor, ib.tensor) and ia.sizes == ib.sizes
        assert [t.image_id for t in ta] == [t.image_id for t in tb]
        assert all(torch.equal(x.boxes, y.boxes) for x, y in zip(ta, tb))
    # Different workers draw different augmentations: not all scales equal across a batch.
    scales = {t.scale for _, ts in a for t in ts}
    assert len(scales) > 1


def test_eval_loader_keeps_order_and_shards(shapes):
    ids = [[t.image_id for _, ts in build_detection_loader(
        shapes, 3, infinite=False, shuffle=False, rank=r, world_size=2) for t in ts]
        for r in range(2)]
    assert ids[0] + ids[1] == shapes.image_ids.tolist()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory needs CUDA")
def test_loader_pins_float32_batches(shapes):
    loader = build_detection_loader(shapes, 2, num_workers=1, pin_memory=True,
                                    persistent_workers=False)
    images, targets = next(iter(loader))
    assert images.tensor.dtype == torch.float32 and images.tensor.is_pinned()
    assert targets[0].boxes.is_pinned()


def test_load_state_dict_moves_the_next_iterator():
    full = _take(TrainingBatchSampler(N, 3, group_ids=GROUPS, seed=1), 30)
    s = TrainingBatchSampler(N, 3, group_ids=GROUPS, seed=1)
    s.load_state_dict({"next_batch": 12})
    assert s.state_dict() == {"next_batch": 12}
    assert _take(s, 18) == full[12:]
