"""torchrun / DistributedDataParallel helpers.

``torchrun --nproc_per_node=K tools/pretrain_cls.py ...`` sets RANK, WORLD_SIZE and LOCAL_RANK;
:func:`init_distributed` then joins the process group (NCCL on GPUs, gloo on CPUs). Without
those variables everything runs in one process and the collectives below are no-ops.
Only rank 0 writes files; metrics are averaged (or summed) across ranks before logging.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from detres.config import ConfigError


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(device: str, local_rank: int = 0) -> torch.device:
    """"auto" -> the local GPU when CUDA is available, else the CPU; "cuda" requires CUDA."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("train.device = cuda: CUDA is not available on this machine; use "
                              "train.device=cpu (or auto)")
        return torch.device("cuda", local_rank)
    if device != "cpu":
        raise ConfigError(f"unknown device {device!r}; valid: auto, cpu, cuda")
    return torch.device("cpu")


def init_distributed(device: torch.device | None = None) -> DistInfo:
    """Joins the process group that torchrun's environment describes (or stays single)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device is not None and device.type == "cuda" else "gloo"
        device_id = None
        if backend == "nccl":
            # all_gather_object and barrier put NCCL tensors on torch.cuda.current_device();
            # device_id binds the group to this rank's GPU as well.
            torch.cuda.set_device(local_rank)
            device_id = torch.device("cuda", local_rank)
        dist.init_process_group(backend=backend, device_id=device_id)
    return DistInfo(rank, world_size, local_rank) if world_size > 1 else get_dist_info()


def get_dist_info() -> DistInfo:
    if not (dist.is_available() and dist.is_initialized()):
        return DistInfo()
    return DistInfo(dist.get_rank(), dist.get_world_size(),
                    int(os.environ.get("LOCAL_RANK", dist.get_rank())))


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def wrap_model(model: nn.Module, device: torch.device) -> nn.Module:
    """DistributedDataParallel around ``model`` when running under torchrun, else ``model``."""
    if not is_distributed():
        return model
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def backend_device(backend: str) -> torch.device:
    """The device whose tensors ``backend``'s collectives take: NCCL rejects CPU tensors and
    works on the GPU that :func:`init_distributed` made current; gloo works on CPU tensors."""
    return torch.device("cuda") if backend == "nccl" else torch.device("cpu")


def _to(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A copy of ``tensor`` on ``device``; the one place collectives move tensors (tests
    replace it to see the devices a backend would get without owning a GPU)."""
    return tensor.to(device, copy=True)


def all_reduce_tensor(values: torch.Tensor, average: bool = True) -> torch.Tensor:
    """Sums (or averages) ``values`` over ranks; the identity in a single process.

    ``values`` may live on any device: the reduction runs on the backend's device
    (:func:`backend_device`) and the result comes back on ``values``' device.
    """
    if not is_distributed():
        return values
    buffer = _to(values, backend_device(dist.get_backend()))
    dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
    if average:
        buffer = buffer / dist.get_world_size()
    return _to(buffer, values.device)


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` in a single process.

    torch pickles ``obj`` into a tensor on the backend's device itself (for NCCL the current
    CUDA device, which :func:`init_distributed` sets), so no move is needed here.
    """
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def gather_objects(obj: Any, dst: int = 0) -> list[Any] | None:
    """Every rank's ``obj`` (picklable), in rank order, on rank ``dst``; None on the others
    (which so hold only their own); ``[obj]`` in a single process. Device as for
    :func:`all_gather_objects`."""
    if not is_distributed():
        return [obj]
    out: list[Any] | None = [None] * dist.get_world_size() if dist.get_rank() == dst else None
    dist.gather_object(obj, out, dst=dst)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` (picklable) on every rank; ``obj`` itself in a single process.
    As for :func:`all_gather_objects`, torch puts the pickled bytes on the backend's device."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
