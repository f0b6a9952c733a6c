"""The detection schema (Faster R-CNN C4, He et al. 2015 Appendix A): ``model``, ``data``,
``test``, ``solver``, ``train``. Every field carries its default and where it comes from."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from detres.config_checks import (AT_LEAST_0, AT_LEAST_1, FRACTION, PIXEL, POSITIVE,
                                  SEED, Range, checked)
from detres.models.pixels import IMAGENET_PIXEL_MEAN, IMAGENET_PIXEL_STD
from detres.tasks.common import (IOU_PAIR, AnchorConfig, BackboneConfig, SolverConfig,
                                 TrainConfig)


@dataclass(frozen=True, kw_only=True)
class BuiltinShapesConfig:
    # the built-in shapes set (data/builtin.py), generated once per distinct setting
    num_train: int = checked(1500, AT_LEAST_1)
    num_val: int = checked(200, AT_LEAST_1)
    image_size: int = checked(128, Range(32))
    min_object_size: int = checked(10, AT_LEAST_1)
    seed: int = checked(0, SEED)


@dataclass(frozen=True, kw_only=True)
class DetDatasetConfig:
    # imagenet_det: ILSVRC DET in the ILSVRC layout (data/ilsvrc_det.py), root the ILSVRC folder
    type: Literal["coco", "voc", "builtin", "imagenet_det"] = "builtin"
    annotations: str | None = None      # coco: the instances JSON
    images: str | None = None           # coco: the image folder
    # voc: the VOCdevkit folder; builtin: the cache folder (null: $DETRES_CACHE or ~/.cache/detres)
    root: str | None = None
    # voc: YEAR/SPLIT pairs, the paper's 07+12 is [2007/trainval, 2012/trainval]; builtin: train | val
    # coco: released splits by name (data/coco_splits.py): train2014, val2014, minival2014,
    # valminusminival2014, train2017 (alias train), val2017 (alias val), test-dev2015, ...;
    # several training splits are merged (the paper's trainval: [train2014, val2014])
    splits: tuple[str, ...] = ("train",)
    # coco training sets: a split name or annotation file whose images are left out
    # (trainval minus a held-out minival: holdout: minival2014)
    holdout: str | None = None
    # coco, voc: an annotation that cannot be used (unknown image or class, impossible box)
    # stops the load naming it (error), or is dropped and counted in a warning (skip)
    bad_annotations: Literal["error", "skip"] = "error"
    # voc: the <name> values, in label order (null: the 20 PASCAL VOC classes)
    class_names: tuple[str, ...] | None = None
    # voc: image suffixes tried in order for JPEGImages/<name><suffix>
    image_extensions: tuple[str, ...] = (".jpg",)
    # coco, voc: read image file names that lead out of the image folder (../, absolute
    # paths); false refuses them, naming the file (trust the annotation file before setting it)
    allow_outside_paths: bool = False


@dataclass(frozen=True, kw_only=True)
class DetDataConfig:
    train: DetDatasetConfig = field(default_factory=DetDatasetConfig)
    val: DetDatasetConfig = field(default_factory=lambda: DetDatasetConfig(splits=("val",)))
    # shorter side of training images, one drawn per image (multi-scale when several);
    # the paper uses 600 (Appendix A), modern recipes 640..800
    min_size_train: tuple[int, ...] = checked((600,), Range(1, non_empty=True))
    max_size_train: int = checked(1000, AT_LEAST_1)   # cap on the longer side
    min_size_test: int = checked(600, AT_LEAST_1)
    max_size_test: int = checked(1000, AT_LEAST_1)
    flip_prob: float = checked(0.5, FRACTION)
    color_jitter: float = checked(0.0, FRACTION)   # photometric jitter strength (0: off)
    filter_empty: bool = True                      # skip training images without a box
    keep_difficult: bool = False                   # voc: difficult objects as training targets
    skip_bad_images: bool = False                  # skip undecodable images and count them
    aspect_grouping: bool = True                   # batches of landscape or of portrait images
    builtin: BuiltinShapesConfig = field(default_factory=BuiltinShapesConfig)


@dataclass(frozen=True, kw_only=True)
class RPNConfig:
    pre_nms_topk_train: int = checked(12000, AT_LEAST_1)
    pre_nms_topk_test: int = checked(6000, AT_LEAST_1)
    proposals_train: int = checked(2000, AT_LEAST_1)  # post-NMS proposals per image in training
    proposals_test: int = checked(300, AT_LEAST_1)    # paper: 300; modern: 1000
    nms_threshold: float = checked(0.7, FRACTION)
    iou_thresholds: tuple[float, float] = checked((0.3, 0.7), IOU_PAIR)
    batch_size_per_image: int = checked(256, AT_LEAST_1)  # anchors sampled per image, half positive
    positive_fraction: float = checked(0.5, FRACTION)
    box_loss: Literal["smooth_l1", "l1"] = "smooth_l1"
    conv_channels: int | None = checked(None, AT_LEAST_1)   # null: the trunk's channels
    # anchors crossing the image border by more than this many pixels are ignored in training;
    # Faster R-CNN: 0 ("cross-boundary anchors are ignored", Ren et al. 3.3); null keeps them
    # (detectron2, torchvision). Anchors centred in batch padding are never sampled.
    boundary_threshold: float | None = checked(None, AT_LEAST_0)
    # proposals narrower or shorter than this many pixels of the original image are dropped;
    # Faster R-CNN: 16 (py-faster-rcnn RPN_MIN_SIZE); detectron2: 0
    min_size: float = checked(0.0, AT_LEAST_0)


@dataclass(frozen=True, kw_only=True)
class RoIHeadConfig:
    roi_op: Literal["pool", "align"] = "pool"     # paper: RoIPool; modern: RoIAlign
    pooled_size: int = checked(14, AT_LEAST_1)     # then conv5_x with stride 2 -> 7x7
    sampling_ratio: int = checked(0, AT_LEAST_0)   # align only
    aligned: bool = True                           # align only: half-pixel offset
    batch_size_per_image: int = checked(512, AT_LEAST_1)
    positive_fraction: float = checked(0.25, FRACTION)
    fg_iou_threshold: float = checked(0.5, FRACTION)
    box_loss: Literal["smooth_l1", "l1"] = "smooth_l1"
    score_threshold: float = checked(0.05, FRACTION)
    # Faster R-CNN tests with 0.3; detectron2 0.5
    nms_threshold: float = checked(0.5, FRACTION)
    detections_per_image: int = checked(100, AT_LEAST_1)
    # the image's own conv5_x feature (whole image as the RoI) beside each region's, before
    # the sibling layers (Appendix B, "Global context"); changes the model and its checkpoints
    global_context: bool = False


@dataclass(frozen=True, kw_only=True)
class DetModelConfig:
    # detection freezes BN after pretraining (Appendix A) and, as detectron2, the stem and res2
    backbone: BackboneConfig = field(default_factory=lambda: BackboneConfig(
        depth=101, norm="frozen_bn", freeze_at=2))
    anchors: AnchorConfig = field(default_factory=AnchorConfig)
    rpn: RPNConfig = field(default_factory=RPNConfig)
    roi_head: RoIHeadConfig = field(default_factory=RoIHeadConfig)
    # whole-detector weights (a detres checkpoint) loaded after the backbone weights
    weights: str | None = None
    # loading weights trained on another class set re-initialises the class layers
    reinit_class_layers: bool = False
    pixel_mean: tuple[float, float, float] = checked(IMAGENET_PIXEL_MEAN, PIXEL)   # RGB, 0..255
    pixel_std: tuple[float, float, float] = checked(IMAGENET_PIXEL_STD, POSITIVE)
    # channels-last memory layout: same results, convolutions ~1.5x faster on CPU
    channels_last: bool = True


@dataclass(frozen=True, kw_only=True)
class DetTestConfig:
    ims_per_batch: int = checked(4, AT_LEAST_1)    # per process
    # coco: COCO mAP (COCO-format sets, built-in included); voc07 (11-point) | voc12 (area);
    # imagenet_det: ILSVRC DET's devkit rule (area AP, a lower IoU for boxes under ~25 px)
    metric: Literal["coco", "voc07", "voc12", "imagenet_det"] = "coco"
    # Appendix B's test-time improvements (models/test_time.py); all off is the baseline.
    # Box refinement: pool the regressed boxes again, union of the old and new predictions,
    # NMS at model.roi_head.nms_threshold (the paper: 0.3), then box voting at voting_iou
    box_refinement: bool = False
    voting_iou: float = checked(0.5, FRACTION)     # Gidaris & Komodakis 2015
    # multi-scale testing: shorter sides of the pyramid, e.g. [200, 400, 600, 800, 1000];
    # each RoI on two adjacent scales merged by maxout (Ren et al. [33]); [] single-scale
    scales: tuple[int, ...] = checked((), AT_LEAST_1)
    # the side of the square whose area each RoI's scale pair brackets: what the RoI head's
    # conv5_x saw in training, the paper's 224 (ImageNet crops); a model pretrained or trained
    # at other sizes takes its own (a preset's comment says how its value was derived)
    scale_target: int = checked(224, AT_LEAST_1)
    flip: bool = False                             # also score each RoI on the mirrored image
    # write the results files only (COCO test-dev, VOC 2012 test): no ground truth needed
    format_only: bool = False
    # the form inference runs (models/inference_form.py): frozen BN folded into the convolutions and
    # channels-last, exact (fp32 detections within 1e-4); checkpoints keep the unfolded form
    fast_path: bool = True
    # CPU autocast at test time: auto = bf16 where the CPU computes bf16 natively (AVX-512
    # BF16 or AMX), fp32 elsewhere; bf16 or none force it (docs/speed.md: its accuracy cost)
    cpu_amp: Literal["auto", "bf16", "none"] = "auto"
    # torch.compile (inductor) of the trunk and conv5_x at test time (docs/speed.md)
    compile: bool = False


@dataclass(frozen=True, kw_only=True)
class DetTrainConfig(TrainConfig):
    # refuse, before the first step, a run whose training iteration would not fit in the
    # memory available (estimated in tasks/detection/memory.py); false skips the check
    memory_check: bool = True


@dataclass(frozen=True, kw_only=True)
class DetectionConfig:
    model: DetModelConfig = field(default_factory=DetModelConfig)
    data: DetDataConfig = field(default_factory=DetDataConfig)
    test: DetTestConfig = field(default_factory=DetTestConfig)
    solver: SolverConfig = field(default_factory=lambda: SolverConfig(
        base_lr=0.02, ims_per_batch=16, steps=(60000, 80000), warmup_iters=1000))
    train: DetTrainConfig = field(default_factory=lambda: DetTrainConfig(max_iter=90000))
