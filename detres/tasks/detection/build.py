"""Detection: config -> detector, datasets and loaders.

The only place where a detection config becomes objects (the tools and ``run.py`` call these;
a trained checkpoint becomes a detector through ``load.py::load_detector``).
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from detres.config import ConfigError
from detres.data.builtin import ensure_builtin_shapes, shapes_split
from detres.data.classification import DatasetNotFoundError, datasets_root
from detres.data.coco import COCODetection
from detres.data.coco_splits import MergedCOCODetection, coco_split_files, image_ids_of
from detres.data.ilsvrc_det import ILSVRCDetection
from detres.data.detection_dataset import DetectionDataset
from detres.data.loader import build_detection_loader
from detres.data.transforms import inference_transform, train_transform
from detres.data.voc import VOC_CLASSES, VOCDetection
from detres.engine.checkpoint import CheckpointError, load_checkpoint_weights, read_checkpoint
from detres.engine.distributed import DistInfo
from detres.models.anchors import AnchorGenerator
from detres.models.faster_rcnn import FasterRCNN
from detres.models.roi_head import C4RoIHead
from detres.models.rpn import RPN, RPNHead
from detres.models.test_time import TestTimeDetector
from detres.tasks.common import build_backbone
from detres.tasks.detection.config import (DetDataConfig, DetDatasetConfig, DetectionConfig,
                                           DetModelConfig)

TASK = "detection"
# the class-specific layers, re-initialised when weights come from another class set
CLASS_LAYER_PREFIXES = ("roi_head.cls_score.", "roi_head.bbox_pred.")


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
              boundary_threshold=r.boundary_threshold, min_box_size=r.min_size)
    h = cfg.roi_head
    roi_head = C4RoIHead(head, num_classes, head.out_channels, roi_op=h.roi_op,
                         pooled_size=h.pooled_size, sampling_ratio=h.sampling_ratio,
                         aligned=h.aligned, feature_stride=trunk.stride,
                         batch_size_per_image=h.batch_size_per_image,
                         positive_fraction=h.positive_fraction,
                         fg_iou_threshold=h.fg_iou_threshold, box_loss=h.box_loss,
                         score_threshold=h.score_threshold, nms_threshold=h.nms_threshold,
                         detections_per_image=h.detections_per_image,
                         global_context=h.global_context)
    model = FasterRCNN(trunk, rpn, roi_head, cfg.pixel_mean, cfg.pixel_std,
                       channels_last=cfg.channels_last)
    if cfg.weights:     # fine-tuning a detection checkpoint (e.g. COCO -> VOC, Sec. 4.3)
        ckpt = read_checkpoint(cfg.weights)
        check_structure(cfg, ckpt, cfg.weights)
        load_checkpoint_weights(model, cfg.weights, TASK, ckpt=ckpt,
                                class_layers=CLASS_LAYER_PREFIXES,
                                reinit_class_layers=cfg.reinit_class_layers)
    return model


# model keys that change the function or the head's input width, with their value in
# checkpoints written before the key existed
STRUCTURE_KEYS = {("roi_head", "global_context"): False, ("backbone", "stride_in_1x1"): False,
                  ("backbone", "residual"): True, ("backbone", "shortcut"): "B",
                  ("backbone", "stem"): "imagenet", ("roi_head", "roi_op"): None,
                  ("roi_head", "pooled_size"): None}


def check_structure(cfg: DetModelConfig, ckpt: dict[str, Any], path: str | Path) -> None:
    """Raises CheckpointError naming the ``model.*`` key when the checkpoint's stored config
    was trained with another structure than ``cfg``: global context changes the sibling layers'
    input width (that would otherwise read as another class count), stride placement and RoI
    pooling change the function without changing a shape."""
    stored = (ckpt.get("config") or {}).get("model") or {}
    for (section, key), default in STRUCTURE_KEYS.items():
        theirs = (stored.get(section) or {}).get(key, default)
        ours = getattr(getattr(cfg, section), key)
        if theirs is not None and theirs != ours:
            raise CheckpointError(
                f"{path} was trained with model.{section}.{key}={theirs!r} but the config says "
                f"{ours!r}; set model.{section}.{key}: {theirs!r} (or use the checkpoint's own "
                f"config)")


def build_test_detector(cfg: DetectionConfig, models: Sequence[FasterRCNN]) -> nn.Module:
    """The model evaluation and the Predictor run: the detector itself, or, with any of
    Appendix B's test-time switches (``test.*``) or several models, a TestTimeDetector."""
    t = cfg.test
    if len(models) == 1 and not (t.box_refinement or t.scales or t.flip):
        return models[0]
    return TestTimeDetector(models, box_refinement=t.box_refinement, voting_iou=t.voting_iou,
                            scales=t.scales, base_size=cfg.data.min_size_test,
                            max_size=cfg.data.max_size_test, scale_target=t.scale_target,
                            flip=t.flip)


