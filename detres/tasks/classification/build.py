"""Classification: config -> classifier, datasets and loaders (the only place where a
classification config becomes objects)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from detres.config import ConfigError
from detres.data.builtin_cls import ensure_builtin_cls
from detres.data.classification import (BUILTIN_HINT, Cifar10, ClassificationDataset,
                                        ImageFolder, build_cls_transform, collate,
                                        datasets_root)
from detres.data.loader import make_loader
from detres.data.samplers import InferenceSampler, TrainingSampler
from detres.engine.distributed import DistInfo
from detres.models.classifier import Classifier
from detres.tasks.common import CLASSIFICATION_TASK, BackboneConfig, build_backbone
from detres.tasks.classification.config import (ClassificationConfig, ClsDataConfig,
                                                ClsDatasetConfig)

TASK = CLASSIFICATION_TASK


def build_classifier(cfg: ClassificationConfig, num_classes: int,
                     pixel_mean: np.ndarray | None = None) -> Classifier:
    """ResNet + fc for ``num_classes``; ``pixel_mean`` (3, H, W) overrides data.pixel_mean."""
    net = build_backbone(cfg.model.backbone, num_classes)
    mean = torch.from_numpy(pixel_mean) if pixel_mean is not None else cfg.data.pixel_mean
    return Classifier(net, mean, cfg.data.pixel_std)


def describe_classifier(model: Classifier, cfg: BackboneConfig) -> str:
    """The ``arch`` string stored in checkpoints (shown when one does not fit)."""
    return (f"Classifier(ResNet({model.net.extra_repr()}, width={cfg.width}, norm={cfg.norm!r}),"
            f" num_classes={model.num_classes})")


def build_cls_dataset(cfg: ClsDatasetConfig, data: ClsDataConfig, train: bool,
                      pad_fill: tuple[int, int, int] = (0, 0, 0)) -> ClassificationDataset:
    """One split; ``train`` picks the augmentation, ``cfg.split`` the files."""
    if data.ten_crop and data.test_scales:
        raise ConfigError("data.ten_crop and data.test_scales are two test forms; set one "
                          "(ten_crop: 10 crops at test_size; test_scales: whole images)")
    if any(s <= 0 for s in data.test_scales):
        raise ConfigError(f"data.test_scales must be positive shorter sides, got "
                          f"{list(data.test_scales)}")
    transform = build_cls_transform(data.recipe, train, data.crop_size, data.scale_range,
                                    data.test_size, data.ten_crop and not train, pad_fill,
                                    data.test_scales)
    if cfg.type == "cifar10":
        root = Path(cfg.root) if cfg.root else datasets_root() / "cifar-10-batches-py"
        return Cifar10(root, cfg.split, transform)
    if cfg.type == "builtin":
        root = ensure_builtin_cls(cfg.root)
        return ImageFolder(root / cfg.split, transform, skip_bad_images=data.skip_bad_images)
    root = Path(cfg.root) if cfg.root else datasets_root() / "imagenet"
    hint = (f"ImageNet is expected as {root}/{{train,val}}/<wnid>/*.JPEG (ILSVRC2012 from "
            f"https://image-net.org, val sorted into class folders); set DETRES_DATASETS or "
            f"data.{'train' if train else 'val'}.root. Without it, run {BUILTIN_HINT}")
    return ImageFolder(root / cfg.split, transform, skip_bad_images=data.skip_bad_images,
                       hint=hint)


def build_cls_datasets(cfg: ClsDataConfig
                       ) -> tuple[ClassificationDataset, ClassificationDataset, np.ndarray | None]:
    """(train set, val set, per-pixel mean image or None); the val set must have the train
    set's classes."""
    if cfg.per_pixel_mean and cfg.train.type != "cifar10":
        raise ConfigError("data.per_pixel_mean needs data.train.type=cifar10 (the paper's "
                          "CIFAR recipe); other sets use data.pixel_mean")
    # Padding takes the mean colour: about zero once the model subtracts its mean.
    fill = tuple(int(round(v)) for v in cfg.pixel_mean)
    train = build_cls_dataset(cfg.train, cfg, True, fill)
    val = build_cls_dataset(cfg.val, cfg, False, fill)
    if list(val.class_names) != list(train.class_names):
        raise ConfigError(f"data.val has classes {_short(val.class_names)} but data.train has "
                          f"{_short(train.class_names)}; both splits need the same class folders")
    return train, val, train.mean_image() if cfg.per_pixel_mean else None


def _short(names: list[str]) -> str:
    return f"{len(names)} ({', '.join(names[:5])}{', ...' if len(names) > 5 else ''})"


def build_cls_train_loader(cfg: ClassificationConfig, train: ClassificationDataset,
                           dist: DistInfo, device: torch.device, seed: int | None = None
                           ) -> tuple[torch.utils.data.DataLoader, TrainingSampler]:
    """(loader, its resumable sampler): endless per-rank slices of the global batches of
    ``solver.ims_per_batch`` (items ``(index, seed)``: the augmentation follows the seed)."""
    sampler = TrainingSampler(len(train), cfg.solver.ims_per_batch,
                              seed=cfg.train.seed if seed is None else seed, rank=dist.rank,
                              world_size=dist.world_size, key="solver.ims_per_batch")
    loader = make_loader(train, batch_sampler=sampler, collate_fn=collate,
                         num_workers=cfg.train.num_workers, pin_memory=device.type == "cuda",
                         seed=sampler.seed, rank=dist.rank)
    return loader, sampler


def build_cls_test_loader(cfg: ClassificationConfig, val: ClassificationDataset,
                          dist: DistInfo, device: torch.device) -> torch.utils.data.DataLoader:
    """Each test image on exactly one rank, in order."""
    return make_loader(val, sampler=InferenceSampler(len(val), dist.rank, dist.world_size),
                       collate_fn=collate, rank=dist.rank,
                       batch_size=max(cfg.data.test_ims_per_batch // dist.world_size, 1),
                       num_workers=cfg.train.num_workers, pin_memory=device.type == "cuda")
