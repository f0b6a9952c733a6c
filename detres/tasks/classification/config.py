"""The classification (pretraining) schema: ``model``, ``data``, ``solver``, ``train``,
``precise_bn`` (He et al. 2015, Sec 3.4 ImageNet, Sec 4.2 CIFAR-10)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from detres.config_checks import AT_LEAST_0, AT_LEAST_1, PIXEL, POSITIVE, Range, checked
from detres.models.pixels import IMAGENET_PIXEL_MEAN, IMAGENET_PIXEL_STD
from detres.tasks.common import BackboneConfig, SolverConfig, TrainConfig


@dataclass(frozen=True, kw_only=True)
class ClsDatasetConfig:
    type: Literal["builtin", "imagefolder", "cifar10"] = "builtin"
    root: str | None = None                            # null: the default location for the type
    split: str = "train"                                # train | val (imagefolder sub-folder, cifar10 batch)


@dataclass(frozen=True, kw_only=True)
class ClsDataConfig:
    train: ClsDatasetConfig = field(default_factory=ClsDatasetConfig)
    val: ClsDatasetConfig = field(default_factory=lambda: ClsDatasetConfig(split="val"))
    # imagenet: scale aug [256, 480], 224 crop, flip, colour (Sec. 3.4); cifar: pad 4, crop 32, flip
    # (Sec. 4.2); builtin: small images, crop and flip
    recipe: Literal["imagenet", "cifar", "builtin"] = "builtin"
    crop_size: int = checked(224, AT_LEAST_1)
    # shorter side, imagenet recipe (Sec. 3.4)
    scale_range: tuple[int, int] = checked((256, 480), Range(1, ascending=True))
    test_size: int = checked(256, AT_LEAST_1)            # shorter side before the centre crop
    ten_crop: bool = False                               # the paper's 10-crop testing (Sec. 3.4)
    # fully-convolutional multi-scale testing (Sec. 3.4): the whole image at each shorter side,
    # softmax averaged; the paper's best results use [224, 256, 384, 480, 640]; empty: off
    test_scales: tuple[int, ...] = checked((), AT_LEAST_1)
    skip_bad_images: bool = False                        # skip undecodable files and count them
    # RGB (0..255) mean subtracted and std divided by the model; torchvision's values, so a
    # backbone pretrained here expects the same input as torchvision's weights
    pixel_mean: tuple[float, float, float] = checked(IMAGENET_PIXEL_MEAN, PIXEL)
    pixel_std: tuple[float, float, float] = checked(IMAGENET_PIXEL_STD, POSITIVE)
    # subtract the training set's per-pixel mean image instead of pixel_mean (Sec. 4.2, cifar10)
    per_pixel_mean: bool = False
    test_ims_per_batch: int = checked(100, AT_LEAST_1)   # global test batch


@dataclass(frozen=True, kw_only=True)
class PreciseBNConfig:
    # recompute BN statistics over this many training batches after training (0: off);
    # the paper computes them on the training set before freezing BN for detection (Appendix A)
    num_batches: int = checked(0, AT_LEAST_0)


@dataclass(frozen=True, kw_only=True)
class ClsModelConfig:
    backbone: BackboneConfig = field(default_factory=BackboneConfig)


@dataclass(frozen=True, kw_only=True)
class ClassificationConfig:
    model: ClsModelConfig = field(default_factory=ClsModelConfig)
    data: ClsDataConfig = field(default_factory=ClsDataConfig)
    solver: SolverConfig = field(default_factory=SolverConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    precise_bn: PreciseBNConfig = field(default_factory=PreciseBNConfig)
