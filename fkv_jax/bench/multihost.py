"""Data-parallel scaling over processes: the same toy-model job on 1, 2 and 4 processes of this machine.

    python -m fkv_jax.bench.multihost                      # 16 videos, global batch 4, 1 / 2 / 4 processes
    python -m fkv_jax.bench.multihost --processes 1,2 --videos 8 --repeats 3

Each run is ``fkv generate --local-processes N --resume`` in a fresh folder: N processes with one CPU device
each (XLA_FLAGS=--xla_force_host_platform_device_count=1), mesh ``data=N``, the same prompts, seeds, frames
and global batch, so the total work is the same for every N; each process computes batch/N rows of every
batch. Two numbers per N, medians over ``--repeats`` runs:

* end to end: wall time of the whole command (process start-up, model load, compilation included);
* steady state: videos per second over the batches after the first (the first includes compilation), from the
  per-batch ``seconds`` the job writes to its manifest.

Ratios are against 1 process. On one machine the processes share its cores: with C cores, N processes can
only speed up to min(N, C) over 1, minus what XLA's own threads already used in the 1-process run; the
measurement checks the plumbing (sharding, gathers, the manifest) costs little, not cluster scaling.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fkv_jax.bench.common import median

WORDS = ["red", "green", "blue", "yellow", "magenta", "cyan"]
SHAPES = ["circle", "square", "triangle", "cross"]


def prompts(n: int) -> list[str]:
    return [f"a {WORDS[i % len(WORDS)]} {SHAPES[(i // len(WORDS)) % len(SHAPES)]}" for i in range(n)]


def run_once(processes: int, videos: int, batch: int, frames: int, work: Path) -> tuple[float, float]:
    """(end-to-end seconds, steady-state videos per second) of one job."""
    work.mkdir(parents=True)
    (work / "prompts.txt").write_text("\n".join(prompts(videos)) + "\n")
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    cmd = [sys.executable, "-m", "fkv_jax.generate", "--prompts", str(work / "prompts.txt"), "--frames", str(frames)]
    cmd += ["--batch-size", str(batch), "--output-dir", str(work / "out"), "--resume", "--no-progress"]
    cmd += ["--local-processes", str(processes)]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode:
        raise SystemExit(f"error: {processes}-process run failed (exit {r.returncode}):\n{r.stderr[-2000:]}")
    entries = [json.loads(x) for x in (work / "out" / "manifest.jsonl").read_text().splitlines()]
    if len(entries) != videos:
        raise SystemExit(f"error: {processes}-process run wrote {len(entries)} of {videos} videos")
    per_batch = {e["batch"]: e["seconds"] for e in entries if e["batch"] > 0}
    n_steady = sum(1 for e in entries if e["batch"] > 0)
    return wall, n_steady / sum(per_batch.values()) if per_batch else float("nan")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m fkv_jax.bench.multihost",
        description=__doc__.split("\n\n")[0] + " Prints end-to-end and steady-state ratios against 1 process.",
    )
    p.add_argument("--processes", default="1,2,4", help="comma-separated process counts (default 1,2,4)")
    p.add_argument("--videos", type=int, default=16, help="videos in the job (default 16)")
    p.add_argument("--batch", type=int, default=4, help="global batch, a multiple of every process count (default 4)")
    p.add_argument("--frames", type=int, default=6, help="frames per video, a multiple of 3 (default 6)")
    p.add_argument("--repeats", type=int, default=1, help="runs per process count; medians are reported (default 1)")
    args = p.parse_args(argv)
    try:
        counts = [int(x) for x in args.processes.split(",") if x]
    except ValueError:
        print(f"error: --processes must be comma-separated integers, got {args.processes!r}", file=sys.stderr)
        return 2
    bad = [n for n in counts if n < 1 or args.batch % n]
    if bad or args.videos < 2 * args.batch or args.repeats < 1 or args.frames < 3 or args.frames % 3:
        print(
            "error: every --processes count must divide --batch, --videos must be at least 2 batches, "
            "--frames a positive multiple of 3, --repeats >= 1",
            file=sys.stderr,
        )
        return 2
    from tqdm.auto import tqdm

    results = {}
    with (
        tempfile.TemporaryDirectory(prefix="fkv-multihost-") as tmp,
        tqdm(total=len(counts) * args.repeats, desc="jobs", unit="job") as bar,
    ):
        for n in counts:
            runs = []
            for rep in range(args.repeats):
                runs.append(run_once(n, args.videos, args.batch, args.frames, Path(tmp) / f"p{n}_r{rep}"))
                bar.update(1)
            results[n] = (median(w for w, _ in runs), median(v for _, v in runs))
    base_wall, base_rate = results[counts[0]]
    print(
        f"toy model, {args.videos} videos of {args.frames} frames, global batch {args.batch}, one CPU device per "
        f"process, {os.cpu_count()} cores; medians of {args.repeats} run(s); ratios against {counts[0]} process(es)"
    )
    print(f"{'processes':>9}  {'end-to-end s':>12}  {'ratio':>6}  {'steady videos/s':>15}  {'ratio':>6}")
    for n, (wall, rate) in results.items():
        print(f"{n:>9}  {wall:>12.1f}  {base_wall / wall:>6.2f}  {rate:>15.2f}  {rate / base_rate:>6.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
