"""The one sampler module (data/samplers.py): the training stream against independent
reference implementations of the two samplers it replaced (so the detection and localization
demo figures do not move), rank-independence, resume, and the inference shards."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from detres.config import ConfigError
from detres.data.samplers import InferenceSampler, TrainingSampler, per_rank_batch

N = 37
GROUPS = np.random.default_rng(0).integers(0, 2, N)


def _take(sampler, n: int) -> list:
    return list(itertools.islice(iter(sampler), n))


def _indices(batches: list) -> list[list[int]]:
    return [[i for i, _ in b] for b in batches]


def old_detection_batches(n: int, batch: int, groups: np.ndarray | None, seed: int,
                          shuffle: bool = True) -> list[list[int]]:
    """Reference: the former detection ``TrainingBatchSampler`` (infinite, one rank): each
    epoch's permutation fills per-group buckets; a full bucket is a batch."""
    groups = np.zeros(n, np.int64) if groups is None else groups
    buckets: list[list[int]] = [[] for _ in range(int(groups.max()) + 1)]
    out, epoch = [], 0
    while True:
        order = (np.random.default_rng([seed, epoch]).permutation(n) if shuffle
                 else np.arange(n))
        for i in order.tolist():
            buckets[groups[i]].append(i)
            if len(buckets[groups[i]]) == batch:
                out.append(buckets[groups[i]])
                buckets[groups[i]] = []
                if len(out) == 200:
                    return out
        epoch += 1


def old_classification_batch(n: int, batch: int, seed: int, b: int, rank: int = 0,
                             world: int = 1) -> list[tuple[int, int]]:
    """Reference: the former ``InfiniteBatchSampler``'s global batch b for one rank: positions
    p of the batch, item ``perm_{p // n}[p % n]``, seed ``seed * 2**40 + p``."""
    per = batch // world
    start = b * batch + rank * per
    return [(int(np.random.default_rng([seed, p // n]).permutation(n)[p % n]), seed * 2**40 + p)
            for p in range(start, start + per)]


@pytest.mark.parametrize("batch,seed", [(4, 5), (3, 1), (16, 0), (50, 2)])
def test_one_rank_equals_the_former_detection_sampler(batch, seed):
    new = _indices(_take(TrainingSampler(N, batch, group_ids=GROUPS, seed=seed), 200))
    assert new == old_detection_batches(N, batch, GROUPS, seed)


def test_unshuffled_grouped_stream_equals_the_former_detection_sampler():
    new = _indices(_take(TrainingSampler(N, 4, group_ids=GROUPS, shuffle=False), 200))
    assert new == old_detection_batches(N, 4, GROUPS, 0, shuffle=False)


@pytest.mark.parametrize("n,batch,world", [(10, 4, 1), (10, 4, 2), (37, 6, 3), (5, 8, 4)])
def test_ungrouped_stream_equals_the_former_classification_sampler(n, batch, world):
    for rank in range(world):
        got = _take(TrainingSampler(n, batch, seed=3, rank=rank, world_size=world), 12)
        assert got == [old_classification_batch(n, batch, 3, b, rank, world) for b in range(12)]


def test_grouped_batches_never_mix_groups_and_carry_seeds_of_stream_positions():
    batches = _take(TrainingSampler(N, 4, group_ids=GROUPS, seed=5), 40)
    assert all(len(set(GROUPS[[i for i, _ in b]])) == 1 for b in batches)
    first = [i for b in batches[:8] for i, _ in b]
    assert len(set(first)) == len(first)               # no repeats within the first epoch
    for b in batches:                                  # the seed names the stream position
        for i, s in b:
            p = s - 5 * 2**40
            assert np.random.default_rng([5, p // N]).permutation(N)[p % N] == i
    assert _indices(_take(TrainingSampler(N, 4, group_ids=GROUPS, seed=6), 40)) != \
        _indices(batches)


@pytest.mark.parametrize("world", [2, 3, 4])
def test_stream_does_not_depend_on_the_number_of_processes(world):
    single = _take(TrainingSampler(N, 12, group_ids=GROUPS, seed=1), 30)
    ranks = [_take(TrainingSampler(N, 12, group_ids=GROUPS, seed=1, rank=r, world_size=world),
                   30) for r in range(world)]
    assert [sum(parts, []) for parts in zip(*ranks)] == single


@pytest.mark.parametrize("start", [0, 1, 9, 10, 23, 57, 150])
def test_resume_starts_at_the_same_global_batch(start):
    full = _take(TrainingSampler(N, 6, group_ids=GROUPS, seed=1, rank=1, world_size=2), 200)
    resumed = TrainingSampler(N, 6, group_ids=GROUPS, seed=1, rank=1, world_size=2)
    resumed.load_state_dict({"next_batch": start})
    assert resumed.state_dict() == {"next_batch": start}
    assert _take(resumed, 200 - start) == full[start:]


def test_resume_with_a_rare_group_rebuilds_buckets_spanning_epochs():
    groups = np.zeros(N, np.int64)
    groups[[3, 20]] = 1                                 # 2 portrait images, batches of 5
    full = _take(TrainingSampler(N, 5, group_ids=groups, seed=4), 120)
    for start in (7, 40, 97):
        s = TrainingSampler(N, 5, group_ids=groups, seed=4)
        s.load_state_dict({"next_batch": start})
        assert _take(s, 120 - start) == full[start:]


def test_per_rank_batch_names_the_config_key():
    assert per_rank_batch(8, 4, "solver.ims_per_batch") == 2
    with pytest.raises(ConfigError, match=r"rpn\.solver\.ims_per_batch=6 is not divisible by "
                                          r"the 4 processes"):
        per_rank_batch(6, 4, "rpn.solver.ims_per_batch")
    with pytest.raises(ConfigError, match="solver.ims_per_batch=5"):
        TrainingSampler(10, 5, world_size=2, key="solver.ims_per_batch")


def test_inference_sampler_gives_contiguous_ordered_shards():
    assert [list(InferenceSampler(10, r, 3)) for r in range(3)] == [[0, 1, 2, 3], [4, 5, 6],
                                                                    [7, 8, 9]]
    assert [len(InferenceSampler(2, r, 4)) for r in range(4)] == [1, 1, 0, 0]
