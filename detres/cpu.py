"""What the CPU can compute: its /proc/cpuinfo, read once, and whether it has bf16 arithmetic.

Training (``train.amp``) and inference (``test.cpu_amp``) both turn bf16 autocast on for
``auto`` only where the CPU computes bf16 in hardware: elsewhere oneDNN emulates it, slower
than float32.
"""
from __future__ import annotations

import functools
import os
from pathlib import Path

# /proc/cpuinfo flags of native bf16 arithmetic: AVX-512 BF16 dot products (Cooper Lake,
# Zen 4 and later) and AMX tiles (Sapphire Rapids and later)
BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@functools.cache
def cpuinfo(path: str = "/proc/cpuinfo") -> dict[str, str]:
    """The first processor's ``key: value`` fields of ``path`` (Linux); empty where absent."""
    try:
        text = Path(path).read_text()
    except OSError:
        return {}
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if fields:
                break                      # the first processor's block is enough
            continue
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip(), value.strip())
    return fields


def cpu_flags(path: str = "/proc/cpuinfo") -> frozenset[str]:
    """The CPU's feature flags; empty where /proc/cpuinfo is absent."""
    return frozenset(cpuinfo(path).get("flags", "").split())


# oneDNN instruction sets (ONEDNN_MAX_CPU_ISA) that leave out bf16 arithmetic
ISA_WITHOUT_BF16 = ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE",
                    "AVX512_CORE_VNNI")


def cpu_has_native_bf16(flags: frozenset[str] | None = None,
                        max_isa: str | None = None) -> bool:
    """Whether the CPU computes bf16 in hardware (``flags`` default: :func:`cpu_flags`) and
    oneDNN may use it: ``ONEDNN_MAX_CPU_ISA`` (``max_isa`` default: the environment's) set to
    an instruction set without bf16 makes oneDNN emulate it, as on a CPU without."""
    flags = cpu_flags() if flags is None else flags
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA", "") if max_isa is None else max_isa
    if isa.strip().upper() in ISA_WITHOUT_BF16:
        return False
    return any(f in flags for f in BF16_FLAGS)
