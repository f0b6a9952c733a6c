"""Batching: samplers and collate -> (ImageBatch, list[Targets]) (DESIGN.md section 2).

Training is iteration-based, so the training sampler is an infinite stream of batches for this
rank (like detectron2's TrainingSampler + AspectRatioGroupedDataset, but as one batch sampler
that can start at any iteration):

- epoch e of the stream is a permutation of all images drawn from ``seed`` and e alone
  (``np.random.default_rng([seed, e])``); rank r of W takes every W-th image of it, so the
  ranks see disjoint images and need no communication;
- with aspect grouping, images go into one of two buckets (w >= h, w < h) and a bucket that
  has ``batch_size`` images is emitted as a batch, so a batch pads little; a bucket's leftovers
  carry over into the next epoch;
- ``start_iter = k`` begins with batch k of the same stream (whole epochs are skipped by
  counting, not by replaying), so a resumed run sees exactly the batches it would have seen.

Evaluation uses ``InferenceSampler``: rank r gets a contiguous slice of the images, in order,
with no padding and no repeats (evaluation gathers the ranks' results).

Augmentation randomness in workers comes from the DataLoader's generator (seeded with ``seed``
and the rank), see ``detres.data.transforms``. OpenCV's thread count is left alone in workers:
``cv2.setNumThreads`` in a forked worker hangs once the parent has used OpenCV's thread pool.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Iterator, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import BatchSampler, ConcatDataset, DataLoader, Dataset, Sampler, Subset

from detres.structures import SIZE_DIVISIBILITY, ImageBatch, Targets


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


class TrainingBatchSampler(Sampler[list[int]]):
    """Batches of dataset indices for one rank: infinite, or ``epochs`` epochs.

    Args:
        num_samples: dataset size N.
        batch_size: images per batch on this rank.
        group_ids: (N,) group of each image (batches never mix groups); None: one group.
        shuffle: a fresh permutation each epoch; False: 0..N-1 every epoch.
        seed: the permutation of epoch e depends on (seed, e) only.
        rank, world_size: this rank takes images ``rank::world_size`` of each epoch.
        start_iter: skip the first ``start_iter`` batches (to resume).
        epochs: stop after this many epochs (None: never); the leftover partial batches are
            then emitted unless ``drop_last``.
    """

    def __init__(self, num_samples: int, batch_size: int, *, group_ids: np.ndarray | None = None,
                 shuffle: bool = True, seed: int = 0, rank: int = 0, world_size: int = 1,
                 start_iter: int = 0, epochs: int | None = None, drop_last: bool = False) -> None:
        if num_samples <= 0 or batch_size <= 0:
            raise ValueError(f"need num_samples > 0 and batch_size > 0, got {num_samples}, "
                             f"{batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        if num_samples < world_size:
            raise ValueError(f"{num_samples} images cannot be shared by {world_size} ranks")
        self.num_samples, self.batch_size = num_samples, batch_size
        self.group_ids = (np.zeros(num_samples, np.int64) if group_ids is None
                          else np.asarray(group_ids, np.int64))
        if len(self.group_ids) != num_samples:
            raise ValueError(f"{len(self.group_ids)} group ids for {num_samples} images")
        self.num_groups = int(self.group_ids.max()) + 1
        self.shuffle, self.seed = shuffle, seed
        self.rank, self.world_size = rank, world_size
        self.start_iter, self.epochs, self.drop_last = start_iter, epochs, drop_last

    def state_dict(self) -> dict[str, int]:
        return {"next_batch": self.start_iter}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """The next iterator starts at batch ``state["next_batch"]`` (exact resume)."""
        self.start_iter = int(state["next_batch"])

    def epoch_indices(self, epoch: int) -> np.ndarray:
        """This rank's images of one epoch, in order."""
        order = (np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)
                 if self.shuffle else np.arange(self.num_samples))
        return order[self.rank::self.world_size]

    def _count_epoch(self, idx: np.ndarray, carry: list[list[int]]) -> int:
        """Batches that epoch ``idx`` completes; updates ``carry`` to its leftovers."""
        done = 0
        gids = self.group_ids[idx]
        for g in range(self.num_groups):
            members = carry[g] + idx[gids == g].tolist()
            full = len(members) // self.batch_size
            done += full
            carry[g] = members[full * self.batch_size:]
        return done

    def __iter__(self) -> Iterator[list[int]]:
        carry: list[list[int]] = [[] for _ in range(self.num_groups)]
        epoch, emitted = 0, 0
        while self.epochs is None or epoch < self.epochs:  # skip whole epochs by counting
            idx = self.epoch_indices(epoch)
            trial = [list(c) for c in carry]
            n = self._count_epoch(idx, trial)
            if emitted + n > self.start_iter:
                break
            carry, emitted, epoch = trial, emitted + n, epoch + 1
        while self.epochs is None or epoch < self.epochs:
            for i in self.epoch_indices(epoch).tolist():
                bucket = carry[self.group_ids[i]]
                bucket.append(i)
                if len(bucket) == self.batch_size:
                    if emitted >= self.start_iter:
                        yield list(bucket)
                    emitted += 1
                    bucket.clear()
            epoch += 1
        if not self.drop_last:
            for bucket in carry:
                if bucket:
                    if emitted >= self.start_iter:
                        yield list(bucket)
                    emitted += 1

    def __len__(self) -> int:
        if self.epochs is None:
            raise TypeError("an infinite TrainingBatchSampler has no length")
        carry: list[list[int]] = [[] for _ in range(self.num_groups)]
        n = sum(self._count_epoch(self.epoch_indices(e), carry) for e in range(self.epochs))
        if not self.drop_last:
            n += sum(1 for c in carry if c)
        return max(n - self.start_iter, 0)


