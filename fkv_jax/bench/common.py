"""Small helpers shared by the benchmark scripts."""

from __future__ import annotations

import os
import statistics


def rss_mib() -> float:
    """Resident set size of this process in MiB (Linux /proc; nan elsewhere)."""
    try:
        with open(f"/proc/{os.getpid()}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def median(xs) -> float:
    return statistics.median(list(xs))
