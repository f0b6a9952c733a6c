"""Batching: samplers and collate -> (ImageBatch, list[Targets]) (docs/architecture.md, Carriers).

Training reads the infinite, resumable global-batch stream of ``detres.data.samplers.
TrainingSampler`` (aspect-grouped: a batch never mixes landscape and portrait images, so it pads
little; each rank takes its slice of every global batch, so the stream does not depend on the
number of processes); evaluation reads ``InferenceSampler``'s ordered per-rank slices.

Augmentation randomness in workers comes from the DataLoader's generator (seeded with ``seed``
and the rank), see ``detres.data.transforms``. OpenCV's thread count is left alone in workers:
``cv2.setNumThreads`` in a forked worker hangs once the parent has used OpenCV's thread pool.
Every task's loaders come from :func:`make_loader`.
"""
from __future__ import annotations

import signal
from collections.abc import Callable
from dataclasses import replace
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import BatchSampler, ConcatDataset, DataLoader, Dataset, Sampler, Subset

from detres.data.detection_dataset import DetectionDataset
from detres.data.samplers import DropSeed, InferenceSampler, TrainingSampler
from detres.structures import SIZE_DIVISIBILITY, ImageBatch, Targets, pad_images


def image_sizes_of(dataset: Dataset) -> np.ndarray:
    """(N, 2) (h, w) of each image without decoding it: from ``dataset.image_sizes``,
    through ``ConcatDataset`` and ``Subset``."""
    if isinstance(dataset, ConcatDataset):
        return np.concatenate([image_sizes_of(d) for d in dataset.datasets])
    if isinstance(dataset, Subset):
        return image_sizes_of(dataset.dataset)[np.asarray(dataset.indices)]
    sizes = getattr(dataset, "image_sizes", None)
    if sizes is None:
        raise TypeError(f"{type(dataset).__name__} has no image_sizes; aspect-ratio grouping "
                        "needs the (h, w) of each image (pass aspect_grouping=False)")
    return np.asarray(sizes).reshape(-1, 2)


def aspect_group_ids(image_sizes: np.ndarray) -> np.ndarray:
    """(N, 2) (h, w) -> (N,) int64: 0 for landscape or square (w >= h), 1 for portrait."""
    return (image_sizes[:, 1] < image_sizes[:, 0]).astype(np.int64)


class _PackedBatch(tuple):
    """(uint8 (N, 3, H, W) padded images, sizes, targets): what a worker sends."""

    def pin_memory(self) -> _PackedBatch:
        tensor, sizes, targets = self
        return _PackedBatch((tensor.pin_memory(), sizes,
                             [replace(t, boxes=t.boxes.pin_memory(), labels=t.labels.pin_memory())
                              for t in targets]))

    def unpack(self) -> tuple[ImageBatch, list[Targets]]:
        tensor, sizes, targets = self
        out = torch.empty(tensor.shape, dtype=torch.float32, pin_memory=tensor.is_pinned())
        return ImageBatch(out.copy_(tensor), sizes, [t.scale for t in targets]), targets


def _collate_packed(batch: Sequence[tuple[Tensor, Targets]]) -> _PackedBatch:
    images = [im for im, _ in batch]
    dtype = torch.uint8 if all(im.dtype == torch.uint8 for im in images) else torch.float32
    tensor, sizes = pad_images(images, SIZE_DIVISIBILITY, dtype)
    return _PackedBatch((tensor, sizes, [t for _, t in batch]))


class DetectionLoader(DataLoader):
    """A DataLoader of ``(ImageBatch, list[Targets])``.

    Workers pad and send the batch as uint8, a quarter of the bytes of float32; the conversion
    to the float32 ``ImageBatch`` (docs/architecture.md, Carriers) is done by the iterating process.
    (Measured on 2 busy cores, 1 worker, coco128 at 600/1000: about 18 images/s when workers sent
    float32 batches, 22 this way.)
    """

    def __iter__(self) -> Iterator[tuple[ImageBatch, list[Targets]]]:
        for packed in super().__iter__():
            yield packed.unpack()


