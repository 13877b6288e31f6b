"""Command line: offline head profiling.

    python -m fkv_jax.profile heads --frames 21 --output heads.json            # Forcing-KV static/dynamic
    python -m fkv_jax.profile importance --frames 9 --output importance.json   # per-head ablation scores
    python -m fkv_jax.profile heads --prompts toy_prompts.txt --seeds 2 --frames 45 --output heads.json
    python -m fkv_jax.profile heads --checkpoint DIR --text-embeddings a.npy --text-embeddings b.npy ...

``heads`` writes a table in the upstream Forcing-KV JSON format (usable with ``--head-table``);
``importance`` writes ``{"<layer * num_heads + head>": score}`` (usable with ``--head-importance``).
Both run the real sampler on calibration inputs: one run per text embedding file (or prompt) and seed.
The default model is the embedded toy-world model (as for ``python -m fkv_jax.generate``), profiled with its
own sampler and a global cache; ``--model-preset tiny`` profiles a random-weight model.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from fkv_jax.cli import UsageError, run_cli
from fkv_jax.generate import _parse_hw, _resolve_text, base_sampler_config, load_model, model_kind


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fkv_jax.profile", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--checkpoint", type=Path, help="converted checkpoint (default: the embedded toy-world model)")
    common.add_argument("--toy-weights", type=Path, help="toy-world weights directory (default: the shipped ones)")
    common.add_argument("--model-preset", help="profile a random-weight model of this preset instead (e.g. tiny)")
    common.add_argument("--text-embeddings", type=Path, action="append", default=[],
                        help=".npy [1, L, text_dim] calibration context (repeatable: one run each)")
    common.add_argument("--prompts", type=Path, help="file of calibration prompts (embedded models only)")
    common.add_argument("--prompt", help="one calibration prompt (embedded models only)")
    common.add_argument("--frames", type=int, default=21, help="latent frames per calibration rollout")
    common.add_argument("--latent-size", help="latent HxW (default: the model preset's)")
    common.add_argument("--preset", help="sampler preset (its steps and shift are used; default self_forcing, "
                                          "the toy sampler for the toy model)")
    common.add_argument("--seeds", type=int, default=1, help="noise seeds per calibration input (default 1)")
    common.add_argument("--seed", type=int, default=0, help="first seed")
    common.add_argument("--output", type=Path, required=True, help="JSON file to write")
    common.add_argument("--no-progress", action="store_true")
    h = sub.add_parser("heads", parents=[common], help="Forcing-KV static/dynamic head table from attention mass")
    h.add_argument("--threshold", type=float, default=0.8, help="static when the mass ratio >= this (0.8)")
    h.add_argument("--last-k", type=int, default=4, help="key frames counted as 'current chunk + anchor' (4)")
    h.add_argument("--skip-first-k", type=int, default=3, help="key frames (sink) left out of the total (3)")
    h.add_argument("--min-frame", type=int, help="score chunks starting at or after this frame "
                                                  "(default skip-first-k + last-k)")
    h.add_argument("--steps", help="comma-separated calls of a chunk to use: 0..n-1 denoising, n = clean pass "
                                   "(default: all)")
    sub.add_parser("importance", parents=[common],
                   help="per-head importance: deviation of the rollout with one head masked (relative L2)")
    return p


def run(args) -> Path:
    kind = model_kind(args)
    if args.frames < 6 or args.frames % 3:
        raise UsageError(f"--frames must be a multiple of 3 and at least 6, got {args.frames}")
    try:
        args.output.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"cannot create {args.output.parent}: {e}") from e

    import dataclasses

    from flax import nnx

    from fkv_jax.policies.heads import save_importance
    from fkv_jax.policies.profile import head_importance, profile_static_dynamic
    from fkv_jax.sampling.rollout import Sampler

    cfg, model, text_encoder, _ = load_model(args, kind)
    graphdef, params = nnx.split(model, nnx.Param)
    contexts = []
    if args.text_embeddings:
        for f in args.text_embeddings:
            ns = argparse.Namespace(prompt=None, prompt_arg=None, prompts=None, text_embeddings=f)
            contexts.append(_resolve_text(ns, cfg, kind, text_encoder)[0])
    else:
        ns = argparse.Namespace(prompt=args.prompt, prompt_arg=None, prompts=args.prompts, text_embeddings=None)
        batch = _resolve_text(ns, cfg, kind, text_encoder)[0]
        contexts = [batch[i:i + 1] for i in range(batch.shape[0])]
    latent_hw = _parse_hw(args.latent_size) if args.latent_size else cfg.latent_hw
    try:
        # the profilers read every cached frame: a global cache whatever the preset's window
        sampler_cfg = dataclasses.replace(base_sampler_config(args, kind == "toy"), local_attn_size=-1, sink_size=0)
        cfg.grid_hw(latent_hw)
    except ValueError as e:
        raise UsageError(str(e)) from e
    runs = []
    for ci, ctx in enumerate(contexts):
        for s in range(args.seeds):
            rng = np.random.default_rng((args.seed, ci, s))
            runs.append((ctx[:1], rng.standard_normal((1, args.frames, cfg.in_dim, *latent_hw), np.float32)))

    def make_sampler(policy):
        return Sampler(graphdef, cfg, sampler_cfg, batch=1, latent_hw=latent_hw, num_frames=args.frames,
                       policy=policy)

    progress = not args.no_progress
    if args.command == "heads":
        steps = [int(x) for x in args.steps.split(",")] if args.steps else None
        try:
            table, scores = profile_static_dynamic(
                make_sampler, params, runs, threshold=args.threshold, last_k=args.last_k,
                skip_first_k=args.skip_first_k, min_frame=args.min_frame, steps=steps, seed=args.seed,
                progress=progress)
        except ValueError as e:
            raise UsageError(str(e)) from e
        table.save(args.output)
        st, dy = table.counts()
        print(f"wrote {args.output}: {st} static / {dy} dynamic heads; score range "
              f"{scores.min():.3f}..{scores.max():.3f}", file=sys.stderr)
        if scores.size <= 64:  # small models: every head's score (static when >= --threshold)
            for layer, row in enumerate(np.asarray(scores)):
                print(f"  layer {layer}: " + " ".join(f"{x:.3f}" for x in row), file=sys.stderr)
    else:
        scores = head_importance(make_sampler, params, runs, seed=args.seed, progress=progress)
        save_importance(args.output, scores)
        print(f"wrote {args.output}: {scores.size} head scores, range {scores.min():.4g}..{scores.max():.4g}",
              file=sys.stderr)
    return args.output


def main(argv=None) -> int:
    return run_cli(build_parser, run, argv)


if __name__ == "__main__":
    sys.exit(main())
