"""Localization: config -> the three networks of Appendix C, datasets, test settings, and
checkpoint -> localizer (the only place where a localization config becomes objects)."""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from detres.config import ConfigError, from_dict
from detres.config import replace as replace_config
from detres.data.builtin_loc import ensure_builtin_loc
from detres.data.classification import DatasetNotFoundError, datasets_root
from detres.data.loc_transforms import LocTrainTransform
from detres.data.localization import LocalizationDataset, loc_split_dirs
from detres.engine.checkpoint import (CheckpointError, check_task, load_checkpoint_weights,
                                      read_checkpoint)
from detres.engine.precision import cuda_amp_dtype
from detres.models.anchors import AnchorGenerator
from detres.models.classifier import Classifier
from detres.models.loc_inference import LocalizerEnsemble, LocTestSettings
from detres.models.localizer import Localizer, PerClassRPN, PerClassRPNHead, RCNNRefiner
from detres.tasks.common import CLASSIFICATION_TASK, BackboneConfig, build_backbone
from detres.tasks.localization.config import LocalizationConfig, LocDataConfig, LocDatasetConfig
from detres.weights_io import load_backbone_weights

TASK = "localization"
LOC_BUILTIN_HINT = ("python tools/train_loc.py configs/loc_r18_builtin.yaml "
                    "(built-in data, no download)")


def index_cache_dir(data: LocDataConfig, output_dir: str | Path) -> Path | None:
    """Where the splits' indexes are kept (``data.index_cache``): beside the run's folder."""
    if not data.index_cache:
        return None
    if data.index_cache == "auto":
        return Path(output_dir).resolve().parent / "loc_index_cache"
    return Path(data.index_cache)


def build_loc_dataset(cfg: LocDatasetConfig, data: LocDataConfig, *, key: str,
                      class_names: Sequence[str] | None = None,
                      cache_dir: str | Path | None = None) -> LocalizationDataset:
    """One split with its original images (the test pipeline resizes them per scale); give
    training views their crops with ``dataset.with_transform(build_loc_train_transform(...))``.
    ``cache_dir`` keeps its parsed index (``index_cache_dir``).
    """
    if cfg.type == "builtin":
        b = data.builtin
        root = ensure_builtin_loc(cfg.root, num_train_per_class=b.num_train_per_class,
                                  num_val_per_class=b.num_val_per_class,
                                  image_size=b.image_size, seed=b.seed)
    else:
        root = Path(cfg.root) if cfg.root else datasets_root() / "imagenet"
    image_root, box_root = loc_split_dirs(root, cfg.split)
    box_root = Path(cfg.boxes) if cfg.boxes else box_root
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
                               skip_unannotated_classes=data.skip_unannotated_classes,
                               bad_annotations=data.bad_annotations, cache_dir=cache_dir)


def build_loc_classifier(cfg: LocalizationConfig, num_classes: int) -> Classifier:
    """The classification network; ``classifier.weights`` is torchvision://NAME or a weights
    file with ``fc`` (loaded whole), or a tools/pretrain_cls.py checkpoint."""
    c = cfg.classifier
    net = build_backbone(dataclasses.replace(c.backbone, weights=None), num_classes)
    model = Classifier(net, cfg.pixel_mean, cfg.pixel_std)
    if c.weights:
        ckpt = None if c.weights.startswith("torchvision://") else read_checkpoint(c.weights)
        if ckpt is not None and ckpt.get("task") == CLASSIFICATION_TASK:
            load_checkpoint_weights(model, c.weights, CLASSIFICATION_TASK, ckpt=ckpt)
        else:
            load_backbone_weights(net, c.weights, obj=ckpt)
    return model


def build_per_class_rpn(cfg: LocalizationConfig, num_classes: int) -> PerClassRPN:
    r = cfg.rpn
    trunk, _ = build_backbone(r.backbone).c4_split()
    anchors = AnchorGenerator(r.anchors.sizes, r.anchors.aspect_ratios, stride=trunk.stride)
    head = PerClassRPNHead(trunk.out_channels, anchors.num_anchors, num_classes, r.conv_channels)
    return PerClassRPN(trunk, head, anchors, cfg.pixel_mean, cfg.pixel_std,
                       iou_thresholds=r.iou_thresholds, anchors_per_image=r.anchors_per_image,
                       positive_fraction=r.positive_fraction, box_loss=r.box_loss)