class InferenceSampler(Sampler[int]):
    """Rank r of W gets a contiguous, ordered slice of 0..N-1; the slices cover every index
    once (sizes differ by at most one)."""

    def __init__(self, num_samples: int, rank: int = 0, world_size: int = 1) -> None:
        per, extra = divmod(num_samples, world_size)
        self.begin = rank * per + min(rank, extra)
        self.end = self.begin + per + (rank < extra)

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.begin, self.end))

    def __len__(self) -> int:
        return self.end - self.begin


class DetectionBatch(tuple):
    """``(ImageBatch, list[Targets])``; a tuple that the DataLoader knows how to pin."""

    def pin_memory(self) -> tuple[ImageBatch, list[Targets]]:
        images, targets = self
        return (ImageBatch(images.tensor.pin_memory(), list(images.sizes)), _pin(targets))


def _pin(targets: list[Targets]) -> list[Targets]:
    return [replace(t, boxes=t.boxes.pin_memory(), labels=t.labels.pin_memory())
            for t in targets]


def _pad(images: Sequence[Tensor], size_divisibility: int, dtype: torch.dtype
         ) -> tuple[Tensor, list[tuple[int, int]]]:
    """As ``ImageBatch.from_tensors``, in any dtype."""
    if not images:
        raise ValueError("cannot collate an empty batch")
    sizes = [(int(im.shape[-2]), int(im.shape[-1])) for im in images]
    d = size_divisibility
    h = (max(s[0] for s in sizes) + d - 1) // d * d
    w = (max(s[1] for s in sizes) + d - 1) // d * d
    out = torch.zeros((len(images), 3, h, w), dtype=dtype)
    for i, im in enumerate(images):
        out[i, :, : im.shape[-2], : im.shape[-1]].copy_(im)
    return out, sizes


def collate_detection(batch: Sequence[tuple[Tensor, Targets]],
                      size_divisibility: int = SIZE_DIVISIBILITY) -> DetectionBatch:
    """[(image (3, h, w), Targets)] -> (ImageBatch, float32, zero-padded to a multiple of 32,
    list[Targets])."""
    images = ImageBatch.from_tensors([im for im, _ in batch], size_divisibility)
    return DetectionBatch((images, [t for _, t in batch]))


