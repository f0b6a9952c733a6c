"""Peak memory of one detection training iteration, estimated before the first step, so that a
run that cannot fit is refused in a second instead of being killed for memory minutes later.

The estimate runs the detector's static part on the meta device (shapes only, no data, no
memory): the trunk (conv1..conv4_x) on the largest padded training batch, the RPN head on its
features, RoI pooling and the per-region head (conv5_x, sibling layers) on every sampled RoI.
What autograd saves for backward there (``saved_tensor_bytes``) is the bulk of the peak; the
rest is the batch, the parameters' gradients and the optimizer's state. The data-dependent
parts (anchor matching, proposal selection, RoI sampling) are small beside these and covered
by the calibrated factor below.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch import Tensor, nn

from detres.config import ConfigError
from detres.engine.distributed import DistInfo
from detres.engine.precision import training_amp_dtype
from detres.models.roi_head import pool_rois, roi_align_gather
from detres.structures import SIZE_DIVISIBILITY
from detres.tasks.detection.build import build_detector
from detres.tasks.detection.config import DetDataConfig, DetectionConfig

GiB = 2**30
# Peak over the bytes saved for backward: during backward the gradients of the activations
# in flight, and during forward the outputs not (yet) saved, sit beside the saved set; on CPUs
# also oneDNN's scratch buffers and the allocator's slack. Calibrated on whole CPU training
# steps (forward, backward, SGD; the growth of the peak resident set, gradients included),
# where (peak - gradients - momentum) / saved bytes was: 1.22-1.55 for docs/speed.md's
# ResNet-101 C4 with RoIPool ("How cost grows": 100-2000 RoIs at 600x1000, 400x667 to
# 1000x1667, batch 1-4; e.g. 300 RoIs, batch 1: 2290 MiB measured over 1575 MiB saved),
# 1.05-1.37 for ResNet-50 C4 with RoIAlign in float32 (320x512 with 64 RoIs, 2 x 480x800 with
# 128, 608x1024 with 512) and 0.92 in bf16 (2 x 512x853, 128 RoIs). With 1.4 the estimate is
# 0.9x-1.2x those peaks (1.4x the bf16 one), and ~1.1x a narrow ResNet-18 step's, which
# tests/test_memory_estimate.py holds to 0.6x-1.7x. CUDA uses the same count (bf16 activations
# under autocast), not yet measured on a GPU.
TRANSIENT = 1.4
# Refused above this share of the available memory: the rest is left to the data loader's
# workers and to what the estimate cannot see (matching against many ground-truth boxes).
USABLE = 0.9
CHECK_KEY = "train.memory_check"


@dataclasses.dataclass(frozen=True)
class IterationMemory:
    """Bytes of one training iteration in one process, and the case they are for."""
    activations: int      # saved for backward, times TRANSIENT
    batch: int            # the image batch and its normalized copy
    gradients: int        # one per trainable parameter
    optimizer: int        # momentum (SGD) or two moments (AdamW) per trainable parameter
    images: int           # per process
    height: int           # largest padded batch
    width: int
    rois: int             # sampled per image

    @property
    def total(self) -> int:
        return self.activations + self.batch + self.gradients + self.optimizer


def saved_tensor_bytes(run: Callable[[], object], exclude: Iterable[Tensor] = ()) -> int:
    """Bytes of the distinct storages that autograd saves for backward while ``run()`` builds
    its graph (views of one storage count once); storages of ``exclude`` (parameters,
    buffers: already resident) are not counted. Works on meta tensors."""
    excluded = {t.untyped_storage()._cdata for t in exclude}
    sizes: dict[int, int] = {}
    kept: list[Tensor] = []     # alive to the end, so that no storage address is reused

    def pack(t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        if storage._cdata not in excluded:
            sizes[storage._cdata] = storage.nbytes()
            kept.append(t)
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return sum(sizes.values())


def largest_batch_shape(data: DetDataConfig) -> tuple[int, int]:
    """(H, W) of the largest padded training batch: shorter side at its largest setting,
    longer side at the cap; square when landscape and portrait images share batches."""
    def pad(n: int) -> int:
        return math.ceil(n / SIZE_DIVISIBILITY) * SIZE_DIVISIBILITY
    long = pad(data.max_size_train)
    short = pad(min(max(data.min_size_train), data.max_size_train))
    return (short if data.aspect_grouping else long), long


def _meta_detector(cfg: DetectionConfig, num_classes: int, dtype: torch.dtype) -> nn.Module:
    model_cfg = dataclasses.replace(cfg.model, weights=None, backbone=dataclasses.replace(
        cfg.model.backbone, weights=None))
    # fork_rng: the run's random stream stays exactly as a resumed run reproduces it
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        model = build_detector(model_cfg, num_classes)
    return model.to(dtype).train()


def _training_graph(model: nn.Module, images: int, height: int, width: int, rois: int,
                    roi_grid: int, device: torch.device, dtype: torch.dtype) -> list[Tensor]:
    """The static part of a training forward on meta tensors: trunk, RPN head, RoI head."""
    layout = torch.channels_last if model.channels_last else torch.contiguous_format
    x = torch.empty(images, 3, height, width, device="meta", dtype=dtype)
    features = model.trunk(x.contiguous(memory_format=layout))          # (N, C, H/16, W/16)
    rpn_logits, rpn_deltas = model.rpn.head(features)
    head = model.roi_head
    boxes = torch.zeros(images * rois + (images if head.global_context else 0), 5, device="meta")
    if head.roi_op == "align" and device.type == "cpu":   # what pool_rois runs on a CPU
        pooled = roi_align_gather(features, boxes, head.pooled_size, head.spatial_scale,
                                  roi_grid, head.aligned)
    else:   # torchvision's ops, in float32 under autocast
        pooled = pool_rois(features.float(), boxes, head.roi_op, head.pooled_size,
                           head.spatial_scale, head.sampling_ratio, head.aligned
                           ).to(features.dtype)                          # (R, C, S, S)
    x = head.res5(pooled.contiguous(memory_format=layout)).mean(dim=(2, 3))
    if head.global_context:
        x = torch.cat((x[: images * rois], x[: images * rois]), dim=1)
    logits, deltas = head.box_predictor(x)
    return [rpn_logits, rpn_deltas, logits, deltas]


def estimate_iteration_memory(cfg: DetectionConfig, num_classes: int, images: int,
                              device: torch.device) -> IterationMemory:
    """One training iteration of ``images`` images per process on ``device``, at the largest
    training shape and ``model.roi_head.batch_size_per_image`` RoIs per image."""
    height, width = largest_batch_shape(cfg.data)
    rois = cfg.model.roi_head.batch_size_per_image
    dtype = training_amp_dtype(cfg.train.amp, device) or torch.float32
    model = _meta_detector(cfg, num_classes, dtype)
    # RoIAlign's CPU gather samples every RoI on the grid of the largest one (at most the
    # whole image) when the sampling ratio is adaptive
    stride = 1 / model.roi_head.spatial_scale
    grid = cfg.model.roi_head.sampling_ratio or max(1, math.ceil(
        cfg.data.max_size_train / stride / cfg.model.roi_head.pooled_size))
    resident = list(model.parameters()) + list(model.buffers())
    saved = saved_tensor_bytes(lambda: _training_graph(model, images, height, width, rois, grid,
                                                       device, dtype), exclude=resident)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad) * 4   # float32
    weights = sum(p.numel() for p in model.parameters())
    if dtype != torch.float32:      # autocast's low-precision weight copies, saved too
        saved += weights * dtype.itemsize
    moments = {"sgd": 1 if cfg.solver.momentum else 0, "adamw": 2}[cfg.solver.optimizer]
    return IterationMemory(activations=int(TRANSIENT * saved),
                           batch=2 * images * 3 * height * width * 4, gradients=trainable,
                           optimizer=moments * trainable, images=images, height=height,
                           width=width, rois=rois)


def _cgroup_room() -> int | None:
    """Bytes left under this process's memory cgroup and each cgroup above it (limit minus
    usage, reclaimable file cache not counted as usage); None where none sets a limit."""
    rooms = []
    for line in _read("/proc/self/cgroup").splitlines():
        _, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if not path.startswith("/"):
            continue
        if controllers == "":                     # v2
            root, files = Path("/sys/fs/cgroup"), ("memory.max", "memory.current",
                                                   "inactive_file")
        elif "memory" in controllers.split(","):  # v1
            root, files = Path("/sys/fs/cgroup/memory"), (
                "memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")
        else:
            continue
        folder = root / path.lstrip("/")
        for group in (folder, *folder.parents):
            limit, usage = _read(group / files[0]).strip(), _read(group / files[1]).strip()
            if limit.isdigit() and usage.isdigit() and int(limit) < 2**60:   # v1: no limit
                stat = dict(row.split()[:2] for row in _read(group / "memory.stat")
                            .splitlines() if len(row.split()) == 2)
                rooms.append(int(limit) - int(usage) + int(stat.get(files[2], 0)))
            if group == root:
                break
    return min(rooms) if rooms else None


def _read(path: str | Path) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def available_memory(device: torch.device) -> int:
    """Bytes a process may still allocate on ``device``: the GPU's free memory, or on a CPU
    MemAvailable (/proc/meminfo), less where a cgroup limit leaves less."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    fields = dict(line.split(":", 1) for line in _read("/proc/meminfo").splitlines()
                  if ":" in line)
    free = int(fields.get("MemAvailable", "0 kB").split()[0]) * 1024
    room = _cgroup_room()
    return free if room is None else min(free, room)