def _dist_rank_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    if rank is not None and world_size is not None:
        return rank, world_size
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return (dist.get_rank() if rank is None else rank,
                dist.get_world_size() if world_size is None else world_size)
    return rank or 0, world_size or 1


def build_detection_loader(dataset: Dataset, batch_size: int, *, training: bool = True,
                           shuffle: bool = True, aspect_grouping: bool = True,
                           num_workers: int = 0, pin_memory: bool = False, seed: int = 0,
                           rank: int | None = None, world_size: int | None = None,
                           persistent_workers: bool = True,
                           batch_key: str = "batch_size") -> DetectionLoader:
    """A ``DetectionLoader`` of ``(ImageBatch, list[Targets])``.

    Args:
        dataset: yields ``(image (3, h, w), Targets)``; for aspect grouping it (or the
            datasets inside a ConcatDataset/Subset) has ``image_sizes`` (N, 2).
        batch_size: training: the GLOBAL batch, each rank loads ``batch_size / world_size``
            of it (a ConfigError naming ``batch_key`` if it does not divide); inference: images
            per batch on this rank.
        training: the infinite ``TrainingSampler`` stream (the loader's ``batch_sampler``
            resumes with ``load_state_dict({"next_batch": b})``); False: one ordered pass over
            this rank's ``InferenceSampler`` slice.
        shuffle, aspect_grouping, seed: see ``TrainingSampler`` (training only).
        num_workers, pin_memory, persistent_workers: as for ``torch.utils.data.DataLoader``.
        rank, world_size: default to torch.distributed's when it is initialised, else 0, 1.
    """
    rank, world_size = _dist_rank_world(rank, world_size)
    n = len(dataset)
    if training:
        groups = aspect_group_ids(image_sizes_of(dataset)) if aspect_grouping else None
        batch_sampler: Sampler = TrainingSampler(n, batch_size, group_ids=groups,
                                                 shuffle=shuffle, seed=seed, rank=rank,
                                                 world_size=world_size, key=batch_key)
        # A DetectionDataset takes the (index, seed) items: the seed drives the sample's
        # augmentation, so a resumed run equals an uninterrupted one; others get indices.
        if not isinstance(dataset, DetectionDataset):
            dataset = DropSeed(dataset)
    else:
        batch_sampler = BatchSampler(InferenceSampler(n, rank, world_size), batch_size,
                                     drop_last=False)
    return make_loader(dataset, batch_sampler=batch_sampler, collate_fn=_collate_packed,
                       num_workers=num_workers, pin_memory=pin_memory, seed=seed, rank=rank,
                       persistent_workers=persistent_workers, loader_class=DetectionLoader)


def ignore_interrupts(_: int) -> None:
    """A worker's start: Ctrl-C is the training loop's to handle (it finishes the step and
    saves a checkpoint); a worker ended by the same signal would fail the next batch."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def make_loader(dataset: Dataset, *, collate_fn: Callable[[list], Any],
                batch_sampler: Sampler | None = None, sampler: Sampler | None = None,
                batch_size: int = 1, num_workers: int = 0, pin_memory: bool = False,
                seed: int = 0, rank: int = 0, persistent_workers: bool = False,
                loader_class: type[DataLoader] = DataLoader) -> DataLoader:
    """The DataLoader of every task: over a batch sampler (training) or a sampler of single
    items (inference, ``batch_size`` per batch). Its generator, seeded with ``(seed, rank)``,
    gives each worker its base seed, so runs repeat; workers leave Ctrl-C to the loop."""
    batching = (dict(batch_sampler=batch_sampler) if batch_sampler is not None else
                dict(sampler=sampler, batch_size=batch_size, drop_last=False))
    generator = torch.Generator()
    generator.manual_seed(int(np.random.SeedSequence([seed, rank]).generate_state(1)[0]))
    return loader_class(dataset, collate_fn=collate_fn, num_workers=num_workers,
                        pin_memory=pin_memory, generator=generator,
                        worker_init_fn=ignore_interrupts if num_workers else None,
                        persistent_workers=persistent_workers and num_workers > 0, **batching)
