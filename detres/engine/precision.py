"""The precision training computes in (``train.amp``): autocast on CUDA, and on CPUs that
compute bf16 natively (detres.cpu); float32 elsewhere, said once per process."""
from __future__ import annotations

import logging

import torch

from detres.cpu import cpu_has_native_bf16

logger = logging.getLogger("detres")
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
AMP_CHOICES = ("auto", "none", "bf16", "fp16")
_notices: set[str] = set()       # said once per process, not once per stage


def cuda_amp_dtype(amp: str) -> torch.dtype | None:
    """The autocast dtype of ``train.amp`` on CUDA (``auto``: bf16), None for float32."""
    if amp not in AMP_CHOICES:
        raise ValueError(f"unknown amp {amp!r}; valid: {', '.join(AMP_CHOICES)}")
    return torch.bfloat16 if amp == "auto" else AMP_DTYPES.get(amp)


def training_amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of training, None for float32. On CUDA :func:`cuda_amp_dtype`. On a
    CPU ``auto`` trains in float32 (bf16 training's accuracy on the CPU demos is not yet
    measured), ``bf16`` autocasts where the CPU computes bf16 natively (``detres.cpu``);
    elsewhere oneDNN emulates it, slower than float32, and fp16 has no CPU kernels worth
    using, so those train in float32 and say so once."""
    dtype = cuda_amp_dtype(amp)
    if device.type == "cuda" or amp in ("none", "auto"):
        return dtype if device.type == "cuda" else None
    if amp == "bf16" and device.type == "cpu" and cpu_has_native_bf16():
        return torch.bfloat16
    notice = (f"train.amp={amp} applies on CUDA and on CPUs with bf16 arithmetic "
              f"(avx512_bf16, amx_bf16); training in float32 on {device}")
    if notice not in _notices:
        _notices.add(notice)
        logger.info(notice)
    return None