def _require_file(path: Path, key: str, what: str, how: str) -> Path:
    if not path.exists():
        raise DatasetNotFoundError(
            f"{key}: {what} not found at {path}. {how} Set DETRES_DATASETS or {key} to where it "
            f"is, or run the built-in demo without it: {DET_BUILTIN_HINT}")
    return path


def build_det_dataset(cfg: DetDatasetConfig, data: DetDataConfig, train: bool,
                      key: str, test_scales: Sequence[int] = ()) -> DetectionDataset:
    """One split of ``data.train`` / ``data.val`` (``key`` names it in errors); a test split
    with ``test_scales`` (``test.scales``) comes as decoded, shrunk to the pyramid's top level
    when larger (``data.transforms.inference_transform``). With
    ``data.skip_bad_images`` an unreadable test image never stands in for another (its
    detections would count twice): it comes as ``SkippedImageTargets`` under its own id."""
    dataset = _build_split(cfg, data, train, key, test_scales)
    dataset.substitute_bad_images = train
    return dataset


def _build_split(cfg: DetDatasetConfig, data: DetDataConfig, train: bool,
                 key: str, test_scales: Sequence[int]) -> DetectionDataset:
    if train:
        transform = train_transform(data.min_size_train, data.max_size_train,
                                    flip_prob=data.flip_prob, color_jitter=data.color_jitter)
    else:
        transform = inference_transform(data.min_size_test, data.max_size_test, test_scales)
    common = dict(transform=transform, filter_empty=train and data.filter_empty,
                  skip_bad_images=data.skip_bad_images, bad_annotations=cfg.bad_annotations)
    if cfg.type != "imagenet_det":  # ILSVRC's file names come from its own split files
        common["allow_outside_paths"] = cfg.allow_outside_paths
    if cfg.class_names is not None and cfg.type not in ("voc", "imagenet_det"):
        raise ConfigError(f"{key}.class_names is for VOC-style sets; a {cfg.type} set takes its "
                          "class names from the annotation file's 'categories'")
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
        return _coco_dataset(cfg, train, key, common)
    if cfg.type == "imagenet_det":
        root = _require_file(Path(cfg.root) if cfg.root else datasets_root() / "ILSVRC",
                             f"{key}.root", "the ILSVRC folder", "ImageNet (ILSVRC DET) comes "
                             "from https://image-net.org (Data/DET, Annotations/DET, "
                             "ImageSets/DET).")
        return ILSVRCDetection(root, cfg.splits, class_names=cfg.class_names, **common)
    root = Path(cfg.root) if cfg.root else datasets_root() / "VOCdevkit"
    sources = []
    for item in cfg.splits:
        year, sep, split = item.partition("/")
        if not sep:
            raise ConfigError(f"{key}.splits: {item!r} is not YEAR/SPLIT (e.g. 2007/trainval)")
        folder = _require_file(root / f"VOC{year}", f"{key}.root", f"VOC{year}",
                               "PASCAL VOC comes from http://host.robots.ox.ac.uk/pascal/VOC/.")
        sources.append((folder, split))
    return VOCDetection(sources, keep_difficult=train and data.keep_difficult,
                        class_names=cfg.class_names or VOC_CLASSES,
                        image_extensions=cfg.image_extensions, **common)


