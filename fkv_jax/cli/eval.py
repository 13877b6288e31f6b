"""``fkv eval`` (alias ``python -m fkv_jax.eval``): policies vs the full cache on the toy world (definitions in
fkv_jax/eval/harness.py).

    fkv eval                                    # 2 episodes x 120 frames, the seed policies
    fkv eval --policies sink_window forcing_kv focused_forcing h2o --episodes 4
    fkv eval --vbench-dir vbench_videos         # also keep the mp4s, named as VBench expects
    fkv eval --family memory --policies window --window 6 --context-frames 6 --frames 48 --episodes 16
                                                # does history matter? full against a 6-frame window
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fkv_jax.cli import Parser, UsageError, run_cli
from fkv_jax.cli import args as A
from fkv_jax.cli import common as C

LEGEND = """\
columns: denoise FPS = generated latent frames per second of chunk steps (first chunk, with compilation,
excluded); speedup = denoise FPS / full's; e2e FPS = the same frames over chunk steps + writing the mp4;
KV MiB = resident cache + policy memories; PSNR / SSIM vs full = agreement with the full-cache video;
pos err px = sprite position error against the simulator's truth (lower is better); colour / shape = share
of frames showing the prompted colours / shapes; identity = sprites keep their colour after an occlusion;
chunk disc = jump between consecutive chunks; worst GT degr. = worst relative loss of a truth metric vs
full (positive = worse). Second table: the truth metrics with 95 % bootstrap intervals over episodes;
track_H_px = position error over the first H generated frames; reappear_* = identity and position error in
the first 3 fully visible frames after a sprite was hidden >= --min-hidden frames (the memory family's test)."""


def build_parser(prog: str = "fkv eval") -> Parser:
    p = Parser(prog=prog, description=__doc__, epilog=LEGEND, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--policies",
        nargs="+",
        default=["sink_window", "forcing_kv", "focused_forcing"],
        help="policies compared with full (Forcing-KV / Focused Forcing are profiled on the toy model)",
    )
    p.add_argument("--episodes", type=int, default=2, help="simulated scenes (prompt + truth) per policy")
    A.add_sampler_args(p, only={"frames", "seed"}, frames_default=120)
    p.add_argument("--context-frames", type=int, default=3, help="true frames given as clean context (default 3)")
    p.add_argument(
        "--family",
        choices=("random", "memory"),
        default="random",
        help="episodes: random scenes, or the memory family where a sprite hides in the wrap-around gap for "
        ">= --min-hidden frames and must come back with its identity and velocity (default: random)",
    )
    p.add_argument(
        "--min-hidden",
        type=int,
        default=8,
        help="memory family: the sprite stays hidden for at least this many frames, and the reappearance "
        "metrics count hidden runs at least this long (default 8; more than --window keeps)",
    )
    p.add_argument(
        "--window",
        type=int,
        help="frames the `window` policy keeps (default: the toy sampler's window, the weights' training clip; "
        "e.g. 6 for the memory family)",
    )
    p.add_argument(
        "--toy-weights",
        "--weights",
        dest="weights",
        type=Path,
        help="exported toy weights directory (default: the shipped ones)",
    )
    A.add_output_args(
        p,
        only={"output_dir"},
        output_dir_default=Path("outputs/eval"),
        output_dir_help="where eval.md, eval.json, the plots and the profiled head files go (default: outputs/eval)",
    )
    p.add_argument("--no-plots", action="store_true", help="skip the matplotlib figures")
    p.add_argument(
        "--vbench-dir",
        type=Path,
        help="write every video as DIR/<policy>/<prompt>-<index>.mp4 (VBench's naming) for external evaluation",
    )
    return p


def _check(args) -> None:
    from fkv_jax.policies import POLICIES

    C.check_at_least("--episodes", args.episodes, 1)
    C.check_at_least("--seed", args.seed, 0)
    if args.frames < 1 or args.context_frames < 1:
        raise UsageError(
            f"--frames ({args.frames}) and --context-frames ({args.context_frames}) must be positive multiples of 3"
        )
    C.check_at_least("--min-hidden", args.min_hidden, 1)
    if args.window is not None:
        C.check_at_least("--window", args.window, 1)
        if "window" not in args.policies:
            raise UsageError("--window sets the `window` policy's length; add window to --policies")
    unknown = [p for p in args.policies if p not in POLICIES]
    if unknown:
        raise UsageError(f"unknown policy {unknown[0]!r}; available: {', '.join(sorted(POLICIES))}")
    if args.weights is not None and not (args.weights / "params.npz").is_file():
        raise UsageError(
            f"--toy-weights {args.weights} is not a toy weights directory (no params.npz); export one "
            "with `python -m fkv_jax.toyworld.train --export DIR`"
        )
    C.check_output_dir(args.output_dir, "--output-dir")
    if args.vbench_dir is not None:
        C.check_output_dir(args.vbench_dir, "--vbench-dir")


def _save_profiles(report: dict, out_dir: Path) -> list[Path]:
    """The toy model's profiles, saved for reuse: head importance (--head-importance) and the Forcing-KV head
    table (--head-table; static = mass ratio >= 0.8, the profiler's default threshold)."""
    import numpy as np

    from fkv_jax.policies.heads import HeadTable, save_importance

    written = []
    heads = report.get("profiles", {}).get("forcing_kv_heads")
    if heads is not None:
        dynamic = np.asarray(heads["scores"], np.float64) < 0.8
        if int((~dynamic).sum()) == heads["static"]:  # the rounded scores give the profiler's own split
            path = out_dir / "forcingkv_heads.json"
            HeadTable(dynamic, "fkv eval (toy model)", "static when the attention-mass ratio >= 0.8").save(path)
            written.append(path)
    imp = report.get("profiles", {}).get("head_importance")
    if imp is not None:
        path = out_dir / "head_importance.json"
        save_importance(path, np.asarray(imp, np.float64))
        written.append(path)
    return written


def run(args) -> int:
    _check(args)
    from fkv_jax.eval.harness import evaluate

    C.make_dir(args.output_dir, "--output-dir")
    try:
        report = evaluate(
            args.policies,
            episodes=args.episodes,
            frames=args.frames,
            context_frames=args.context_frames,
            seed=args.seed,
            out_dir=args.output_dir,
            weights=None if args.weights is None else str(args.weights),
            plots=not args.no_plots,
            vbench_dir=args.vbench_dir,
            family=args.family,
            window=args.window,
            min_hidden=args.min_hidden,
            log=lambda m: print(m, file=sys.stderr),
        )
    except (ValueError, FileNotFoundError) as e:
        raise UsageError(str(e)) from None
    print((args.output_dir / "eval.md").read_text())
    print(LEGEND)
    extra = _save_profiles(report, args.output_dir)
    files = sorted(p for p in args.output_dir.iterdir() if p.is_file())
    reuse = {"forcingkv_heads.json": "--head-table", "head_importance.json": "--head-importance"}
    print(
        f"\nwrote {len(files)} file(s) to {args.output_dir}/: "
        + ", ".join(p.name for p in files)
        + "".join(f"; reuse with {reuse[p.name]} {p}" for p in extra)
        + (f"; videos under {args.vbench_dir}/" if args.vbench_dir else "")
    )
    return 0 if report else 1


def main(argv=None, prog: str = "fkv eval") -> int:
    box = {}

    def _run(args):
        box["rc"] = run(args)

    rc = run_cli(lambda: build_parser(prog), _run, argv)
    return rc if rc else box.get("rc", 0)
