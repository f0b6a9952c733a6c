"""What the CPU can compute: its /proc/cpuinfo, read once, and whether it has bf16 arithmetic.

Training (``train.amp``) and inference (``test.cpu_amp``) both turn bf16 autocast on for
``auto`` only where the CPU computes bf16 in hardware: elsewhere oneDNN emulates it, slower
than float32.
"""
from __future__ import annotations

import functools
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


def cpu_has_native_bf16(flags: frozenset[str] | None = None) -> bool:
    """Whether the CPU computes bf16 in hardware (``flags`` default: :func:`cpu_flags`)."""
    flags = cpu_flags() if flags is None else flags
    return any(f in flags for f in BF16_FLAGS)
