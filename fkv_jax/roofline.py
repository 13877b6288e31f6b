"""Roofline estimates from compiled cost: published chip peaks and ``max(flops / peak, bytes / bandwidth)``.

Nothing here is a measurement. The numbers are the vendors' published peaks (sources in
docs/accelerators.md); a roofline time is a lower bound on what a program of that many FLOPs and HBM bytes
can take on the chip: it assumes perfect overlap of compute and memory traffic and peak rates for both.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str
    kind: str  # "tpu" or "gpu"
    bf16_flops: float  # dense bf16 peak, FLOP/s
    hbm_bytes: float  # HBM capacity per chip (per device), bytes
    hbm_bandwidth: float  # bytes/s
    topology: str | None = None  # default libtpu topology for a deviceless compile (TPU only)
    source: str = ""


GB = 1e9
# Published peaks (see docs/accelerators.md for the pages). HBM capacities are the vendors' "GB" (10^9 bytes
# for GPUs; Google's per-chip "GB" figures are used as given).
CHIPS: dict[str, Chip] = {
    "tpu-v5e": Chip("tpu-v5e", "tpu", 197e12, 16 * GB, 819 * GB, "v5e:2x2", "cloud.google.com/tpu/docs/v5e"),
    "tpu-v5p": Chip("tpu-v5p", "tpu", 459e12, 95 * GB, 2765 * GB, "v5p:2x2x1", "cloud.google.com/tpu/docs/v5p"),
    "tpu-v6e": Chip("tpu-v6e", "tpu", 918e12, 32 * GB, 1638 * GB, "v6e:2x2", "cloud.google.com/tpu/docs/v6e"),
    "h100": Chip("h100", "gpu", 989e12, 80 * GB, 3350 * GB, None, "nvidia.com/en-us/data-center/h100 (SXM)"),
    "h200": Chip("h200", "gpu", 989e12, 141 * GB, 4800 * GB, None, "nvidia.com/en-us/data-center/h200 (SXM)"),
}


def chip(name: str) -> Chip:
    try:
        return CHIPS[name]
    except KeyError:
        raise ValueError(f"unknown chip {name!r}; known: {', '.join(CHIPS)}") from None


@dataclasses.dataclass(frozen=True)
class Estimate:
    compute_s: float  # flops / peak
    memory_s: float  # bytes / bandwidth
    seconds: float  # max of the two (the roofline)
    bound: str  # "compute" or "memory"


def estimate(flops: float, bytes_accessed: float, c: Chip) -> Estimate:
    """Roofline time of a program with ``flops`` FLOPs and ``bytes_accessed`` HBM bytes on chip ``c``."""
    if flops < 0 or bytes_accessed < 0:
        raise ValueError(f"flops and bytes must be >= 0, got {flops}, {bytes_accessed}")
    tc, tm = flops / c.bf16_flops, bytes_accessed / c.hbm_bandwidth
    return Estimate(compute_s=tc, memory_s=tm, seconds=max(tc, tm), bound="compute" if tc >= tm else "memory")
