"""Typed, strict configuration: YAML -> frozen dataclasses.

A config file is a YAML mapping whose keys mirror the dataclasses below. It may name one
``base:`` file (path relative to itself) whose values it overrides; the base may not name
another base, so every value is at most one file away from where it is used. Trailing
``key=value`` arguments override both (``solver.base_lr=0.01 data.train.type=builtin``); the
value is read as YAML, so ``1e-3``, ``true``, ``[600, 800]`` and ``null`` mean what they look
like, and then checked against the field's type.

Every error names the file (or the command line), the full dotted key and what is valid.
Only ``detres/build.py`` and ``tools/`` import this module; models and data take plain
constructor arguments.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

T = TypeVar("T")
COMMAND_LINE = "<command line>"


class ConfigError(ValueError):
    """A config value is unknown, missing or of the wrong type; the message says where."""


# ----------------------------------------------------------------------------- schema
@dataclass(frozen=True, kw_only=True)
class BackboneConfig:
    # 18/34/50/101/152 for ImageNet nets (Table 1); 6n+2 (20, 32, ..., 1202) for CIFAR nets (Sec. 4.2)
    depth: int = 50
    # imagenet: 7x7 stem + max pool, four stages; cifar: 3x3 stem, three stages (Sec. 4.2)
    stem: Literal["imagenet", "cifar"] = "imagenet"
    # false gives the plain net of the same depth: no shortcuts (Fig. 3 middle, Table 2, Fig. 6)
    residual: bool = True
    # A: zero-padding identity, B: projections where shape changes, C: all projections (Table 3)
    shortcut: Literal["A", "B", "C"] = "B"
    # true: stride in the first 1x1 of a bottleneck (MSRA original); false: in the 3x3 (torchvision)
    stride_in_1x1: bool = False
    # base channel count; null means the paper's (64 ImageNet, 16 CIFAR); narrow nets suit CPUs
    width: int | None = None
    # bn | frozen_bn (statistics and affine fixed, as for detection, Appendix A) | gn
    norm: Literal["bn", "frozen_bn", "gn"] = "bn"
    gn_groups: int = 32
    # 0 trains everything; 1 freezes the stem (conv1); k freezes the stem and the first k-1 stages
    freeze_at: int = 0
    # null (random init), a local state-dict file, or torchvision://resnet50 (ImageNet weights)
    weights: str | None = None
    # zero-init the last norm of each residual branch, so blocks start as identities
    zero_init_residual: bool = False


@dataclass(frozen=True, kw_only=True)
class SolverConfig:
    optimizer: Literal["sgd", "adamw"] = "sgd"       # SGD with momentum as in the paper (Sec. 3.4)
    base_lr: float = 0.1                              # for ims_per_batch images (Sec. 3.4: 0.1 at 256)
    # global batch over all processes; each rank takes ims_per_batch / world_size
    ims_per_batch: int = 256
    # the batch that base_lr and the iteration counts are written for: when set, the LR is
    # multiplied by ims_per_batch / reference_batch (linear scaling rule) and, in
    # tools/train_det.py, max_iter, steps, warmup and the periods divided by it
    reference_batch: int | None = None
    momentum: float = 0.9
    weight_decay: float = 1e-4
    # no weight decay on norm weights and biases (common for AdamW; the paper decays all)
    no_decay_norm_bias: bool = False
    steps: tuple[int, ...] = ()                       # iterations at which the LR is multiplied by gamma
    gamma: float = 0.1
    warmup_iters: int = 0                              # linear warmup length in iterations
    warmup_factor: float = 0.001                       # LR multiplier at iteration 0 of the warmup
    # constant warmup at warmup_factor instead of linear (ResNet-110 on CIFAR: 0.01 for 400 iters)
    warmup_method: Literal["linear", "constant"] = "linear"
    clip_grad_norm: float | None = None                # null: no clipping
    betas: tuple[float, float] = (0.9, 0.999)          # AdamW only


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    output_dir: str = "output/run"
    max_iter: int = 1000
    device: Literal["auto", "cpu", "cuda"] = "auto"
    seed: int = 0
    # mixed precision on CUDA only; ignored on CPU
    amp: Literal["none", "bf16", "fp16"] = "bf16"
    checkpoint_period: int = 1000
    eval_period: int = 0                               # 0: evaluate at the end only
    log_period: int = 20
    num_workers: int = 2
    deterministic: bool = False                         # torch.use_deterministic_algorithms
    # intra-op CPU threads per process; 0 keeps PyTorch's default (one per core). 1 is faster
    # on a CPU shared with other jobs, where spinning OpenMP threads wait on each other
    num_threads: int = 0


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
    crop_size: int = 224
    scale_range: tuple[int, int] = (256, 480)            # shorter side, imagenet recipe (Sec. 3.4)
    test_size: int = 256                                 # shorter side before the centre crop
    ten_crop: bool = False                               # the paper's 10-crop testing (Sec. 3.4)
    skip_bad_images: bool = False                        # skip undecodable files and count them
    # RGB (0..255) mean subtracted and std divided by the model; torchvision's values, so a
    # backbone pretrained here expects the same input as torchvision's weights
    pixel_mean: tuple[float, float, float] = (123.675, 116.28, 103.53)
    pixel_std: tuple[float, float, float] = (58.395, 57.12, 57.375)
    # subtract the training set's per-pixel mean image instead of pixel_mean (Sec. 4.2, cifar10)
    per_pixel_mean: bool = False
    test_ims_per_batch: int = 100                        # global test batch


@dataclass(frozen=True, kw_only=True)
class PreciseBNConfig:
    # recompute BN statistics over this many training batches after training (0: off);
    # the paper computes them on the training set before freezing BN for detection (Appendix A)
    num_batches: int = 0


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


@dataclass(frozen=True, kw_only=True)
class BuiltinShapesConfig:
    # the built-in shapes set (data/builtin.py), generated once per distinct setting
    num_train: int = 1500
    num_val: int = 200
    image_size: int = 128
    min_object_size: int = 10
    seed: int = 0


@dataclass(frozen=True, kw_only=True)
class DetDatasetConfig:
    type: Literal["coco", "voc", "builtin"] = "builtin"
    annotations: str | None = None      # coco: the instances JSON
    images: str | None = None           # coco: the image folder
    # voc: the VOCdevkit folder; builtin: the cache folder (null: $DETRES_CACHE or ~/.cache/detres)
    root: str | None = None
    # voc: YEAR/SPLIT pairs, the paper's 07+12 is [2007/trainval, 2012/trainval]; builtin: train | val
    splits: tuple[str, ...] = ("train",)


@dataclass(frozen=True, kw_only=True)
class DetDataConfig:
    train: DetDatasetConfig = field(default_factory=DetDatasetConfig)
    val: DetDatasetConfig = field(default_factory=lambda: DetDatasetConfig(splits=("val",)))
    # shorter side of training images, one drawn per image (multi-scale when several);
    # the paper uses 600 (Appendix A), modern recipes 640..800
    min_size_train: tuple[int, ...] = (600,)
    max_size_train: int = 1000                     # cap on the longer side
    min_size_test: int = 600
    max_size_test: int = 1000
    flip_prob: float = 0.5
    color_jitter: float = 0.0                      # photometric jitter strength (0: off)
    filter_empty: bool = True                      # skip training images without a box
    keep_difficult: bool = False                   # voc: difficult objects as training targets
    skip_bad_images: bool = False                  # skip undecodable images and count them
    aspect_grouping: bool = True                   # batches of landscape or of portrait images
    builtin: BuiltinShapesConfig = field(default_factory=BuiltinShapesConfig)


@dataclass(frozen=True, kw_only=True)
class AnchorConfig:
    # paper VOC: 128, 256, 512; paper COCO adds 64 (Appendix A); modern: 32..512
    sizes: tuple[float, ...] = (64.0, 128.0, 256.0, 512.0)
    aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)


@dataclass(frozen=True, kw_only=True)
class RPNConfig:
    pre_nms_topk_train: int = 12000
    pre_nms_topk_test: int = 6000
    proposals_train: int = 2000                    # post-NMS proposals per image in training
    proposals_test: int = 300                      # paper: 300; modern: 1000
    nms_threshold: float = 0.7
    iou_thresholds: tuple[float, float] = (0.3, 0.7)   # negative below, positive at or above
    batch_size_per_image: int = 256                # anchors sampled per image, half positive
    positive_fraction: float = 0.5
    box_loss: Literal["smooth_l1", "l1"] = "smooth_l1"
    conv_channels: int | None = None               # null: the trunk's channels


@dataclass(frozen=True, kw_only=True)
class RoIHeadConfig:
    roi_op: Literal["pool", "align"] = "pool"     # paper: RoIPool; modern: RoIAlign
    pooled_size: int = 14                          # then conv5_x with stride 2 -> 7x7
    sampling_ratio: int = 0                        # align only
    aligned: bool = True                           # align only: half-pixel offset
    batch_size_per_image: int = 512
    positive_fraction: float = 0.25
    fg_iou_threshold: float = 0.5
    box_loss: Literal["smooth_l1", "l1"] = "smooth_l1"
    score_threshold: float = 0.05
    nms_threshold: float = 0.5
    detections_per_image: int = 100


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
    pixel_mean: tuple[float, float, float] = (123.675, 116.28, 103.53)   # RGB, 0..255
    pixel_std: tuple[float, float, float] = (58.395, 57.12, 57.375)
    # channels-last memory layout: same results, convolutions ~1.5x faster on CPU
    channels_last: bool = True


@dataclass(frozen=True, kw_only=True)
class DetTestConfig:
    ims_per_batch: int = 4                         # per process
    # coco: COCO mAP (COCO-format sets, built-in included); voc07 (11-point) | voc12 (area)
    metric: Literal["coco", "voc07", "voc12"] = "coco"


@dataclass(frozen=True, kw_only=True)
class DetectionConfig:
    model: DetModelConfig = field(default_factory=DetModelConfig)
    data: DetDataConfig = field(default_factory=DetDataConfig)
    test: DetTestConfig = field(default_factory=DetTestConfig)
    solver: SolverConfig = field(default_factory=lambda: SolverConfig(
        base_lr=0.02, ims_per_batch=16, steps=(60000, 80000), warmup_iters=1000))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(max_iter=90000))


@dataclass(frozen=True, kw_only=True)
class BuiltinLocConfig:
    # the built-in localization set (data/builtin_loc.py), generated once per distinct setting
    num_train_per_class: int = 120
    num_val_per_class: int = 30
    image_size: int = 96
    seed: int = 0


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
    scale_range: tuple[int, int] = (256, 480)
    crop_size: int = 224
    flip_prob: float = 0.5
    skip_bad_images: bool = False
    skip_unannotated_classes: bool = False     # a class folder without any box XML: skip, counted
    builtin: BuiltinLocConfig = field(default_factory=BuiltinLocConfig)


@dataclass(frozen=True, kw_only=True)
class LocClassifierConfig:
    # the classification network that predicts the classes (Table 13, ResNet-101 of Table 4)
    backbone: BackboneConfig = field(default_factory=lambda: BackboneConfig(depth=101))
    # torchvision://resnet101 (ImageNet classifier, fc included), a tools/pretrain_cls.py
    # checkpoint, or null: trained here first for max_iter iterations
    weights: str | None = None
    # training crops of the classifier: null takes data.scale_range / data.crop_size; a small
    # CIFAR-style net (stem: cifar) learns shapes far faster on small crops of the same images
    scale_range: tuple[int, int] | None = None
    crop_size: int | None = None
    test_size: int = 256                       # shorter side, then a centre crop of crop_size
    # false: the whole image, fully convolutionally (the paper's test form, Sec. 3.4), so no
    # object is cut off by the crop
    test_crop: bool = True
    max_iter: int = 0
    solver: SolverConfig = field(default_factory=lambda: SolverConfig(base_lr=0.1))


@dataclass(frozen=True, kw_only=True)
class LocRPNConfig:
    # fine-tuned from the classification net's weights (Appendix C); its conv1..conv4_x are used
    backbone: BackboneConfig = field(default_factory=lambda: BackboneConfig(depth=101))
    # start conv1..conv4_x from the classification network trained or loaded here (same
    # depth and width), instead of backbone.weights
    init_from_classifier: bool = False
    anchors: AnchorConfig = field(default_factory=lambda: AnchorConfig(
        sizes=(64.0, 128.0, 256.0, 512.0)))
    conv_channels: int | None = None               # the 3x3 conv; null: the trunk's channels
    iou_thresholds: tuple[float, float] = (0.3, 0.7)
    anchors_per_image: int = 8          # "8 anchors are randomly sampled for each image"
    positive_fraction: float = 0.5      # "positive and negative anchors have a ratio of 1:1"
    box_loss: Literal["smooth_l1", "l1"] = "smooth_l1"
    max_iter: int = 10000
    # "a mini-batch size of 256 images for fine-tuning"
    solver: SolverConfig = field(default_factory=lambda: SolverConfig(
        base_lr=0.01, ims_per_batch=256, steps=(7000,)))


@dataclass(frozen=True, kw_only=True)
class LocRCNNConfig:
    enabled: bool = True                            # false: RPN-only localization
    backbone: BackboneConfig = field(default_factory=lambda: BackboneConfig(depth=101))
    init_from_classifier: bool = False              # as rpn.init_from_classifier
    input_size: int = 224                           # proposals warped to the classifier's input
    proposals_per_class: int = 200                  # training samples and test candidates per class
    fg_iou_threshold: float = 0.5
    rois_per_image: int = 4                         # RoI-centric: few RoIs from many images
    box_loss: Literal["smooth_l1", "l1"] = "smooth_l1"
    max_iter: int = 10000
    # solver.ims_per_batch images x rois_per_image RoIs; the paper's mini-batch is 256 RoIs
    solver: SolverConfig = field(default_factory=lambda: SolverConfig(
        base_lr=0.01, ims_per_batch=64, steps=(7000,)))


@dataclass(frozen=True, kw_only=True)
class LocTestConfig:
    # shorter sides of the dense (fully convolutional) test; several: multi-scale (Table 13)
    scales: tuple[int, ...] = (256,)
    max_size: int | None = None
    topk_classes: int = 5
    pre_nms_topk: int = 6000
    nms_threshold: float | None = 0.7               # per-class NMS of the proposals; null: none
    ims_per_batch: int = 8                          # per process


@dataclass(frozen=True, kw_only=True)
class LocTrainConfig:
    # TrainConfig without max_iter: each stage (classifier, rpn, rcnn) has its own
    output_dir: str = "output/loc"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    seed: int = 0
    amp: Literal["none", "bf16", "fp16"] = "bf16"
    checkpoint_period: int = 1000
    log_period: int = 20
    num_workers: int = 2
    deterministic: bool = False
    num_threads: int = 0


@dataclass(frozen=True, kw_only=True)
class LocalizationConfig:
    classifier: LocClassifierConfig = field(default_factory=LocClassifierConfig)
    rpn: LocRPNConfig = field(default_factory=LocRPNConfig)
    rcnn: LocRCNNConfig = field(default_factory=LocRCNNConfig)
    data: LocDataConfig = field(default_factory=LocDataConfig)
    test: LocTestConfig = field(default_factory=LocTestConfig)
    train: LocTrainConfig = field(default_factory=LocTrainConfig)
    pixel_mean: tuple[float, float, float] = (123.675, 116.28, 103.53)   # RGB, 0..255
    pixel_std: tuple[float, float, float] = (58.395, 57.12, 57.375)


# ----------------------------------------------------------------------------- loading
def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = (),
                schema: type[T] = ClassificationConfig) -> T:
    """Reads ``path`` (and its ``base:``), applies ``key=value`` overrides, returns ``schema``.

    ``path=None`` starts from the schema's defaults.
    """
    data: dict[str, Any] = {}
    sources: dict[str, str] = {}
    if path is not None:
        data, sources = _read_with_base(Path(path))
    for item in overrides:
        key, value = _parse_override(item)
        _set_dotted(data, key, value)
        sources[key] = COMMAND_LINE
    return _build(schema, data, "", sources, str(path) if path is not None else COMMAND_LINE)


def from_dict(data: dict[str, Any], schema: type[T], source: str = "<dict>") -> T:
    """``schema`` from plain values, e.g. the resolved config stored in a checkpoint."""
    return _build(schema, data, "", {}, source)


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"{path}: config file does not exist")
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}".replace("\n", " ")) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys to values, "
                          f"got {type(data).__name__}")
    return data


def _read_with_base(path: Path) -> tuple[dict[str, Any], dict[str, str]]:
    data = _read_yaml(path)
    sources = {k: str(path) for k in _dotted_keys(data)}
    base = data.pop("base", None)
    sources.pop("base", None)
    if base is None:
        return data, sources
    if not isinstance(base, str):
        raise ConfigError(f"{path}: 'base' must be a file path, got {base!r}")
    base_path = (path.parent / base).resolve() if not Path(base).is_absolute() else Path(base)
    if not base_path.is_file():
        raise ConfigError(f"{path}: base file '{base}' does not exist (looked at {base_path})")
    base_data = _read_yaml(base_path)
    if "base" in base_data:
        raise ConfigError(f"{base_path}: a base file may not name another base "
                          f"(only one level of 'base:' is allowed; reached from {path})")
    base_sources = {k: str(base_path) for k in _dotted_keys(base_data)}
    merged = _merge(base_data, data)
    return merged, {**base_sources, **sources}


def _dotted_keys(d: dict[str, Any], prefix: str = "") -> list[str]:
    keys = []
    for k, v in d.items():
        full = f"{prefix}{k}"
        keys.append(full)
        if isinstance(v, dict):
            keys.extend(_dotted_keys(v, full + "."))
    return keys


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in top.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _parse_override(item: str) -> tuple[str, Any]:
    key, sep, text = item.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"{COMMAND_LINE}: override '{item}' is not of the form key.path=value")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        value = text  # plain text such as a path with a colon
    return key, value


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[parts[-1]] = value


def _build(cls: type[T], data: Any, prefix: str, sources: dict[str, str], default_src: str) -> T:
    where = sources.get(prefix.rstrip("."), default_src) if prefix else default_src
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: '{prefix.rstrip('.')}' must be a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key in data:
        if key not in fields:
            src = sources.get(f"{prefix}{key}", default_src)
            section = f"under '{prefix.rstrip('.')}'" if prefix else "at the top level"
            raise ConfigError(f"{src}: unknown key '{prefix}{key}'; valid keys {section}: "
                              f"{', '.join(fields)}")
    kwargs = {}
    for name, f in fields.items():
        full = f"{prefix}{name}"
        tp = hints[name]
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"{default_src}: missing required value '{full}' "
                                  f"({_type_name(tp)})")
            continue
        src = sources.get(full, default_src)
        if dataclasses.is_dataclass(tp):
            value = data[name]
            if isinstance(value, dict) and f.default_factory is not dataclasses.MISSING:
                # a section given in part keeps the parent's defaults for the rest
                # (e.g. detection's frozen_bn backbone when only the depth is set)
                value = _merge(to_dict(f.default_factory()), value)
            kwargs[name] = _build(tp, value, full + ".", sources, default_src)
        else:
            kwargs[name] = _coerce(data[name], tp, full, src)
    return cls(**kwargs)


def _coerce(value: Any, tp: Any, key: str, src: str) -> Any:
    """Checks ``value`` against type ``tp``; converts lists to tuples and ints to floats."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)

    def fail(what: str = "") -> ConfigError:
        return ConfigError(f"{src}: '{key}' must be {what or _type_name(tp)}, got {value!r}")

    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key, src)
            except ConfigError:
                pass
        raise fail()
    if origin is Literal:
        if value in args and type(value) is type(args[args.index(value)]):
            return value
        raise fail("one of " + ", ".join(repr(a) for a in args))
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise fail()
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            if len(value) != len(args):
                raise fail()
            items = [_coerce(v, a, f"{key}[{i}]", src) for i, (v, a) in enumerate(zip(value, args))]
        else:
            items = [_coerce(v, args[0], f"{key}[{i}]", src) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise fail()
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise fail()
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # PyYAML reads "1e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise fail()
    if tp is str:
        if isinstance(value, str):
            return value
        raise fail()
    if tp is Any:
        return value
    raise ConfigError(f"{src}: '{key}' has an unsupported type {tp!r}")  # a schema bug


def _type_name(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _type_name(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (tuple, list):
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            return f"a list of {len(args)} values"
        return f"a list of {_type_name(args[0])}"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(
        tp, getattr(tp, "__name__", str(tp)))


# ----------------------------------------------------------------------------- output
def to_dict(cfg: Any) -> dict[str, Any]:
    """The config as plain YAML-ready values (tuples become lists)."""
    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v
    return plain(cfg)


def dump(cfg: Any, path: str | Path | None = None) -> str:
    """Writes the resolved config as YAML (loadable by ``load_config``); returns the text."""
    text = yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=False)
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text, encoding="utf-8")
    return text


def replace(cfg: T, overrides: list[str] | tuple[str, ...]) -> T:
    """A copy of ``cfg`` with ``key=value`` overrides applied and checked."""
    data = to_dict(cfg)
    sources: dict[str, str] = {}
    for item in overrides:
        key, value = _parse_override(item)
        _set_dotted(data, key, value)
        sources[key] = COMMAND_LINE
    return _build(type(cfg), data, "", sources, COMMAND_LINE)
