"""The localization schema (He et al. 2015, Appendix C): the three networks ``classifier``,
``rpn`` and ``rcnn`` (each with its own ``max_iter`` and ``solver``), ``data``, ``test``,
``train`` (a ``RunConfig``: the stages have their own iterations), ``pixel_mean``/``pixel_std``."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from detres.config_checks import (AT_LEAST_0, AT_LEAST_1, FRACTION, PIXEL, POSITIVE,
                                  SEED, Range, checked)
from detres.models.pixels import IMAGENET_PIXEL_MEAN, IMAGENET_PIXEL_STD
from detres.tasks.common import IOU_PAIR, AnchorConfig, BackboneConfig, RunConfig, SolverConfig

SIZE_RANGE = Range(1, ascending=True)              # [shorter side low, high]
SIZES = Range(1, non_empty=True)


def _stage_iterations(max_iter: int, stage: Any) -> str | None:
    """A network trained here (no classifier.weights; R-CNN enabled) needs iterations."""
    trained = not getattr(stage, "weights", None) and getattr(stage, "enabled", True)
    if max_iter >= (1 if trained else 0):
        return None
    return ("must be an integer >= 1 (this network is trained here)" if trained
            else "must be an integer >= 0")


@dataclass(frozen=True, kw_only=True)
class BuiltinLocConfig:
    # the built-in localization set (data/builtin_loc.py), generated once per distinct setting
    num_train_per_class: int = checked(120, AT_LEAST_1)
    num_val_per_class: int = checked(30, AT_LEAST_1)
    image_size: int = checked(96, Range(32))
    seed: int = checked(0, SEED)


@dataclass(frozen=True, kw_only=True)
class LocDatasetConfig:
    type: Literal["imagenet", "builtin"] = "builtin"
    # imagenet: the folder holding train/, val/ and bbox/ (null: <datasets>/imagenet);
    # builtin: the cache folder (null: $DETRES_CACHE or ~/.cache/detres)
    root: str | None = None
    split: str = "train"
    boxes: str | None = None             # imagenet: the XML folder (null: <root>/bbox/<split>)
    # ImageNet train has boxes for about 40% of its images: skip uses those and counts the rest
    missing_boxes: Literal["skip", "error"] = "skip"


@dataclass(frozen=True, kw_only=True)
class LocDataConfig:
    train: LocDatasetConfig = field(default_factory=LocDatasetConfig)
    val: LocDatasetConfig = field(default_factory=lambda: LocDatasetConfig(
        split="val", missing_boxes="error"))
    # training crops as in ImageNet classification: shorter side drawn from scale_range, then a
    # random crop_size square and a flip (Sec. 3.4; Appendix C "randomly sample 224x224 crops")
    scale_range: tuple[int, int] = checked((256, 480), SIZE_RANGE)
    crop_size: int = checked(224, AT_LEAST_1)
    flip_prob: float = checked(0.5, FRACTION)
    skip_bad_images: bool = False
    skip_unannotated_classes: bool = False     # a class folder without any box XML: skip, counted
    # a malformed box XML: "error" stops with its name; "skip" leaves it out, logged and counted
    bad_annotations: Literal["error", "skip"] = "error"
    # the parsed index of each split kept in a compact file, read back while its XMLs and
    # images are unchanged (ImageNet's ~540k XMLs take about a minute to parse): "auto" is
    # <train.output_dir>/../loc_index_cache, a path that folder, null no cache
    index_cache: str | None = "auto"
    builtin: BuiltinLocConfig = field(default_factory=BuiltinLocConfig)


@dataclass(frozen=True, kw_only=True)
class LocStageConfig:
    # what each of the three networks has: its ResNet, its own iterations and solver
    backbone: BackboneConfig = field(default_factory=lambda: BackboneConfig(depth=101))
    max_iter: int = checked(10000, _stage_iterations)
    solver: SolverConfig = field(default_factory=lambda: SolverConfig(
        base_lr=0.01, steps=(7000,)))


@dataclass(frozen=True, kw_only=True)
class LocClassifierConfig(LocStageConfig):
    # the classification network that predicts the classes (Table 13, ResNet-101 of Table 4)
    # torchvision://resnet101 (ImageNet classifier, fc included), a tools/pretrain_cls.py
    # checkpoint, or null: trained here first for max_iter iterations
    weights: str | None = None
    # training crops of the classifier: null takes data.scale_range / data.crop_size; a small
    # CIFAR-style net (stem: cifar) learns shapes far faster on small crops of the same images
    scale_range: tuple[int, int] | None = checked(None, SIZE_RANGE)
    crop_size: int | None = checked(None, AT_LEAST_1)
    test_size: int = checked(256, AT_LEAST_1)  # shorter side, then a centre crop of crop_size
    # false: the whole image, fully convolutionally (the paper's test form, Sec. 3.4), so no
    # object is cut off by the crop
    test_crop: bool = True
    max_iter: int = checked(0, _stage_iterations)
    solver: SolverConfig = field(default_factory=lambda: SolverConfig(base_lr=0.1))


@dataclass(frozen=True, kw_only=True)
class LocFinetuneConfig(LocStageConfig):
    # the RPN and the R-CNN are fine-tuned from the classification net (Appendix C): start
    # from the network trained or loaded here (same depth and width) instead of
    # backbone.weights (the RPN takes its conv1..conv4_x)
    init_from_classifier: bool = False
    box_loss: Literal["smooth_l1", "l1"] = "smooth_l1"


@dataclass(frozen=True, kw_only=True)
class LocRPNConfig(LocFinetuneConfig):
    anchors: AnchorConfig = field(default_factory=lambda: AnchorConfig(
        sizes=(64.0, 128.0, 256.0, 512.0)))
    conv_channels: int | None = checked(None, AT_LEAST_1)  # the 3x3 conv; null: the trunk's
    iou_thresholds: tuple[float, float] = checked((0.3, 0.7), IOU_PAIR)
    # "8 anchors are randomly sampled for each image"
    anchors_per_image: int = checked(8, AT_LEAST_1)
    # "positive and negative anchors have a ratio of 1:1"
    positive_fraction: float = checked(0.5, FRACTION)
    # "a mini-batch size of 256 images for fine-tuning"
    solver: SolverConfig = field(default_factory=lambda: SolverConfig(
        base_lr=0.01, ims_per_batch=256, steps=(7000,)))


@dataclass(frozen=True, kw_only=True)
class LocRCNNConfig(LocFinetuneConfig):
    enabled: bool = True                            # false: RPN-only localization
    # proposals warped to the classifier's input
    input_size: int = checked(224, AT_LEAST_1)
    # training samples and test candidates per class
    proposals_per_class: int = checked(200, AT_LEAST_1)
    fg_iou_threshold: float = checked(0.5, FRACTION)
    rois_per_image: int = checked(4, AT_LEAST_1)    # RoI-centric: few RoIs from many images
    # warped pixels of context around each proposal (R-CNN: 16 at 227 px); 0: the tight box
    context_padding: int = checked(0, AT_LEAST_0)
    # solver.ims_per_batch images x rois_per_image RoIs; the paper's mini-batch is 256 RoIs
    solver: SolverConfig = field(default_factory=lambda: SolverConfig(
        base_lr=0.01, ims_per_batch=64, steps=(7000,)))


@dataclass(frozen=True, kw_only=True)
class LocTestConfig:
    # shorter sides of the dense (fully convolutional) test; several: multi-scale (Table 13)
    scales: tuple[int, ...] = checked((256,), SIZES)
    max_size: int | None = checked(None, AT_LEAST_1)
    topk_classes: int = checked(5, AT_LEAST_1)
    pre_nms_topk: int = checked(6000, AT_LEAST_1)
    # per-class NMS of the proposals; null: none
    nms_threshold: float | None = checked(0.7, FRACTION)
    ims_per_batch: int = checked(8, AT_LEAST_1)     # per process
    # the classification step (Sec. 3.4): "single", classifier.test_size with its centre crop
    # (or the whole image without classifier.test_crop); "ten_crop", 10 crops of
    # classifier.crop_size at test_size; "multiscale", the whole image at each cls_scales;
    # softmax scores averaged over the views
    cls_mode: Literal["single", "ten_crop", "multiscale"] = "single"
    cls_scales: tuple[int, ...] = checked((224, 256, 384, 480, 640), SIZES)
    # "dense": the RPN fully convolutional at every test scale (Table 13 "dense"); "one_crop":
    # on the rpn_crop centre crop of the image at scales[0] only (Table 13 "1-crop"), the
    # boxes mapped back to the image
    rpn_mode: Literal["dense", "one_crop"] = "dense"
    rpn_crop: int | None = checked(None, AT_LEAST_1)  # null: data.crop_size (the training crop)
    # proposals the R-CNN warps and runs per forward: it bounds memory and changes no result
    # (a whole test batch is 4,000+ crops of 224 px). An ensemble's R-CNNs refine the union
    # of its RPNs' proposals NMS-ed at nms_threshold, cut to rcnn.proposals_per_class
    rcnn_chunk: int = checked(256, AT_LEAST_1)


@dataclass(frozen=True, kw_only=True)
class LocalizationConfig:
    classifier: LocClassifierConfig = field(default_factory=LocClassifierConfig)
    rpn: LocRPNConfig = field(default_factory=LocRPNConfig)
    rcnn: LocRCNNConfig = field(default_factory=LocRCNNConfig)
    data: LocDataConfig = field(default_factory=LocDataConfig)
    test: LocTestConfig = field(default_factory=LocTestConfig)
    train: RunConfig = field(default_factory=lambda: RunConfig(output_dir="output/loc"))
    pixel_mean: tuple[float, float, float] = checked(IMAGENET_PIXEL_MEAN, PIXEL)   # RGB, 0..255
    pixel_std: tuple[float, float, float] = checked(IMAGENET_PIXEL_STD, POSITIVE)
