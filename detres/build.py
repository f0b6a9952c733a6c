"""The only config -> object code (DESIGN.md section 1): backbones, classifier, detector,
localizer, optimizer, LR schedule, datasets and loaders. Each function takes the part of the
config it needs.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from detres.config import (BackboneConfig, ClassificationConfig, ClsDataConfig,
                           ClsDatasetConfig, ConfigError, DetDataConfig, DetDatasetConfig,
                           DetectionConfig, DetModelConfig, LocalizationConfig, LocDataConfig,
                           LocDatasetConfig, SolverConfig, from_dict)
from detres.config import replace as replace_config
from detres.data.builtin import ensure_builtin_shapes, shapes_split
from detres.data.builtin_cls import ensure_builtin_cls
from detres.data.builtin_loc import ensure_builtin_loc
from detres.data.classification import (BUILTIN_HINT, Cifar10, ClassificationDataset,
                                        DatasetNotFoundError, ImageFolder, InfiniteBatchSampler,
                                        ShardSampler, build_cls_transform, datasets_root,
                                        make_loader)
from detres.data.coco import COCODetection
from detres.data.io import DetectionDataset
from detres.data.localization import LocalizationDataset, LocTrainTransform
from detres.data.loader import build_detection_loader
from detres.data.transforms import eval_transform, train_transform
from detres.data.voc import VOCDetection
from detres.engine.checkpoint import (CheckpointError, check_task, load_checkpoint,
                                      load_model_state)
from detres.engine.distributed import DistInfo
from detres.engine.schedule import WarmupMultiStepSchedule, scale_lr
from detres.evaluation.localize import LocTestSettings
from detres.models.anchors import AnchorGenerator
from detres.models.classifier import Classifier
from detres.models.faster_rcnn import FasterRCNN
from detres.models.localizer import Localizer, PerClassRPN, PerClassRPNHead, RCNNRefiner
from detres.models.resnet import ResNet, load_weights
from detres.models.roi_head import C4RoIHead
from detres.models.rpn import RPN, RPNHead

NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)
# the class-specific layers, re-initialised when weights come from another class set
CLASS_LAYER_PREFIXES = ("roi_head.cls_score.", "roi_head.bbox_pred.")


# ----------------------------------------------------------------------------- models
def build_backbone(cfg: BackboneConfig, num_classes: int | None = None) -> ResNet:
    """A ResNet from ``model.backbone``; with ``num_classes`` it has avgpool + fc.

    ``cfg.weights`` is loaded with ``fc`` ignored (a backbone file or an ImageNet classifier
    initialises any head size).
    """
    net = ResNet(cfg.depth, stem=cfg.stem, num_classes=num_classes, residual=cfg.residual,
                 shortcut=cfg.shortcut, stride_in_1x1=cfg.stride_in_1x1, width=cfg.width,
                 norm=cfg.norm, gn_groups=cfg.gn_groups, freeze_at=cfg.freeze_at,
                 zero_init_residual=cfg.zero_init_residual)
    if cfg.weights:
        load_weights(net, cfg.weights, ignore_prefixes=("fc.",))
    return net


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


# ----------------------------------------------------------------------------- solver
def build_optimizer(cfg: SolverConfig, model: nn.Module) -> torch.optim.Optimizer:
    """SGD with momentum (Sec 3.4) or AdamW over the trainable parameters.

    The LR is ``base_lr``, times ``ims_per_batch / reference_batch`` when ``reference_batch``
    is set. With ``no_decay_norm_bias`` norm weights and all biases get no weight decay.
    """
    lr = scale_lr(cfg.base_lr, cfg.ims_per_batch, cfg.reference_batch)
    decay, no_decay = [], []
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            exempt = cfg.no_decay_norm_bias and (isinstance(module, NORM_TYPES) or name == "bias")
            (no_decay if exempt else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum)
    return torch.optim.AdamW(groups, lr=lr, betas=cfg.betas)


def build_lr_schedule(cfg: SolverConfig) -> WarmupMultiStepSchedule:
    return WarmupMultiStepSchedule(steps=tuple(cfg.steps), gamma=cfg.gamma,
                                   warmup_iters=cfg.warmup_iters,
                                   warmup_factor=cfg.warmup_factor,
                                   warmup_method=cfg.warmup_method)


# ----------------------------------------------------------------------------- data
def build_cls_dataset(cfg: ClsDatasetConfig, data: ClsDataConfig, train: bool,
                      pad_fill: tuple[int, int, int] = (0, 0, 0)) -> ClassificationDataset:
    """One split; ``train`` picks the augmentation, ``cfg.split`` the files."""
    transform = build_cls_transform(data.recipe, train, data.crop_size, data.scale_range,
                                    data.test_size, data.ten_crop and not train, pad_fill)
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
                           ) -> tuple[torch.utils.data.DataLoader, InfiniteBatchSampler]:
    """(loader, its resumable sampler): endless per-rank batches of the global batch."""
    sampler = InfiniteBatchSampler(len(train), cfg.solver.ims_per_batch,
                                   seed=cfg.train.seed if seed is None else seed,
                                   rank=dist.rank, world_size=dist.world_size)
    loader = make_loader(train, batch_sampler=sampler, num_workers=cfg.train.num_workers,
                         pin_memory=device.type == "cuda")
    return loader, sampler


def build_cls_test_loader(cfg: ClassificationConfig, val: ClassificationDataset,
                          dist: DistInfo, device: torch.device) -> torch.utils.data.DataLoader:
    """Each test image on exactly one rank, in order."""
    return make_loader(val, sampler=ShardSampler(len(val), dist.rank, dist.world_size),
                       batch_size=max(cfg.data.test_ims_per_batch // dist.world_size, 1),
                       num_workers=cfg.train.num_workers, pin_memory=device.type == "cuda")


# ----------------------------------------------------------------------------- detection
def scale_schedule(cfg: DetectionConfig) -> DetectionConfig:
    """Adapts a schedule written for ``solver.reference_batch`` images to ``ims_per_batch``.

    The paper states its detection schedules for a fixed batch (e.g. 8 images: 240k + 80k
    iterations on COCO). With k = ims_per_batch / reference_batch, iterations (max_iter, steps,
    warmup, checkpoint and eval periods) are divided by k, so the run sees as many images, and
    ``build_optimizer`` multiplies the LR by k. Identity when reference_batch is unset or equal.
    """
    ref, ims = cfg.solver.reference_batch, cfg.solver.ims_per_batch
    if not ref or ref == ims:
        return cfg
    def scaled(n: int) -> int:
        return max(int(round(n * ref / ims)), 1) if n else 0
    solver = dataclasses.replace(cfg.solver, steps=tuple(scaled(s) for s in cfg.solver.steps),
                                 warmup_iters=scaled(cfg.solver.warmup_iters))
    train = dataclasses.replace(cfg.train, max_iter=scaled(cfg.train.max_iter),
                                checkpoint_period=scaled(cfg.train.checkpoint_period),
                                eval_period=scaled(cfg.train.eval_period))
    return dataclasses.replace(cfg, solver=solver, train=train)


DET_BUILTIN_HINT = ("python tools/train_det.py configs/frcnn_r18_shapes.yaml "
                    "(built-in data, no download)")


def build_detector(cfg: DetModelConfig, num_classes: int) -> FasterRCNN:
    """Faster R-CNN C4 (Appendix A) on ``model.backbone``, whose weights load first (a
    torchvision ImageNet file or a pretraining backbone file); ``model.weights`` (a detres
    detection checkpoint) then loads over the whole detector."""
    resnet = build_backbone(cfg.backbone, num_classes=None)
    trunk, head = resnet.c4_split()
    anchors = AnchorGenerator(cfg.anchors.sizes, cfg.anchors.aspect_ratios, stride=trunk.stride)
    r = cfg.rpn
    rpn = RPN(RPNHead(trunk.out_channels, anchors.num_anchors, r.conv_channels), anchors,
              pre_nms_topk_train=r.pre_nms_topk_train, pre_nms_topk_test=r.pre_nms_topk_test,
              post_nms_topk_train=r.proposals_train, post_nms_topk_test=r.proposals_test,
              nms_threshold=r.nms_threshold, iou_thresholds=r.iou_thresholds,
              batch_size_per_image=r.batch_size_per_image,
              positive_fraction=r.positive_fraction, box_loss=r.box_loss,
              smooth_l1_beta=1.0 / 9 if r.box_loss == "smooth_l1" else 0.0)
    h = cfg.roi_head
    roi_head = C4RoIHead(head, num_classes, head.out_channels, roi_op=h.roi_op,
                         pooled_size=h.pooled_size, sampling_ratio=h.sampling_ratio,
                         aligned=h.aligned, feature_stride=trunk.stride,
                         batch_size_per_image=h.batch_size_per_image,
                         positive_fraction=h.positive_fraction,
                         fg_iou_threshold=h.fg_iou_threshold, box_loss=h.box_loss,
                         smooth_l1_beta=1.0 if h.box_loss == "smooth_l1" else 0.0,
                         score_threshold=h.score_threshold, nms_threshold=h.nms_threshold,
                         detections_per_image=h.detections_per_image)
    model = FasterRCNN(trunk, rpn, roi_head, cfg.pixel_mean, cfg.pixel_std,
                       channels_last=cfg.channels_last)
    if cfg.weights:
        load_detector_weights(model, cfg.weights, cfg.reinit_class_layers)
    return model


def load_detector_weights(model: FasterRCNN, path: str, reinit_class_layers: bool = False) -> None:
    """Loads a detection checkpoint; another class count is an error unless
    ``reinit_class_layers`` (then the class-specific layers keep their fresh init)."""
    ckpt = load_checkpoint(path)
    check_task(ckpt, path, "detection")
    state = ckpt["model"]
    class_keys = [k for k in state if k.startswith(CLASS_LAYER_PREFIXES)]
    own = model.state_dict()
    if any(state[k].shape != own[k].shape for k in class_keys if k in own):
        names = ckpt.get("class_names")
        found = len(names) if names is not None else "another number of"
        if not reinit_class_layers:
            raise CheckpointError(
                f"{path} detects {found} classes but this model has {model.num_classes}; set "
                f"model.reinit_class_layers=true to start its class layers afresh")
        state = {k: v for k, v in state.items() if k not in class_keys}
        missing = set(own) - set(state)
        model.load_state_dict({**{k: own[k] for k in missing}, **state})
        return
    load_model_state(model, ckpt, path)


def _require_file(path: Path, key: str, what: str, how: str) -> Path:
    if not path.exists():
        raise DatasetNotFoundError(
            f"{key}: {what} not found at {path}. {how} Set DETRES_DATASETS or {key} to where it "
            f"is, or run the built-in demo without it: {DET_BUILTIN_HINT}")
    return path


def build_det_dataset(cfg: DetDatasetConfig, data: DetDataConfig, train: bool,
                      key: str) -> DetectionDataset:
    """One split of ``data.train`` / ``data.val`` (``key`` names it in errors)."""
    if train:
        transform = train_transform(data.min_size_train, data.max_size_train,
                                    flip_prob=data.flip_prob, color_jitter=data.color_jitter)
    else:
        transform = eval_transform(data.min_size_test, data.max_size_test)
    common = dict(transform=transform, filter_empty=train and data.filter_empty,
                  skip_bad_images=data.skip_bad_images)
    if cfg.type == "builtin":
        b = data.builtin
        folder = ensure_builtin_shapes(cfg.root, num_train=b.num_train, num_val=b.num_val,
                                       image_size=b.image_size, seed=b.seed,
                                       min_object_size=b.min_object_size)
        if len(cfg.splits) != 1 or cfg.splits[0] not in ("train", "val"):
            raise ConfigError(f"{key}.splits must be [train] or [val] for the built-in set, "
                              f"got {list(cfg.splits)}")
        annotations, images = shapes_split(folder, cfg.splits[0])
        return COCODetection(annotations, images, **common)
    if cfg.type == "coco":
        split = "train2017" if train else "val2017"
        coco = datasets_root() / "coco"
        how = "COCO 2017 comes from https://cocodataset.org (images and annotations)."
        annotations = _require_file(
            Path(cfg.annotations) if cfg.annotations else
            coco / "annotations" / f"instances_{split}.json", f"{key}.annotations",
            "the annotation file", how)
        images = _require_file(Path(cfg.images) if cfg.images else coco / split,
                               f"{key}.images", "the image folder", how)
        return COCODetection(annotations, images, **common)
    root = Path(cfg.root) if cfg.root else datasets_root() / "VOCdevkit"
    sources = []
    for item in cfg.splits:
        year, sep, split = item.partition("/")
        if not sep:
            raise ConfigError(f"{key}.splits: {item!r} is not YEAR/SPLIT (e.g. 2007/trainval)")
        folder = _require_file(root / f"VOC{year}", f"{key}.root", f"VOC{year}",
                               "PASCAL VOC comes from http://host.robots.ox.ac.uk/pascal/VOC/.")
        sources.append((folder, split))
    return VOCDetection(sources, keep_difficult=train and data.keep_difficult, **common)


def build_det_train_loader(cfg: DetectionConfig, dataset: DetectionDataset, dist: DistInfo,
                           device: torch.device) -> DataLoader:
    """Endless, aspect-grouped per-rank batches of ``solver.ims_per_batch / world_size``."""
    per_rank = _per_rank_batch(cfg.solver.ims_per_batch, dist)
    return build_detection_loader(dataset, per_rank, infinite=True, shuffle=True,
                                  aspect_grouping=cfg.data.aspect_grouping,
                                  num_workers=cfg.train.num_workers,
                                  pin_memory=device.type == "cuda", seed=cfg.train.seed,
                                  rank=dist.rank, world_size=dist.world_size)


def build_det_test_loader(cfg: DetectionConfig, dataset: DetectionDataset, dist: DistInfo,
                          device: torch.device) -> DataLoader:
    """Each test image on exactly one rank, in order."""
    return build_detection_loader(dataset, cfg.test.ims_per_batch, infinite=False,
                                  shuffle=False, num_workers=cfg.train.num_workers,
                                  pin_memory=device.type == "cuda", rank=dist.rank,
                                  world_size=dist.world_size, persistent_workers=False)


def _per_rank_batch(global_batch: int, dist: DistInfo) -> int:
    if global_batch % dist.world_size:
        raise ConfigError(f"solver.ims_per_batch={global_batch} is not divisible by the "
                          f"{dist.world_size} processes")
    return global_batch // dist.world_size


def describe_detector(cfg: DetModelConfig, num_classes: int) -> str:
    """The ``arch`` string stored in checkpoints (shown when one does not fit)."""
    b = cfg.backbone
    return (f"FasterRCNN-C4(ResNet-{b.depth}, width={b.width}, norm={b.norm!r}, "
            f"roi_op={cfg.roi_head.roi_op!r}, pooled_size={cfg.roi_head.pooled_size}, "
            f"anchors={list(cfg.anchors.sizes)}x{list(cfg.anchors.aspect_ratios)}, "
            f"num_classes={num_classes})")


def detector_for_checkpoint(cfg: DetModelConfig, path: str | Path
                            ) -> tuple[FasterRCNN, dict[str, Any]]:
    """The detector described by ``cfg`` with the weights of checkpoint ``path`` (its class
    count taken from the checkpoint); returns (model, the checkpoint's metadata)."""
    ckpt = load_checkpoint(path)
    check_task(ckpt, path, "detection")
    names = ckpt.get("class_names")
    if not names:
        raise CheckpointError(f"{path} does not record its class_names; it was not written by "
                              f"tools/train_det.py")
    plain = dataclasses.replace(cfg, weights=None,
                                backbone=dataclasses.replace(cfg.backbone, weights=None))
    model = build_detector(plain, len(names))
    load_model_state(model, ckpt, path)
    meta = {k: v for k, v in ckpt.items() if k in ("class_names", "category_ids", "config")}
    return model.eval(), meta


def detector_from_checkpoint(path: str | Path, overrides: Sequence[str] = ()
                             ) -> tuple[FasterRCNN, DetectionConfig, dict[str, Any]]:
    """The detector of a training checkpoint, rebuilt from the config stored in it."""
    ckpt = load_checkpoint(path)
    if "config" not in ckpt:
        raise CheckpointError(f"{path} does not record its config; pass CONFIG explicitly")
    cfg = from_dict(ckpt["config"], DetectionConfig, source=f"{path} (stored config)")
    cfg = replace_config(cfg, list(overrides))
    model, meta = detector_for_checkpoint(cfg.model, path)
    return model, cfg, meta


# ----------------------------------------------------------------------------- localization
LOC_BUILTIN_HINT = ("python tools/train_loc.py configs/loc_r18_builtin.yaml "
                    "(built-in data, no download)")


def build_loc_dataset(cfg: LocDatasetConfig, data: LocDataConfig, *, key: str,
                      class_names: Sequence[str] | None = None) -> LocalizationDataset:
    """One split with its original images (the test pipeline resizes them per scale); give
    training views their crops with ``dataset.with_transform(build_loc_train_transform(...))``.
    """
    if cfg.type == "builtin":
        b = data.builtin
        root = ensure_builtin_loc(cfg.root, num_train_per_class=b.num_train_per_class,
                                  num_val_per_class=b.num_val_per_class,
                                  image_size=b.image_size, seed=b.seed)
    else:
        root = Path(cfg.root) if cfg.root else datasets_root() / "imagenet"
    image_root = root / cfg.split
    box_root = Path(cfg.boxes) if cfg.boxes else root / "bbox" / cfg.split
    for path, what in ((image_root, "image folder"), (box_root, "bounding-box XML folder")):
        if not path.is_dir():
            raise DatasetNotFoundError(
                f"{key}: the {what} {path} does not exist. ImageNet localization is expected as "
                f"<root>/{{train,val}}/<wnid>/*.JPEG with the ILSVRC2012 box XMLs in "
                f"<root>/bbox/{{train,val}}/ (https://image-net.org); set DETRES_DATASETS, "
                f"{key}.root or {key}.boxes. Without it, run {LOC_BUILTIN_HINT}")
    return LocalizationDataset(image_root, box_root, class_names=class_names,
                               missing_boxes=cfg.missing_boxes,
                               skip_bad_images=data.skip_bad_images,
                               skip_unannotated_classes=data.skip_unannotated_classes)


def build_loc_classifier(cfg: LocalizationConfig, num_classes: int) -> Classifier:
    """The classification network; ``classifier.weights`` is torchvision://NAME or a weights
    file with ``fc`` (loaded whole), or a tools/pretrain_cls.py checkpoint."""
    c = cfg.classifier
    net = build_backbone(dataclasses.replace(c.backbone, weights=None), num_classes)
    model = Classifier(net, cfg.pixel_mean, cfg.pixel_std)
    if c.weights:
        ckpt = None if c.weights.startswith("torchvision://") else load_checkpoint(c.weights)
        if ckpt is not None and ckpt.get("task") == "classification":
            load_model_state(model, ckpt, c.weights)
        else:
            load_weights(net, c.weights)
    return model


def build_per_class_rpn(cfg: LocalizationConfig, num_classes: int) -> PerClassRPN:
    r = cfg.rpn
    trunk, _ = build_backbone(r.backbone).c4_split()
    anchors = AnchorGenerator(r.anchors.sizes, r.anchors.aspect_ratios, stride=trunk.stride)
    head = PerClassRPNHead(trunk.out_channels, anchors.num_anchors, num_classes, r.conv_channels)
    return PerClassRPN(trunk, head, anchors, cfg.pixel_mean, cfg.pixel_std,
                       iou_thresholds=r.iou_thresholds, anchors_per_image=r.anchors_per_image,
                       positive_fraction=r.positive_fraction, box_loss=r.box_loss,
                       smooth_l1_beta=1.0 / 9 if r.box_loss == "smooth_l1" else 0.0)


def build_rcnn_refiner(cfg: LocalizationConfig, num_classes: int) -> RCNNRefiner | None:
    r = cfg.rcnn
    if not r.enabled:
        return None
    return RCNNRefiner(build_backbone(r.backbone), num_classes, r.input_size, cfg.pixel_mean,
                       cfg.pixel_std, fg_iou_threshold=r.fg_iou_threshold, box_loss=r.box_loss,
                       smooth_l1_beta=1.0 if r.box_loss == "smooth_l1" else 0.0)


def build_localizer(cfg: LocalizationConfig, num_classes: int) -> Localizer:
    """Classifier, per-class RPN and (when ``rcnn.enabled``) the R-CNN refiner."""
    return Localizer(build_loc_classifier(cfg, num_classes), build_per_class_rpn(cfg, num_classes),
                     build_rcnn_refiner(cfg, num_classes))


def copy_classifier_weights(classifier: Classifier, target: nn.Module, what: str) -> None:
    """Starts ``target`` (a trunk or a ResNet without fc) from the classification network's
    weights, as the paper fine-tunes its classification net (Appendix C); the shapes must
    agree (same depth and width)."""
    source = classifier.net.state_dict()
    own = target.state_dict()
    wrong = [k for k in own if k not in source or source[k].shape != own[k].shape]
    if wrong:
        raise ConfigError(f"{what}.init_from_classifier: {what}.backbone does not match "
                          f"classifier.backbone ({len(wrong)} parameters differ, e.g. "
                          f"{wrong[0]}); give both the same depth, width and norm")
    target.load_state_dict({k: source[k] for k in own})


def build_loc_train_transform(data: LocDataConfig, scale_range: tuple[int, int] | None = None,
                              crop_size: int | None = None) -> LocTrainTransform:
    """Random crops and flips of ``data`` (or of the given scale range and crop size)."""
    return LocTrainTransform(scale_range or data.scale_range, crop_size or data.crop_size,
                             data.flip_prob)


def loc_test_settings(cfg: LocalizationConfig) -> LocTestSettings:
    t = cfg.test
    return LocTestSettings(scales=tuple(t.scales), max_size=t.max_size,
                           topk_classes=t.topk_classes,
                           proposals_per_class=cfg.rcnn.proposals_per_class,
                           pre_nms_topk=t.pre_nms_topk, nms_threshold=t.nms_threshold,
                           cls_test_size=cfg.classifier.test_size,
                           cls_crop=(cfg.classifier.crop_size or cfg.data.crop_size)
                           if cfg.classifier.test_crop else None)


def localizer_from_checkpoint(path: str | Path, overrides: Sequence[str] = ()
                              ) -> tuple[Localizer, LocalizationConfig, dict[str, Any]]:
    """The localizer of a tools/train_loc.py ``model_final.pth``, rebuilt from its stored
    config (``overrides`` may change test settings)."""
    ckpt = load_checkpoint(path)
    check_task(ckpt, path, "localization")
    if "config" not in ckpt or not ckpt.get("class_names"):
        raise CheckpointError(f"{path} does not record its config and class_names; it was not "
                              f"written by tools/train_loc.py")
    cfg = replace_config(from_dict(ckpt["config"], LocalizationConfig,
                                   source=f"{path} (stored config)"), list(overrides))
    plain = dataclasses.replace(
        cfg, classifier=dataclasses.replace(cfg.classifier, weights=None,
                                            backbone=_no_weights(cfg.classifier.backbone)),
        rpn=dataclasses.replace(cfg.rpn, backbone=_no_weights(cfg.rpn.backbone)),
        rcnn=dataclasses.replace(cfg.rcnn, backbone=_no_weights(cfg.rcnn.backbone)))
    model = build_localizer(plain, len(ckpt["class_names"]))
    load_model_state(model, ckpt, path)
    return model.eval(), cfg, {"class_names": list(ckpt["class_names"])}


def _no_weights(b: BackboneConfig) -> BackboneConfig:
    return dataclasses.replace(b, weights=None)