def build_rcnn_refiner(cfg: LocalizationConfig, num_classes: int) -> RCNNRefiner | None:
    r = cfg.rcnn
    if not r.enabled:
        return None
    if not 0 <= 2 * r.context_padding < r.input_size:
        raise ConfigError(f"rcnn.context_padding must be in [0, rcnn.input_size / 2) = "
                          f"[0, {r.input_size / 2:g}), got {r.context_padding}")
    return RCNNRefiner(build_backbone(r.backbone), num_classes, r.input_size, cfg.pixel_mean,
                       cfg.pixel_std, fg_iou_threshold=r.fg_iou_threshold, box_loss=r.box_loss,
                       smooth_l1_beta=1.0 if r.box_loss == "smooth_l1" else 0.0,
                       context_padding=r.context_padding)


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
    """The test pipeline of ``cfg``; on CUDA it runs under ``train.amp``'s autocast, as
    detection's evaluation does."""
    t = cfg.test
    if not t.scales:
        raise ConfigError("test.scales is empty; give at least one shorter side")
    if t.cls_mode == "multiscale" and (not t.cls_scales or min(t.cls_scales) <= 0):
        raise ConfigError(f"test.cls_mode=multiscale needs positive test.cls_scales, got "
                          f"{list(t.cls_scales)}")
    crop = cfg.classifier.crop_size or cfg.data.crop_size
    return LocTestSettings(scales=tuple(t.scales), max_size=t.max_size,
                           topk_classes=t.topk_classes,
                           proposals_per_class=cfg.rcnn.proposals_per_class,
                           pre_nms_topk=t.pre_nms_topk, nms_threshold=t.nms_threshold,
                           cls_test_size=cfg.classifier.test_size,
                           cls_crop=crop if cfg.classifier.test_crop or t.cls_mode == "ten_crop"
                           else None,
                           cls_mode=t.cls_mode, cls_scales=tuple(t.cls_scales),
                           rpn_mode=t.rpn_mode, rpn_crop=t.rpn_crop or cfg.data.crop_size,
                           rcnn_chunk=t.rcnn_chunk, cuda_amp=cuda_amp_dtype(cfg.train.amp))


def localizer_from_checkpoint(path: str | Path, overrides: Sequence[str] = ()
                              ) -> tuple[Localizer, LocalizationConfig, dict[str, Any]]:
    """The localizer of a tools/train_loc.py ``model_final.pth``, rebuilt from its stored
    config (``overrides`` may change test settings)."""
    ckpt = read_checkpoint(path)
    check_task(ckpt, path, TASK)
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
    load_checkpoint_weights(model, path, TASK, ckpt=ckpt)
    return model.eval(), cfg, {"class_names": list(ckpt["class_names"])}


def load_localizers(weights: str | Sequence[str], overrides: Sequence[str] = ()
                    ) -> tuple[Localizer | LocalizerEnsemble, LocalizationConfig, dict[str, Any]]:
    """One checkpoint's localizer, or several as one ``LocalizerEnsemble`` (Appendix C); the
    config returned is the first checkpoint's (with ``overrides``), whose test settings the
    ensemble uses. Every checkpoint must have the same class names."""
    paths = [weights] if isinstance(weights, (str, Path)) else list(weights)
    if not paths:
        raise ConfigError("no localizer checkpoint given")
    models, first_cfg, first_meta = [], None, None
    for path in paths:
        model, cfg, meta = localizer_from_checkpoint(path, overrides)
        if first_meta is None:
            first_cfg, first_meta = cfg, meta
        elif meta["class_names"] != first_meta["class_names"]:
            raise CheckpointError(f"{path}: its {len(meta['class_names'])} classes differ "
                                  f"from those of {paths[0]} ({len(first_meta['class_names'])}"
                                  f"); an ensemble's members must share their class list")
        models.append(model)
    model = models[0] if len(models) == 1 else LocalizerEnsemble(models).eval()
    return model, first_cfg, first_meta


def _no_weights(b: BackboneConfig) -> BackboneConfig:
    return dataclasses.replace(b, weights=None)