def _coco_dataset(cfg: DetDatasetConfig, train: bool, key: str,
                  common: dict[str, Any]) -> DetectionDataset:
    """``splits`` by name (``coco_splits.COCO_SPLITS``) under $DETRES_DATASETS/coco, or one
    set of one's own (``annotations`` + ``images``); several training splits are merged and
    ``holdout``'s images left out."""
    coco = datasets_root() / "coco"
    how = "COCO comes from https://cocodataset.org (images and annotations)."
    if len(cfg.splits) != 1 and (not train or cfg.annotations or cfg.images):
        raise ConfigError(f"{key}.splits: {list(cfg.splits)}: several splits are merged for "
                          f"training only, and not with {key}.annotations/images")
    if cfg.holdout and not train:
        raise ConfigError(f"{key}.holdout is for training sets (evaluate on the held-out "
                          f"split itself)")
    parts = []
    for split in cfg.splits:
        try:
            annotations, images = coco_split_files(coco, split)
        except ValueError as e:
            raise ConfigError(f"{key}.splits: {e}") from None
        annotations = _require_file(Path(cfg.annotations) if cfg.annotations else annotations,
                                    f"{key}.annotations", "the annotation file", how)
        images = _require_file(Path(cfg.images) if cfg.images else images, f"{key}.images",
                               "the image folder", how)
        parts.append(COCODetection(annotations, images, **common))
    if not cfg.holdout:
        return parts[0] if len(parts) == 1 else MergedCOCODetection(parts)
    held_out = Path(cfg.holdout)
    if held_out.suffix != ".json":
        try:
            held_out = coco_split_files(coco, cfg.holdout)[0]
        except ValueError as e:
            raise ConfigError(f"{key}.holdout: {e}") from None
    held_out = _require_file(held_out, f"{key}.holdout", "the held-out annotation file", how)
    return MergedCOCODetection(parts, image_ids_of(held_out))


def build_det_train_loader(cfg: DetectionConfig, dataset: DetectionDataset, dist: DistInfo,
                           device: torch.device) -> DataLoader:
    """Endless, aspect-grouped global batches of ``solver.ims_per_batch``, each rank loading its
    slice; the loader's ``batch_sampler`` is the resumable ``TrainingSampler``."""
    return build_detection_loader(dataset, cfg.solver.ims_per_batch, training=True,
                                  shuffle=True, aspect_grouping=cfg.data.aspect_grouping,
                                  num_workers=cfg.train.num_workers,
                                  pin_memory=device.type == "cuda", seed=cfg.train.seed,
                                  rank=dist.rank, world_size=dist.world_size,
                                  batch_key="solver.ims_per_batch")


def build_det_test_loader(cfg: DetectionConfig, dataset: DetectionDataset, dist: DistInfo,
                          device: torch.device) -> DataLoader:
    """Each test image on exactly one rank, in order (``test.ims_per_batch`` per rank)."""
    return build_detection_loader(dataset, cfg.test.ims_per_batch, training=False,
                                  num_workers=cfg.train.num_workers,
                                  pin_memory=device.type == "cuda", rank=dist.rank,
                                  world_size=dist.world_size, persistent_workers=False)


def describe_detector(cfg: DetModelConfig, num_classes: int) -> str:
    """The ``arch`` string stored in checkpoints (shown when one does not fit)."""
    b = cfg.backbone
    return (f"FasterRCNN-C4(ResNet-{b.depth}, width={b.width}, norm={b.norm!r}, "
            f"roi_op={cfg.roi_head.roi_op!r}, pooled_size={cfg.roi_head.pooled_size}, "
            f"anchors={list(cfg.anchors.sizes)}x{list(cfg.anchors.aspect_ratios)}, "
            f"num_classes={num_classes})")
