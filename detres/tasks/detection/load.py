"""Checkpoint -> a detector ready to test: the one way from ``--weights`` to a running model.

tools/eval_det.py and train_det.py --eval-only (``run.evaluate``), tools/infer.py and
``Predictor.from_checkpoint``, and tools/export.py all call :func:`load_detector`, so every
check runs on every path: the checkpoint's task and class names, the network's structure
against the config (``build.check_structure``), and across an ensemble's members the class
names and dataset category ids; and Appendix B's ``test.*`` switches always apply
(``build.build_test_detector``).

    loaded = load_detector("output/frcnn_r18_shapes/model_final.pth", overrides=["test.flip=true"])
    loaded.model            # FasterRCNN, or TestTimeDetector with a test.* switch or an ensemble
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from detres.config import ConfigError, from_dict
from detres.config import replace as replace_config
from detres.engine.checkpoint import (CheckpointError, check_task, class_difference,
                                      load_checkpoint_weights, read_checkpoint)
from detres.models.faster_rcnn import FasterRCNN
from detres.tasks.detection.build import (TASK, build_detector, build_test_detector,
                                          check_structure)
from detres.tasks.detection.config import DetectionConfig, DetModelConfig

Weights = str | os.PathLike | Sequence[str | os.PathLike]


@dataclass(frozen=True)
class LoadedDetector:
    """A trained detector (or an ensemble) with what it needs to be run and reported.

    Attributes:
        model: what to run, in eval mode on the CPU: the detector itself, or a
            ``TestTimeDetector`` over ``detectors`` when a ``test.*`` switch is on or there are
            several (Appendix B).
        detectors: one trained ``FasterRCNN`` per checkpoint, in the order given.
        cfg: the config they run under (the one given, or the first checkpoint's), with the
            overrides applied.
        class_names: K names in label order, the same in every checkpoint.
        category_ids: the dataset id of each label (COCO ``category_id``), or None when the
            checkpoints do not record them.
    """

    model: nn.Module
    detectors: tuple[FasterRCNN, ...]
    cfg: DetectionConfig
    class_names: tuple[str, ...]
    category_ids: tuple[int, ...] | None


def load_detector(weights: Weights, cfg: DetectionConfig | None = None,
                  overrides: Sequence[str] = ()) -> LoadedDetector:
    """The detector of a training checkpoint, or the ensemble of several (Appendix B).

    Args:
        weights: a detection checkpoint (tools/train_det.py, tools/convert_weights.py), or
            several: an ensemble.
        cfg: the config to run under; None: the one the first checkpoint stores. The first
            detector is built by it, each further one by the config its own checkpoint stores
            (members may differ in depth, global context, ...).
        overrides: ``key=value`` changes of that config, e.g. ``test.flip=true`` or
            ``model.roi_head.score_threshold=0.3``.

    Each file is read once. A checkpoint of another task, one without class names, one
    trained with another structure than its config (global context, stride placement, RoI
    op, ...), or a member whose class names or category ids differ from the first's is a
    ``CheckpointError`` naming the file.
    """
    paths = [weights] if isinstance(weights, (str, os.PathLike)) else list(weights)
    if not paths:
        raise ConfigError("no detection checkpoint given (--weights W)")
    detectors: list[FasterRCNN] = []
    names: tuple[str, ...] = ()
    ids: tuple[int, ...] | None = None
    if cfg is not None and overrides:     # a bad value is the first thing said
        cfg = replace_config(cfg, list(overrides))
    for i, path in enumerate(paths):
        ckpt = read_checkpoint(path)
        check_task(ckpt, path, TASK)
        if i == 0 and cfg is None:
            cfg = _stored_config(ckpt, path)
            cfg = replace_config(cfg, list(overrides)) if overrides else cfg
        member_names, member_ids = _classes(ckpt, path)
        if i == 0:
            names, ids, model_cfg = member_names, member_ids, cfg.model
        else:
            _check_member(path, member_names, member_ids, paths[0], names, ids)
            model_cfg = _stored_config(ckpt, path).model if ckpt.get("config") else cfg.model
        detectors.append(_detector(model_cfg, ckpt, path, len(names)))
        del ckpt                        # an ensemble holds one checkpoint's tensors at a time
    return LoadedDetector(build_test_detector(cfg, detectors).eval(), tuple(detectors), cfg,
                          names, ids)


def _stored_config(ckpt: dict[str, Any], path: str | os.PathLike) -> DetectionConfig:
    if "config" not in ckpt:
        raise CheckpointError(f"{path} does not record its config; pass CONFIG explicitly")
    return from_dict(ckpt["config"], DetectionConfig, source=f"{path} (stored config)")


def _classes(ckpt: dict[str, Any], path: str | os.PathLike
             ) -> tuple[tuple[str, ...], tuple[int, ...] | None]:
    """The checkpoint's class names and category ids, checked (a checkpoint is a file from
    anywhere: what the results files and drawings show must be names and whole numbers)."""
    names = ckpt.get("class_names")
    if not names or not isinstance(names, (list, tuple)) or not all(
            isinstance(n, str) for n in names):
        raise CheckpointError(f"{path} does not record its class_names; it was not written by "
                              f"tools/train_det.py")
    ids = ckpt.get("category_ids") or None     # a VOC-style set records none
    if ids is not None and not (isinstance(ids, (list, tuple)) and len(ids) == len(names)
                                and all(type(c) is int for c in ids)):
        raise CheckpointError(f"{path}: its category_ids are not one whole number per class "
                              f"({len(names)} classes)")
    return tuple(names), tuple(ids) if ids is not None else None


def _check_member(path: str | os.PathLike, names: tuple[str, ...], ids: tuple[int, ...] | None,
                  first: str | os.PathLike, first_names: tuple[str, ...],
                  first_ids: tuple[int, ...] | None) -> None:
    """An ensemble averages scores label by label: its members must mean the same class by
    each label, and report it under the same dataset id."""
    if names != first_names:
        raise CheckpointError(
            f"{path} predicts other classes than {first}: "
            f"{class_difference(list(names), list(first_names), 'in it', f'in {Path(first).name}')}"
            f"; an ensemble's members share one class list")
    if ids is not None and first_ids is not None and ids != first_ids:
        raise CheckpointError(f"{path} gives its classes other dataset category ids than "
                              f"{first} ({list(ids)[:5]}... vs {list(first_ids)[:5]}...); an "
                              f"ensemble's members share one dataset")


def _detector(cfg: DetModelConfig, ckpt: dict[str, Any], path: str | os.PathLike,
              num_classes: int) -> FasterRCNN:
    """The detector ``cfg`` describes with the checkpoint's weights, in eval mode."""
    check_structure(cfg, ckpt, path)
    # the checkpoint holds every weight: no backbone file or model.weights to read first
    plain = dataclasses.replace(cfg, weights=None,
                                backbone=dataclasses.replace(cfg.backbone, weights=None))
    model = build_detector(plain, num_classes)
    load_checkpoint_weights(model, path, TASK, ckpt=ckpt)
    return model.eval()
