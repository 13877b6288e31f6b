"""Command line: ``python -m fkv_jax.eval`` (policies vs full on the toy world; see harness.py for definitions).

    python -m fkv_jax.eval                                    # 2 episodes x 120 frames, the seed policies
    python -m fkv_jax.eval --policies sink_window forcing_kv focused_forcing h2o --episodes 4
    python -m fkv_jax.eval --vbench-dir vbench_videos         # also keep the mp4s, named as VBench expects
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fkv_jax.eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--policies", nargs="+", default=["sink_window", "forcing_kv", "focused_forcing"],
                   help="policies compared with full (Forcing-KV / Focused Forcing are profiled on the toy model)")
    p.add_argument("--episodes", type=int, default=2, help="simulated scenes (prompt + truth) per policy")
    p.add_argument("--frames", type=int, default=120, help="latent frames per video (default 120)")
    p.add_argument("--context-frames", type=int, default=3, help="true frames given as clean context (default 3)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output-dir", type=Path, default=Path("outputs/eval"), help="eval.md, eval.json, plots")
    p.add_argument("--weights", help="exported toy weights directory (default: the shipped ones)")
    p.add_argument("--no-plots", action="store_true", help="skip the matplotlib figures")
    p.add_argument("--vbench-dir", type=Path, help="write every video as DIR/<policy>/<prompt>-<index>.mp4 "
                                                   "(VBench's naming) for external evaluation")
    args = p.parse_args(argv)
    if args.episodes < 1:
        p.error("--episodes must be >= 1")
    from fkv_jax.eval.harness import evaluate

    try:
        report = evaluate(args.policies, episodes=args.episodes, frames=args.frames,
                          context_frames=args.context_frames, seed=args.seed, out_dir=args.output_dir,
                          weights=args.weights, plots=not args.no_plots, vbench_dir=args.vbench_dir,
                          log=lambda m: print(m, file=sys.stderr))
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print((args.output_dir / "eval.md").read_text())
    return 0 if report else 1


if __name__ == "__main__":
    sys.exit(main())
