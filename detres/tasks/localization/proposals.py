"""The R-CNN's training samples (He et al. 2015, Appendix C): the per-class RPN's top
proposals for the ground-truth classes of each training image, made once after the RPN stage.

Each rank makes the proposals of its own contiguous slice of the training images (the test
loader's ``InferenceSampler``) and writes them beside the index ``rcnn/proposals.pth``:

- ``proposals.rank{r}.npy``: (P_r, 5) float32 rows ``x1, y1, x2, y2, class`` (original
  pixels) of the images of slice r, image after image in index order (numpy, no pickle);
- ``proposals.pth``, written last by the main rank: ``{"bounds": [0, b_1, ..., N]}`` (slice r
  holds images ``bounds[r]`` to ``bounds[r + 1] - 1``) and ``"counts"``, (N,) int64 proposals
  per image. It marks the stage finished: a resumed run reuses the files, with any number of
  processes.

The R-CNN's dataset reads an image's rows through a memory map (:class:`ProposalStore`), so no
process holds the proposals of the images it is not training on: ImageNet's ~544k images x
200 proposals are ~2 GB, once on disk instead of once in every process. Every rank reads every
slice's file (its batches are drawn from all images), so the run folder must be visible to all
of them, as for resuming from checkpoints.
"""
from __future__ import annotations

import bisect
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from detres.data.loc_transforms import scaled_batch
from detres.data.samplers import InferenceSampler
from detres.engine import distributed as du
from detres.engine.checkpoint import CheckpointError, atomic_save
from detres.evaluation.inference import run_inference
from detres.models.loc_inference import (LocTestSettings, dense_proposals, flat_proposals,
                                         inference_autocast)
from detres.models.localizer import PerClassRPN
from detres.weights_io import read_torch_file

Proposals = dict[int, tuple[Tensor, Tensor]]
ROW = 5    # x1, y1, x2, y2, class


def shard_path(index_path: Path, shard: int) -> Path:
    """The rows of slice ``shard``, beside the index (``proposals.rank{shard}.npy``)."""
    return index_path.with_name(f"{index_path.stem}.rank{shard}.npy")


def slice_bounds(num_images: int, world_size: int) -> list[int]:
    """``[0, b_1, ..., num_images]``: rank r's slice of the test loader is ``b_r:b_{r+1}``."""
    return [InferenceSampler(num_images, r, world_size).begin
            for r in range(world_size)] + [num_images]


def training_proposals(rpn: PerClassRPN, loader: Iterable[list[Any]], dataset: Any,
                       settings: LocTestSettings, device: torch.device) -> Proposals:
    """{index: (boxes (P, 4) original pixels, classes (P,))} of the images that ``loader``
    yields (lists of untransformed samples: this rank's slice); nothing is gathered."""
    def step(samples: list[Any]) -> list[tuple[int, tuple[Tensor, Tensor]]]:
        images = [s.image for s in samples]
        classes = [torch.as_tensor(np.unique(dataset.get_annotations(s.index)["labels"]),
                                   dtype=torch.int64) for s in samples]
        scales = [scaled_batch(images, s, settings.max_size) for s in settings.scales]
        with inference_autocast(settings, device):
            props = dense_proposals(rpn, scales, classes, settings, device)
        return [(s.index, flat_proposals(p, c)) for s, p, c in zip(samples, props, classes)]

    return dict(run_inference(rpn, loader, step, desc="proposals"))


def write_shard(path: Path, proposals: Proposals, begin: int, end: int) -> np.ndarray:
    """Writes the rows of images ``begin..end-1`` (atomically); returns their (end - begin,)
    proposal counts. An image without proposals (e.g. skipped as unreadable) has none."""
    counts = np.zeros(end - begin, np.int64)
    rows = [np.zeros((0, ROW), np.float32)]
    for k in range(end - begin):
        boxes, classes = proposals.get(begin + k, (torch.zeros(0, 4), torch.zeros(0)))
        counts[k] = len(boxes)
        rows.append(torch.cat([boxes.float().reshape(-1, 4), classes.float()[:, None]], 1)
                    .numpy())
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.save(f, np.concatenate(rows), allow_pickle=False)
    os.replace(tmp, path)
    return counts