def check_iteration_memory(cfg: DetectionConfig, num_classes: int, dist: DistInfo,
                           device: torch.device, logger: logging.Logger
                           ) -> IterationMemory | None:
    """Raises ConfigError (one line: the estimate, the memory available, the keys to lower)
    when one training iteration of this process's share of ``solver.ims_per_batch`` would not
    fit in ``USABLE`` of the memory available; logs the estimate when it fits."""
    if not cfg.train.memory_check:
        return None
    images = math.ceil(cfg.solver.ims_per_batch / dist.world_size)
    est = estimate_iteration_memory(cfg, num_classes, images, device)
    # the processes of one machine share its memory; each GPU has its own
    local = int(os.environ.get("LOCAL_WORLD_SIZE", 1)) if device.type == "cpu" else 1
    need, available = est.total * local, available_memory(device)
    case = (f"{images} images of up to {est.height}x{est.width} per process, {est.rois} RoIs "
            f"each" + (f", {local} processes" if local > 1 else ""))
    if need <= USABLE * available:
        logger.info(f"one training iteration needs about {need / GiB:.1f} GiB ({case});"
                    f" {available / GiB:.1f} GiB available on {device.type}")
        return est
    per_image = (est.activations + est.batch) / images
    fit = int((USABLE * available / local - est.gradients - est.optimizer) // per_image)
    fits = (f" (at most {fit * dist.world_size} fit at these sizes)" if fit > 0
            else " (not one image fits at these sizes)")
    raise ConfigError(
        f"one training iteration needs about {need / GiB:.1f} GiB ({case}) but "
        f"{available / GiB:.1f} GiB is available on {device.type}, of which the run may use "
        f"{USABLE:.0%}; lower solver.ims_per_batch{fits}, data.min_size_train/max_size_train "
        f"or model.roi_head.batch_size_per_image ({CHECK_KEY}=false skips this check)")
