"""Detection batching: aspect grouping, loader shards and resume, collate, workers (the
sampler itself: test_samplers.py)."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from detres.config import ConfigError
from detres.data.builtin import ensure_builtin_shapes, shapes_split
from detres.data.coco import COCODetection
from detres.data.loader import aspect_group_ids, build_detection_loader
from detres.data.samplers import TrainingSampler
from detres.data.transforms import train_transform
from detres.structures import ImageBatch, Targets

def test_aspect_group_ids():
    sizes = np.array([[480, 640], [640, 480], [500, 500]])  # (h, w)
    assert aspect_group_ids(sizes).tolist() == [0, 1, 0]


def _two_images() -> list:
    a = torch.full((3, 40, 50), 7, dtype=torch.uint8)
    b = torch.full((3, 33, 70), 9, dtype=torch.uint8)
    return [(a, Targets(torch.zeros((0, 4)), torch.zeros(0, dtype=torch.int64), 1, scale=0.5)),
            (b, Targets(torch.ones((1, 4)), torch.zeros(1, dtype=torch.int64), 2, scale=2.0))]


def test_collate_pads_to_multiple_of_32():
    items = _two_images()
    loader = build_detection_loader(items, 2, training=False, rank=0, world_size=1)
    (images, targets), = list(loader)
    assert isinstance(images, ImageBatch) and images.tensor.dtype == torch.float32
    assert images.tensor.shape == (2, 3, 64, 96) and images.sizes == [(40, 50), (33, 70)]
    assert images.tensor[0, :, :40, :50].eq(7).all() and images.tensor[0, :, 40:].eq(0).all()
    assert images.tensor[1, :, :33, :70].eq(9).all() and images.tensor[1, :, :, 70:].eq(0).all()
    assert images.scales == [0.5, 2.0] and targets == [t for _, t in items]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory needs CUDA")
def test_pin_memory_keeps_types_and_scales():
    loader = build_detection_loader(_two_images(), 2, training=False, pin_memory=True,
                                    rank=0, world_size=1)
    (images, targets), = list(loader)
    assert images.tensor.is_pinned() and targets[0].boxes.is_pinned()
    assert images.scales == [0.5, 2.0]


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
        shapes, 3, training=False, rank=r, world_size=2) for t in ts]
        for r in range(2)]
    assert ids[0] + ids[1] == shapes.image_ids.tolist()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory needs CUDA")
def test_loader_pins_float32_batches(shapes):
    loader = build_detection_loader(shapes, 2, num_workers=1, pin_memory=True,
                                    persistent_workers=False)
    images, targets = next(iter(loader))
    assert images.tensor.dtype == torch.float32 and images.tensor.is_pinned()
    assert targets[0].boxes.is_pinned()


def test_train_loader_resumes_and_splits_global_batches(shapes):
    def ids(loader, n: int) -> list[list[int]]:
        return [[t.image_id for t in ts] for _, ts in itertools.islice(iter(loader), n)]

    full = ids(build_detection_loader(shapes, 4, seed=3), 6)
    ranks = [ids(build_detection_loader(shapes, 4, seed=3, rank=r, world_size=2), 6)
             for r in range(2)]
    assert [a + b for a, b in zip(*ranks)] == full          # the same global batches
    resumed = build_detection_loader(shapes, 4, seed=3)
    assert isinstance(resumed.batch_sampler, TrainingSampler)
    resumed.batch_sampler.load_state_dict({"next_batch": 4})   # what Trainer.resume does
    assert ids(resumed, 2) == full[4:6]
    with pytest.raises(ConfigError, match="solver.ims_per_batch=4 is not divisible by the 3"):
        build_detection_loader(shapes, 4, rank=0, world_size=3, batch_key="solver.ims_per_batch")