def cached_training_proposals(path: Path, resume: bool, rpn: PerClassRPN,
                              loader: Iterable[list[Any]], dataset: Any,
                              settings: LocTestSettings, device: torch.device
                              ) -> ProposalStore:
    """The store of every training image's proposals: with ``resume`` the finished files at
    ``path`` (the index) and beside it, else made by each rank for its slice (the images
    ``loader`` yields) and written there."""
    num_images, num_classes = len(dataset), len(dataset.class_names)
    if resume and path.is_file():
        return ProposalStore.load(path, num_images, num_classes)
    dist = du.get_dist_info()
    if dist.is_main:   # an old index must not mark the new files finished
        path.unlink(missing_ok=True)
    bounds = slice_bounds(num_images, dist.world_size)
    mine = training_proposals(rpn, loader, dataset, settings, device)
    counts = write_shard(shard_path(path, dist.rank), mine, bounds[dist.rank],
                         bounds[dist.rank + 1])
    del mine
    # collective: once it returns, every rank's file is written
    counts = np.concatenate(du.all_gather_objects(counts))
    if dist.is_main:
        atomic_save({"bounds": bounds, "counts": torch.from_numpy(counts)}, path)
    return ProposalStore(path, bounds, counts, num_classes)


class ProposalStore(Mapping[int, tuple[Tensor, Tensor]]):
    """``{index: (boxes (P, 4) original pixels, classes (P,) int64)}`` of the training images
    (what ``data.loc_batches.RCNNSamples`` reads), each read from its slice's file on access.

    The files are memory-mapped on first use in each process (a spawned loader worker maps
    its own; ``load`` maps them all to check them), so the memory held is the (N + 1,) row
    offsets, not the rows. ``maps`` holds the files mapped so far. Rows are checked as they
    are read: a file that another program changed stops the run naming the file and the image.
    """

    def __init__(self, index_path: Path, bounds: Sequence[int], counts: np.ndarray,
                 num_classes: int) -> None:
        self.index_path, self.bounds = Path(index_path), list(bounds)
        self.num_classes = num_classes
        self.offsets = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])
        self.maps: dict[int, np.ndarray] = {}

    @classmethod
    def load(cls, path: Path, num_images: int, num_classes: int) -> ProposalStore:
        """The store of a finished stage's index ``path`` for ``num_images`` images."""
        stored = read_torch_file(path, "proposals index", CheckpointError)
        bounds = stored.get("bounds") if isinstance(stored, dict) else None
        counts = stored.get("counts") if isinstance(stored, dict) else None
        if not (isinstance(bounds, list) and len(bounds) >= 2
                and all(type(b) is int for b in bounds)
                and bounds[0] == 0 and bounds[-1] == num_images
                and all(a <= b for a, b in zip(bounds, bounds[1:]))
                and isinstance(counts, Tensor) and counts.dtype == torch.int64
                and counts.shape == (num_images,) and bool((counts >= 0).all())):
            raise CheckpointError(f"{path} is not an index of proposals for the {num_images} "
                                  f"training images (another training set, or a file of an "
                                  f"earlier version); delete it to make the proposals again")
        store = cls(path, bounds, counts.numpy(), num_classes)
        for shard in range(len(bounds) - 1):   # a missing or cut file stops here, not mid-stage
            store.rows(shard)
        return store

    def __len__(self) -> int:
        return self.bounds[-1]

    def __iter__(self) -> Iterator[int]:
        return iter(range(len(self)))

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        if not 0 <= index < len(self):
            raise KeyError(index)
        shard = bisect.bisect_right(self.bounds, index) - 1
        first = self.offsets[self.bounds[shard]]
        rows = np.array(self.rows(shard)[self.offsets[index] - first:
                                         self.offsets[index + 1] - first])
        classes = rows[:, 4]
        if not (np.isfinite(rows).all() and (classes == np.floor(classes)).all()
                and ((classes >= 0) & (classes < self.num_classes)).all()):
            raise CheckpointError(f"{shard_path(self.index_path, shard)}: the proposals of "
                                  f"image {index} are not boxes of classes 0..."
                                  f"{self.num_classes - 1}; delete {self.index_path} to make "
                                  f"the proposals again")
        return torch.from_numpy(rows[:, :4].copy()), torch.from_numpy(classes.astype(np.int64))

    def rows(self, shard: int) -> np.ndarray:
        """The (P, 5) rows of slice ``shard``, memory-mapped (read-only)."""
        if shard not in self.maps:
            path = shard_path(self.index_path, shard)
            expected = (int(self.offsets[self.bounds[shard + 1]]
                            - self.offsets[self.bounds[shard]]), ROW)
            try:
                rows = np.load(path, mmap_mode="r", allow_pickle=False)
            except (OSError, ValueError) as e:
                raise CheckpointError(f"{path}: cannot read the stored proposals ({e}); delete "
                                      f"{self.index_path} to make them again") from None
            if rows.dtype != np.float32 or rows.shape != expected:
                raise CheckpointError(f"{path} holds {rows.dtype} rows of shape {rows.shape}, "
                                      f"its index {self.index_path.name} float32 {expected}; "
                                      f"delete {self.index_path} to make them again")
            self.maps[shard] = rows
        return self.maps[shard]

    def __getstate__(self) -> dict[str, Any]:
        # a spawned loader worker maps the files itself (pickling a map would copy the rows)
        return {**self.__dict__, "maps": {}}
