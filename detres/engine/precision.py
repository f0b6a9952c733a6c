"""The precision training computes in (``train.amp``): autocast on CUDA, and on CPUs that
compute bf16 natively (detres.cpu); float32 elsewhere, said once per process."""
from __future__ import annotations

import logging

import torch

from detres.cpu import cpu_has_native_bf16

logger = logging.getLogger("detres")
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
_notices: set[str] = set()       # said once per process, not once per stage


def training_amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of training, None for float32: ``amp`` on CUDA; on a CPU bf16 only
    where it computes bf16 natively (``detres.cpu``): elsewhere oneDNN emulates it, slower
    than float32, and fp16 has no CPU kernels worth using."""
    if amp not in ("none", *AMP_DTYPES):
        raise ValueError(f"unknown amp {amp!r}; valid: none, bf16, fp16")
    if amp == "none" or device.type == "cuda":
        return AMP_DTYPES.get(amp)
    if amp == "bf16" and device.type == "cpu" and cpu_has_native_bf16():
        return torch.bfloat16
    notice = (f"train.amp={amp} applies on CUDA and on CPUs with bf16 arithmetic "
              f"(avx512_bf16, amx_bf16); training in float32 on {device}")
    if notice not in _notices:
        _notices.add(notice)
        logger.info(notice)
    return None