class _PackedBatch(tuple):
    """(uint8 (N, 3, H, W) padded images, sizes, targets): what a worker sends."""

    def pin_memory(self) -> _PackedBatch:
        tensor, sizes, targets = self
        return _PackedBatch((tensor.pin_memory(), sizes, _pin(targets)))

    def unpack(self) -> tuple[ImageBatch, list[Targets]]:
        tensor, sizes, targets = self
        out = torch.empty(tensor.shape, dtype=torch.float32, pin_memory=tensor.is_pinned())
        return ImageBatch(out.copy_(tensor), sizes), targets


def _collate_packed(batch: Sequence[tuple[Tensor, Targets]]) -> _PackedBatch:
    images = [im for im, _ in batch]
    dtype = torch.uint8 if all(im.dtype == torch.uint8 for im in images) else torch.float32
    tensor, sizes = _pad(images, SIZE_DIVISIBILITY, dtype)
    return _PackedBatch((tensor, sizes, [t for _, t in batch]))


class DetectionLoader(DataLoader):
    """A DataLoader of ``(ImageBatch, list[Targets])``.

    Workers pad and send the batch as uint8, a quarter of the bytes of float32; the conversion
    to the float32 ``ImageBatch`` of DESIGN.md happens in the iterating process. (Measured on
    2 busy CPU cores, 1 worker, coco128 at 600/1000: about 18 images/s when workers sent
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


def build_detection_loader(dataset: Dataset, batch_size: int, *, infinite: bool = True,
                           shuffle: bool = True, aspect_grouping: bool = True,
                           num_workers: int = 0, pin_memory: bool = False, seed: int = 0,
                           rank: int | None = None, world_size: int | None = None,
                           start_iter: int = 0, drop_last: bool = False,
                           persistent_workers: bool = True) -> DetectionLoader:
    """A ``DetectionLoader`` of ``(ImageBatch, list[Targets])``.

    Args:
        dataset: yields ``(image (3, h, w), Targets)``; for aspect grouping it (or the
            datasets inside a ConcatDataset/Subset) has ``image_sizes`` (N, 2).
        batch_size: images per batch on this rank (global batch / world size).
        infinite: the training stream (``TrainingBatchSampler``, never ends, starts at
            ``start_iter``); False: one pass, in order with ``InferenceSampler`` unless
            ``shuffle``, which makes one shuffled (grouped) epoch.
        shuffle, aspect_grouping, seed, start_iter, drop_last: see ``TrainingBatchSampler``.
        num_workers, pin_memory, persistent_workers: as for ``torch.utils.data.DataLoader``.
        rank, world_size: default to torch.distributed's when it is initialised, else 0, 1.
    """
    rank, world_size = _dist_rank_world(rank, world_size)
    n = len(dataset)
    if infinite or shuffle:
        groups = aspect_group_ids(image_sizes_of(dataset)) if aspect_grouping else None
        batch_sampler: Sampler = TrainingBatchSampler(
            n, batch_size, group_ids=groups, shuffle=shuffle, seed=seed, rank=rank,
            world_size=world_size, start_iter=start_iter, epochs=None if infinite else 1,
            drop_last=drop_last)
    else:
        batch_sampler = BatchSampler(InferenceSampler(n, rank, world_size), batch_size,
                                     drop_last=drop_last)
    generator = torch.Generator()
    generator.manual_seed(int(np.random.SeedSequence([seed, rank]).generate_state(1)[0]))
    return DetectionLoader(dataset, batch_sampler=batch_sampler, collate_fn=_collate_packed,
                           num_workers=num_workers, pin_memory=pin_memory, generator=generator,
                           persistent_workers=persistent_workers and num_workers > 0)
