"""The form of a trained detector that evaluation, the Predictor and tools/infer.py run.

    model = prepare_for_inference(model)            # a copy: frozen BN folded, channels-last
    dtype = inference_amp_dtype(device, "auto")     # bf16 on CPUs that compute it natively
    with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        detections = model(images).detections

Folding and the layout are exact (fp32 detections equal the unfolded model's within 1e-4):
detection keeps BatchNorm frozen after pretraining (Appendix A), so each BN is an affine map
that folds into the convolution before it, saving one pass over every activation. The copy
keeps the caller's model, and so every checkpoint, in the unfolded form training writes.

bf16 autocast is not exact; :func:`inference_amp_dtype` turns it on for ``auto`` only where
the CPU has bf16 arithmetic (AVX-512 BF16 or AMX): elsewhere oneDNN emulates it, slower than
fp32. Its accuracy cost is measured in docs/speed.md.
"""
from __future__ import annotations

import copy
import logging
import shutil
from typing import Any, Literal

import torch
from torch import nn

from detres import cpu
from detres.models.faster_rcnn import FasterRCNN

logger = logging.getLogger("detres")

CpuAmp = Literal["auto", "bf16", "none"]
CPU_AMP_CHOICES = ("auto", "bf16", "none")


def inference_amp_dtype(device: torch.device | str, cpu_amp: str = "auto",
                        cuda_amp: torch.dtype | None = None) -> torch.dtype | None:
    """The autocast dtype of inference on ``device``, None for fp32.

    Args:
        cpu_amp: ``auto`` (bf16 where the CPU has native bf16, fp32 elsewhere), ``bf16``
            (always) or ``none`` (fp32); the config's ``test.cpu_amp``.
        cuda_amp: the dtype on CUDA (training's ``train.amp``), None for fp32.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return cuda_amp
    if cpu_amp not in CPU_AMP_CHOICES:
        raise ValueError(f"test.cpu_amp must be one of {', '.join(CPU_AMP_CHOICES)}, "
                         f"got {cpu_amp!r}")
    if device.type != "cpu" or cpu_amp == "none":
        return None
    if cpu_amp == "bf16" or cpu.cpu_has_native_bf16():
        return torch.bfloat16
    return None


def autocast(device: torch.device | str, dtype: torch.dtype | None) -> torch.autocast:
    """``torch.autocast`` to ``dtype`` on ``device``; disabled (fp32) for None."""
    device = torch.device(device)
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


def detectors_in(model: nn.Module) -> list[FasterRCNN]:
    """Every FasterRCNN in ``model``: itself, or the members of a TestTimeDetector."""
    return [m for m in model.modules() if isinstance(m, FasterRCNN)]


def prepare_for_inference(model: nn.Module, *, fuse: bool = True, channels_last: bool = True,
                          compile: bool = False, inplace: bool = False) -> nn.Module:
    """The fast exact inference form of ``model`` (a FasterRCNN, a TestTimeDetector around
    some, or any module: others are only copied and put in eval mode).

    Args:
        fuse: fold every frozen (or eval-mode) BatchNorm into the convolution before it.
        channels_last: NHWC convolutions (oneDNN's and cuDNN's fast layout).
        compile: ``torch.compile`` the trunk and conv5_x (:func:`compile_detector`).
        inplace: change ``model`` itself instead of a copy (when nothing else holds it).

    Returns:
        The prepared model in eval mode, without gradients; never save its state dict.
    """
    if not inplace:
        model = copy.deepcopy(model)
    model.eval().requires_grad_(False)
    for detector in detectors_in(model):
        if fuse:   # eval-mode BatchNorm2d too (the built-in demo's backbone): exact
            detector.fuse_frozen_bn(batchnorm=True)
        if channels_last:
            detector.use_channels_last(True)
        if compile:
            compile_detector(detector)
    return model


def compile_available(device: torch.device | str = "cpu") -> tuple[bool, str]:
    """(whether inductor can compile for ``device`` here, why not)."""
    if not hasattr(torch, "compile"):
        return False, "this torch has no torch.compile"
    if torch.device(device).type == "cpu":
        from torch._inductor import config as inductor_config
        cxx = inductor_config.cpp.cxx[-1] if isinstance(inductor_config.cpp.cxx, tuple) \
            else inductor_config.cpp.cxx
        if not any(shutil.which(c) for c in (cxx, "g++", "c++", "clang++") if c):
            return False, "no C++ compiler (g++, clang++) on PATH for inductor's CPU kernels"
    return True, ""


class CompiledOrEager(nn.Module):
    """``torch.compile(module)`` that falls back to ``module`` itself for good (with one
    warning) when compiling fails, e.g. without a working compiler toolchain."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.eager = module
        self.compiled = torch.compile(module, dynamic=True)
        self.failed = False

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if not self.failed:
            try:
                return self.compiled(*args, **kwargs)
            except Exception as e:   # noqa: BLE001 - any compiler failure falls back
                self.failed = True
                logger.warning("torch.compile failed (%s: %s); running %s uncompiled",
                               type(e).__name__, str(e).splitlines()[0][:200] if str(e) else "",
                               type(self.eager).__name__)
        return self.eager(*args, **kwargs)


def compile_detector(detector: FasterRCNN) -> FasterRCNN:
    """Compiles the trunk and conv5_x (the per-region head) with inductor, in place; leaves
    them eager, with a warning, where compilation is unavailable. Shapes are dynamic (image
    sizes and RoI counts vary), so one compilation serves every batch."""
    ok, why = compile_available(detector.pixel_mean.device)
    if not ok:
        logger.warning("test.compile: %s; running uncompiled", why)
        return detector
    detector.trunk = CompiledOrEager(detector.trunk)
    detector.roi_head.res5 = CompiledOrEager(detector.roi_head.res5)
    return detector
