"""The samplers of every task (detection, classification, localization).

Training reads one infinite, resumable stream of GLOBAL batches (``TrainingSampler``); rank r
of W takes the r-th contiguous slice of ``global_batch / W`` of each, so the stream, and hence
what a run learns from, does not depend on the number of processes:

- epoch e of the stream is ``np.random.default_rng([seed, e]).permutation(N)`` (``arange(N)``
  without shuffling); position p of the ungrouped stream is item ``p % N`` of epoch ``p // N``;
- with ``group_ids`` (aspect grouping) items go into one bucket per group and a bucket that
  holds a global batch is emitted, so a batch never mixes groups (and pads little); a bucket's
  leftovers carry over into the next epoch. Without groups the batches are simply positions
  ``[b * B, (b + 1) * B)``;
- each item is ``(index, seed)`` with ``seed = base_seed * 2**40 + p``: tasks whose
  augmentation is a function of the seed (classification, the localizer's R-CNN) see the same
  samples whatever the workers; ``DropSeed`` hands plain indices to datasets that do not;
- ``load_state_dict({"next_batch": b})`` makes the next iterator start at global batch b; whole
  epochs are skipped by arithmetic (each epoch holds every item once), not by replaying.

Evaluation uses ``InferenceSampler``: contiguous, ordered slices per rank, no padding, no
repeats (every evaluator gathers its ranks' results and does not depend on their order).
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
from torch.utils.data import Dataset, Sampler

from detres.config import ConfigError

SEED_STRIDE = 2**40   # item seeds of different base seeds never collide below 2**40 positions


def per_rank_batch(global_batch: int, world_size: int, key: str = "batch_size") -> int:
    """``global_batch / world_size``; a ConfigError naming the config ``key`` when the global
    batch is not a positive multiple of the number of processes."""
    if global_batch <= 0:
        raise ConfigError(f"{key}={global_batch} must be positive")
    if global_batch % world_size:
        raise ConfigError(f"{key}={global_batch} is not divisible by the {world_size} processes")
    return global_batch // world_size


class TrainingSampler(Sampler[list[tuple[int, int]]]):
    """This rank's slice of each global batch of the infinite training stream (see above).

    Args:
        size: dataset size N.
        global_batch: images per global batch B (over all ranks).
        group_ids: (N,) group of each item (0 landscape/square, 1 portrait); None: one group.
        shuffle: a fresh permutation each epoch; False: 0..N-1 every epoch.
        seed: the permutation of epoch e depends on (seed, e) only; also the items' base seed.
        rank, world_size: this rank yields items ``[rank * B/W, (rank + 1) * B/W)`` of a batch.
        key: the config key of ``global_batch``, named in the divisibility error.
    """

    def __init__(self, size: int, global_batch: int, *, group_ids: np.ndarray | None = None,
                 shuffle: bool = True, seed: int = 0, rank: int = 0, world_size: int = 1,
                 key: str = "global_batch") -> None:
        if size <= 0:
            raise ValueError("cannot sample from an empty dataset")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        self.per_rank = per_rank_batch(global_batch, world_size, key)
        self.size, self.batch_size, self.shuffle, self.seed = size, global_batch, shuffle, seed
        self.rank = rank
        self.group_ids = (np.zeros(size, np.int64) if group_ids is None
                          else np.asarray(group_ids, np.int64))
        if self.group_ids.shape != (size,) or self.group_ids.min() < 0:
            raise ValueError(f"need {size} non-negative group ids, got shape "
                             f"{self.group_ids.shape}")
        self.group_sizes = np.bincount(self.group_ids).tolist()   # n_g, items per epoch
        self.next_batch = 0

    def state_dict(self) -> dict[str, int]:
        return {"next_batch": self.next_batch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """The next iterator starts at global batch ``state["next_batch"]`` (exact resume)."""
        self.next_batch = int(state["next_batch"])

    def epoch_order(self, epoch: int) -> np.ndarray:
        """(N,) the dataset indices of one epoch, in stream order."""
        if not self.shuffle:
            return np.arange(self.size)
        return np.random.default_rng([self.seed, epoch]).permutation(self.size)

    def _item_seed(self, epoch: int, k: int) -> int:
        return self.seed * SEED_STRIDE + epoch * self.size + k

    def batches_before(self, epoch: int) -> int:
        """Global batches completed by epochs 0..epoch-1: group g has then seen
        ``epoch * n_g`` items, so it has filled ``epoch * n_g // B`` batches."""
        return sum(epoch * n // self.batch_size for n in self.group_sizes)

    def _start_epoch(self, batch: int) -> int:
        """The epoch in which global batch ``batch`` is completed (largest e with
        ``batches_before(e) <= batch``; a doubling then a bisection)."""
        lo, hi = 0, 1
        while self.batches_before(hi) <= batch:
            lo, hi = hi, hi * 2
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if self.batches_before(mid) <= batch else (lo, mid)
        return lo

    def _carry(self, epoch: int) -> list[list[tuple[int, int]]]:
        """The buckets at the start of ``epoch``: group g holds its last
        ``epoch * n_g % B`` items of the earlier epochs, in stream order."""
        buckets = []
        for g, n in enumerate(self.group_sizes):
            need, items, e = epoch * n % self.batch_size, [], epoch
            while len(items) < need:
                e -= 1
                order = self.epoch_order(e)
                ks = np.flatnonzero(self.group_ids[order] == g)
                items = [(int(order[k]), self._item_seed(e, int(k))) for k in ks] + items
            buckets.append(items[len(items) - need:])
        return buckets

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        first = self.next_batch
        epoch = self._start_epoch(first)
        emitted, buckets = self.batches_before(epoch), self._carry(epoch)
        lo, hi = self.rank * self.per_rank, (self.rank + 1) * self.per_rank
        while True:
            order = self.epoch_order(epoch)
            for k, (i, g) in enumerate(zip(order.tolist(), self.group_ids[order].tolist())):
                bucket = buckets[g]
                bucket.append((i, self._item_seed(epoch, k)))
                if len(bucket) == self.batch_size:
                    if emitted >= first:
                        yield bucket[lo:hi]
                    emitted += 1
                    buckets[g] = []
            epoch += 1


class InferenceSampler(Sampler[int]):
    """Rank r of W gets a contiguous, ordered slice of 0..N-1; the slices cover every index
    once (sizes differ by at most one)."""

    def __init__(self, size: int, rank: int = 0, world_size: int = 1) -> None:
        per, extra = divmod(size, world_size)
        self.begin = rank * per + min(rank, extra)
        self.end = self.begin + per + (rank < extra)

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.begin, self.end))

    def __len__(self) -> int:
        return self.end - self.begin


class DropSeed(Dataset):
    """``(index, seed) -> dataset[index]``: a dataset whose randomness does not come from the
    stream seed (detection transforms draw from their worker's generator) read through a
    ``TrainingSampler``."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: tuple[int, int]) -> Any:
        return self.dataset[item[0]]
