"""The CPU's fp32 multiply-add peak, which the speed benchmarks set their GMAC/s against:
cores x clock x FMAs per cycle from the vector width (/proc/cpuinfo, read by detres.cpu)."""
from __future__ import annotations

from detres.cpu import cpu_flags, cpuinfo


def fp32_fmas_per_cycle(flags: frozenset[str] | None = None, vendor: str = "") -> int:
    """fp32 multiply-adds per cycle of one core from its vector width: two FMA pipes of
    16 (AVX-512), 8 (AVX2 + FMA) or 4 lanes (SSE); AMD Zen 4 runs AVX-512 on two 256-bit
    pipes (16)."""
    flags = cpu_flags() if flags is None else flags
    if "avx512f" in flags:
        return 16 if "AMD" in vendor else 32
    return 16 if "fma" in flags and "avx2" in flags else 8


def cpu_clock_ghz() -> float | None:
    """The first core's clock from ``cpu MHz`` (GHz), None where absent."""
    try:
        return float(cpuinfo()["cpu MHz"]) / 1000
    except (KeyError, ValueError):
        return None


def cpu_fp32_peak(threads: int, ghz: float | None = None,
                  fmas_per_cycle: int | None = None) -> tuple[float, str]:
    """(fp32 multiply-add peak of ``threads`` cores in GMAC/s, how it was computed); nan where
    the clock is unknown."""
    vendor = cpuinfo().get("vendor_id", "")
    ghz = ghz or cpu_clock_ghz() or float("nan")
    fmas = fmas_per_cycle or fp32_fmas_per_cycle(vendor=vendor)
    return threads * ghz * fmas, f"{threads} cores x {ghz:.2f} GHz x {fmas} fp32 FMA/cycle"
