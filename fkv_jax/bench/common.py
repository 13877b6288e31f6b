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


def time_step(step, args, donated: int = 2, repeats: int = 3) -> float:
    """Min wall time of ``step(*args)`` over ``repeats`` runs, each on fresh copies of the first ``donated``
    arguments after the first (the ones the step donates). The min is robust to other load on the machine."""
    import time

    import jax
    import jax.numpy as jnp

    best = float("inf")
    for _ in range(repeats):
        fresh = list(args)
        for i in range(1, 1 + donated):
            fresh[i] = jax.tree.map(jnp.copy, args[i])
        jax.block_until_ready(fresh)
        t0 = time.perf_counter()
        jax.block_until_ready(step(*fresh))
        best = min(best, time.perf_counter() - t0)
    return best
