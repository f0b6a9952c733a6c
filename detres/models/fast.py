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
import functools
import logging
import shutil
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from detres.models.faster_rcnn import FasterRCNN

logger = logging.getLogger("detres")

CpuAmp = Literal["auto", "bf16", "none"]
CPU_AMP_CHOICES = ("auto", "bf16", "none")
# /proc/cpuinfo flags of native bf16 arithmetic: AVX-512 BF16 dot products (Cooper Lake,
# Zen 4 and later) and AMX tiles (Sapphire Rapids and later)
BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@functools.cache
def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> frozenset[str]:
    """The CPU's feature flags (Linux ``/proc/cpuinfo``); empty where that file is absent."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.partition(":")[2].split())
    return frozenset()


def cpu_has_native_bf16(flags: frozenset[str] | None = None) -> bool:
    """Whether the CPU computes bf16 in hardware (``flags`` default: :func:`cpu_flags`)."""
    flags = cpu_flags() if flags is None else flags
    return any(f in flags for f in BF16_FLAGS)


def cpu_clock_ghz(cpuinfo: str = "/proc/cpuinfo") -> float | None:
    """The first core's clock from ``cpu MHz`` in /proc/cpuinfo (GHz), None where absent."""
    try:
        for line in Path(cpuinfo).read_text().splitlines():
            if line.startswith("cpu MHz"):
                return float(line.partition(":")[2]) / 1000
    except (OSError, ValueError):
        pass
    return None


def fp32_fmas_per_cycle(flags: frozenset[str] | None = None, vendor: str = "") -> int:
    """fp32 multiply-adds per cycle of one core from its vector width: two FMA pipes of
    16 (AVX-512), 8 (AVX2 + FMA) or 4 lanes (SSE); AMD Zen 4 runs AVX-512 on two 256-bit
    pipes (16)."""
    flags = cpu_flags() if flags is None else flags
    if "avx512f" in flags:
        return 16 if "AMD" in vendor else 32
    return 16 if "fma" in flags and "avx2" in flags else 8


def cpu_fp32_peak(threads: int, ghz: float | None = None,
                  fmas_per_cycle: int | None = None) -> tuple[float, str]:
    """(fp32 multiply-add peak of ``threads`` cores in GMAC/s, how it was computed): cores x
    clock x FMAs per cycle (:func:`fp32_fmas_per_cycle`); nan where the clock is unknown."""
    vendor = next((line.partition(":")[2].strip() for line in _cpuinfo_lines()
                   if line.startswith("vendor_id")), "")
    ghz = ghz or cpu_clock_ghz() or float("nan")
    fmas = fmas_per_cycle or fp32_fmas_per_cycle(vendor="AMD" if "AMD" in vendor else vendor)
    return threads * ghz * fmas, f"{threads} cores x {ghz:.2f} GHz x {fmas} fp32 FMA/cycle"


def _cpuinfo_lines() -> list[str]:
    try:
        return Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return []


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
    if cpu_amp == "bf16" or cpu_has_native_bf16():
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
