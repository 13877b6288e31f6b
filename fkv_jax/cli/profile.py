"""``fkv profile`` (alias ``python -m fkv_jax.profile``): offline head profiling.

    fkv profile heads --frames 24 --output heads.json              # Forcing-KV static/dynamic table
    fkv profile importance --frames 24 --output importance.json    # per-head ablation scores
    fkv profile heads --prompts toy_prompts.txt --seeds 2 --frames 45 --output heads.json
    fkv profile heads --checkpoint DIR --text-embeddings a.npy --text-embeddings b.npy --output heads.json

``heads`` writes a table in the upstream Forcing-KV JSON format (use it with ``--head-table``);
``importance`` writes ``{"<layer * num_heads + head>": score}`` (use it with ``--head-importance``).
Both run the real sampler on calibration inputs: one run per text embedding file (or prompt) and seed.
The default model is the embedded toy-world model, profiled with its own sampler and a global cache (its
shipped tables, fkv_jax/toyworld/weights/forcingkv_heads.json and head_importance.json, were made this way);
``--model-preset tiny`` profiles a random-weight model.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import numpy as np

from fkv_jax.cli import Parser, UsageError, run_cli
from fkv_jax.cli import args as A
from fkv_jax.cli import common as C


def build_parser(prog: str = "fkv profile") -> Parser:
    p = Parser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="{heads,importance}")
    common = Parser(add_help=False)
    A.add_model_args(common, only={"checkpoint", "toy_weights", "model_preset", "dtype"})
    A.add_text_args(common, only={"prompt", "prompts", "text_embeddings"}, repeat_embeddings=True)
    A.add_sampler_args(common, only={"preset", "frames", "latent_size", "seed"}, frames_default=21)
    common.add_argument("--seeds", type=int, default=1, help="noise seeds per calibration input (default 1)")
    A.add_output_args(common, only={"output", "no_progress"})
    h = sub.add_parser("heads", parents=[common], help="Forcing-KV static/dynamic head table from attention mass")
    h.add_argument("--threshold", type=float, default=0.8, help="static when the mass ratio >= this (0.8)")
    h.add_argument("--last-k", type=int, default=4, help="key frames counted as 'current chunk + anchor' (4)")
    h.add_argument("--skip-first-k", type=int, default=3, help="key frames (sink) left out of the total (3)")
    h.add_argument(
        "--min-frame", type=int, help="score chunks starting at or after this frame (default skip-first-k + last-k)"
    )
    h.add_argument(
        "--steps", help="comma-separated calls of a chunk to use: 0..n-1 denoising, n = clean pass (default: all)"
    )
    sub.add_parser(
        "importance",
        parents=[common],
        help="per-head importance: deviation of the rollout with one head masked (relative L2)",
    )
    return p


def run(args) -> Path:
    kind = C.model_kind(args)
    C.check_at_least("--seed", args.seed, 0)
    C.check_at_least("--seeds", args.seeds, 1)
    if args.frames < 6 or args.frames % 3:
        raise UsageError(f"--frames must be a multiple of 3 and at least 6, got {args.frames}")
    C.check_output_file(args.output, "--output", (".json",))
    if args.command == "heads":
        if not 0 < args.threshold <= 1:
            raise UsageError(f"--threshold must be in (0, 1], got {args.threshold}")
        C.check_at_least("--last-k", args.last_k, 1)
        C.check_at_least("--skip-first-k", args.skip_first_k, 0)
        steps = C.parse_int_list(args.steps, "--steps", minimum=0) if args.steps else None
    cfg, _ = C.model_config(args, kind)
    args.prompt_arg = None
    prompts, emb_files = C.text_source(args, kind)
    if kind == "toy" and prompts is not None:
        C.check_toy_words(prompts, cfg)
    latent_hw = C.parse_hw(args.latent_size) if args.latent_size else tuple(cfg.latent_hw)
    try:
        cfg.grid_hw(latent_hw)
    except ValueError as e:
        raise UsageError(f"--latent-size: {e}") from None
    # the profilers read every cached frame: a global cache whatever the preset's window
    sampler_cfg = dataclasses.replace(C.base_sampler_config(args, kind), local_attn_size=-1, sink_size=0)
    contexts = [C.embeddings_context(f, cfg) for f in emb_files] if emb_files else None

    from flax import nnx

    from fkv_jax.policies.heads import save_importance
    from fkv_jax.policies.calibration import head_importance, profile_static_dynamic
    from fkv_jax.sampling.rollout import Sampler

    progress = not args.no_progress
    cfg, model, text_encoder, what = C.load_model(args, kind, progress)
    graphdef, params = nnx.split(model, nnx.Param)
    if contexts is None:
        batch = C.prompts_context(prompts, cfg, kind, text_encoder)
        contexts = [batch[i : i + 1] for i in range(batch.shape[0])]
    runs = []
    for ci, ctx in enumerate(contexts):
        for s in range(args.seeds):
            rng = np.random.default_rng((args.seed, ci, s))
            runs.append((ctx[:1], rng.standard_normal((1, args.frames, cfg.in_dim, *latent_hw), np.float32)))

    def make_sampler(policy):
        return Sampler(graphdef, cfg, sampler_cfg, batch=1, latent_hw=latent_hw, num_frames=args.frames, policy=policy)

    C.make_dir(args.output.parent, "--output folder")
    print(f"profiling {what}: {len(runs)} calibration run(s) of {args.frames} frames", file=sys.stderr)
    if args.command == "heads":
        try:
            table, scores = profile_static_dynamic(
                make_sampler,
                params,
                runs,
                threshold=args.threshold,
                last_k=args.last_k,
                skip_first_k=args.skip_first_k,
                min_frame=args.min_frame,
                steps=steps,
                seed=args.seed,
                progress=progress,
            )
        except ValueError as e:
            raise UsageError(str(e)) from None
        table.save(args.output)
        st, dy = table.counts()
        print(
            f"wrote {args.output}: {st} static / {dy} dynamic heads; score range "
            f"{scores.min():.3f}..{scores.max():.3f} (use it with --policy forcing_kv --head-table {args.output})",
            file=sys.stderr,
        )
        if scores.size <= 64:  # small models: every head's score (static when >= --threshold)
            for layer, row in enumerate(np.asarray(scores)):
                print(f"  layer {layer}: " + " ".join(f"{x:.3f}" for x in row), file=sys.stderr)
    else:
        try:
            scores = head_importance(make_sampler, params, runs, seed=args.seed, progress=progress)
        except ValueError as e:
            raise UsageError(str(e)) from None
        save_importance(args.output, scores)
        print(
            f"wrote {args.output}: {scores.size} head scores, range {scores.min():.4g}..{scores.max():.4g} "
            f"(use it with --policy focused_forcing --head-importance {args.output})",
            file=sys.stderr,
        )
    return args.output


def main(argv=None, prog: str = "fkv profile") -> int:
    return run_cli(lambda: build_parser(prog), run, argv)
