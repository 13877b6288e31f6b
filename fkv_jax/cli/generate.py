"""``fkv generate`` (alias ``python -m fkv_jax.generate``): latent videos with the AR KV-cache sampler."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from fkv_jax.cli import Parser, UsageError, run_cli
from fkv_jax.cli import args as A
from fkv_jax.cli import common as C

DESCRIPTION = """\
Generate videos autoregressively, chunk by chunk, with a fixed-shape KV cache.

Model: the default is the embedded toy-world model shipped with the package (a causal Wan with the same
transformer, cache, sampler and policies as the real models, 32x32 pixel frames of moving sprites; see
docs/toyworld.md). It draws the sprites its prompt names, e.g. "a red circle and a blue square", and writes
one mp4 per prompt and seed to --output-dir in under a minute on a CPU. Its words: a, and, with, pillar, red, green,
blue, yellow, magenta, cyan, circle, square, triangle, cross. --toy-weights DIR uses weights you trained.
--checkpoint DIR loads a checkpoint converted by `fkv convert` (it needs --text-embeddings).
--model-preset NAME (tiny, mid, wan2.1-t2v-1.3b alias 1.3b) runs a random-weight model of that preset: its
output is noise-like latents, useful to time the loop at a model's shapes.
--model-dir DIR (built by `fkv convert --wan-dir WAN2.1_DOWNLOAD --generator GEN.pt --output DIR`) is text to
video: UMT5 encodes the prompts, each chunk is decoded by the VAE as it is made and appended to an mp4;
--switch-frames / --schedule switch prompts mid-video (LongLive).

Replay: --noise-file FILE.npz with `noise` [B, F, C, H, W] and `renoise`
[num_blocks, num_steps-1, B, frames_per_block, C, H, W] reproduces a recorded PyTorch rollout."""

EPILOG = """\
cache modes (upstream parameter names):
  --local-attn-size -1           global attention: every frame is kept (capacity --frames or --cache-frames)
  --local-attn-size N --sink-size S
                                 rolling window of N frames, counting the S sink frames and the current chunk

sampler presets (Wan models): self_forcing (shift 5, 4 warped steps, global), longlive (same, window 12 +
  sink 3), causvid (shift 8, 3 steps, global). The toy model uses its own sampler (the `toy` preset).

exit codes: 0 done, 2 bad input (one 'error: ...' line, nothing written), 130 interrupted.
"""

PIPELINE_FLAGS = ("batch_size", "switch_frames", "schedule", "no_global_sink")


def build_parser(prog: str = "fkv generate") -> Parser:
    p = Parser(prog=prog, description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    A.add_model_args(p)
    A.add_text_args(p)
    A.add_sampler_args(p)
    A.add_policy_args(p)
    A.add_backend_args(p)
    A.add_output_args(p, only={"output_dir", "save_latents", "fps", "no_progress"})
    g = p.add_argument_group("text to video (--model-dir): prompts -> mp4")
    g.add_argument(
        "--model-dir",
        type=Path,
        help="model folder from `fkv convert --wan-dir ... --generator ...` "
        "(transformer/, vae/, text_encoder/, tokenizer/)",
    )
    g.add_argument("--batch-size", type=int, help="videos generated together (default 1)")
    g.add_argument(
        "--switch-frames",
        help="LongLive prompt switching: latent frames at which the 2nd, 3rd, ... "
        "line of --prompts starts, e.g. 40,80 (one video)",
    )
    g.add_argument(
        "--schedule",
        type=Path,
        help="prompt schedule file (.yaml/.json: [{prompt, start_frame}, ...] "
        "or {prompts, switch_frames}; .jsonl: one segment per line)",
    )
    g.add_argument(
        "--no-global-sink", action="store_true", help="on a switch, re-cache the sink too (LongLive global_sink: false)"
    )
    return p


def wants_pipeline(args) -> bool:
    return args.model_dir is not None or any(getattr(args, f, None) not in (None, False) for f in PIPELINE_FLAGS)


def _noise_file(args) -> dict | None:
    if args.noise_file is None:
        return None
    C.check_input_file(args.noise_file, "--noise-file")
    try:
        with np.load(args.noise_file, allow_pickle=False) as z:
            npz = {k: z[k] for k in z.files}
    except Exception as e:  # noqa: BLE001
        raise UsageError(f"cannot read --noise-file {args.noise_file}: {type(e).__name__}: {e}") from None
    missing = [k for k in ("noise", "renoise") if k not in npz]
    if missing:
        raise UsageError(f"--noise-file {args.noise_file} lacks key(s) {missing} (has {sorted(npz)})")
    return npz


def run(args) -> Path:
    if wants_pipeline(args):  # --model-dir: text -> mp4 with the VAE (fkv_jax/pipeline.py)
        from fkv_jax.cli.t2v import run_model_dir

        return run_model_dir(args)
    # ---- every cheap check first: flags, files, sizes, policy, backend; no weights read ----
    kind = C.model_kind(args)
    seeds = C.seeds_of(args)
    if len(seeds) > 1 and kind != "toy":
        raise UsageError(
            "--seeds (several videos from one prompt) works with the toy model and --model-dir; the "
            "random-weight and --checkpoint models take one --seed"
        )
    if args.fps is not None and kind != "toy":
        raise UsageError(
            "--fps sets the frame rate of an mp4: it applies to the toy-world model and --model-dir; "
            "--checkpoint and --model-preset write latents"
        )
    if args.fps is not None and args.fps <= 0:
        raise UsageError(f"--fps must be positive, got {args.fps:g}")
    C.check_at_least("--cache-frames", args.cache_frames, 1)
    if args.frames is not None and args.frames < 1:
        raise UsageError(f"--frames must be a positive multiple of the chunk size, got {args.frames}")
    if args.save_latents is not None:
        C.check_output_file(args.save_latents, "--save-latents", (".npy",))
    C.check_output_dir(args.output_dir, "--output-dir")
    cfg, stored_dtype = C.model_config(args, kind)
    sampler_cfg = C.sampler_config(args, kind)
    noise_npz = _noise_file(args)
    if noise_npz is not None and len(seeds) > 1:
        raise UsageError("--noise-file fixes the noise; it cannot go with --seeds")
    prompts, emb_file = C.text_source(args, kind)
    if kind == "toy" and prompts is not None:
        C.check_toy_words(prompts, cfg)
    latent_hw = C.parse_hw(args.latent_size) if args.latent_size else tuple(cfg.latent_hw)
    if noise_npz is not None:
        noise = noise_npz["noise"]
        if noise.ndim != 5 or noise.shape[2] != cfg.in_dim:
            raise UsageError(f"--noise-file `noise` has shape {noise.shape}; expected [B, F, {cfg.in_dim}, H, W]")
        if args.latent_size and tuple(noise.shape[3:]) != latent_hw:
            raise UsageError(
                f"--latent-size {args.latent_size} is not the --noise-file's {noise.shape[3]}x{noise.shape[4]}"
            )
        latent_hw = tuple(noise.shape[3:])
        if args.frames is not None and args.frames > noise.shape[1]:
            raise UsageError(f"--frames {args.frames} is more than the {noise.shape[1]} frames in --noise-file")
        frames = args.frames if args.frames is not None else noise.shape[1]
    else:
        frames = args.frames if args.frames is not None else (48 if kind == "toy" else 21)
    C.check_frames(frames, sampler_cfg)
    try:
        cfg.grid_hw(latent_hw)
    except ValueError as e:
        raise UsageError(f"--latent-size: {e}") from None
    dtype = args.dtype or stored_dtype
    policy = C.build_policy(args, cfg, kind)
    C.check_backend(args.attention_backend, cfg, latent_hw, dtype, args.cache_dtype, sampler_cfg.frames_per_block)
    C.check_mesh(args.mesh)
    # the sampler on the abstract model: checks cache, policy and video length before loading weights
    from flax import nnx

    from fkv_jax.checkpoint import DTYPES
    from fkv_jax.model.build import abstract_model
    from fkv_jax.sampling.rollout import Sampler

    batch = (len(prompts) * len(seeds)) if prompts is not None else None
    if batch is None:
        ctx = C.embeddings_context(emb_file, cfg)
        batch = ctx.shape[0]
    if noise_npz is not None and noise_npz["noise"].shape[0] != batch:
        raise UsageError(f"--noise-file `noise` has {noise_npz['noise'].shape[0]} videos; the text gives {batch}")
    graphdef = nnx.split(abstract_model(cfg, DTYPES[dtype]), nnx.Param)[0]
    kw = dict(
        batch=batch,
        latent_hw=latent_hw,
        num_frames=frames,
        cache_frames=args.cache_frames,
        policy=policy,
        attention_backend=args.attention_backend,
        rope_mode=args.rope_mode,
        cache_dtype=args.cache_dtype,
    )

    def make_sampler(graphdef):
        try:
            if args.mesh:
                from fkv_jax.parallel import ShardedSampler, make_mesh

                s = ShardedSampler(graphdef, cfg, sampler_cfg, mesh=make_mesh(args.mesh), **kw)
            else:
                s = Sampler(graphdef, cfg, sampler_cfg, **kw)
            s.check_length(frames)
        except ValueError as e:
            raise UsageError(str(e)) from None
        return s

    sampler = make_sampler(graphdef)
    n, c = sampler.schedule.num_steps, sampler_cfg.frames_per_block
    renoise = None
    if noise_npz is not None:
        renoise = noise_npz["renoise"].astype(np.float32)
        want = (frames // c, n - 1, batch, c, cfg.in_dim, *latent_hw)
        if renoise.ndim != 7 or renoise.shape[1:] != want[1:] or renoise.shape[0] < want[0]:
            raise UsageError(
                f"--noise-file `renoise` has shape {renoise.shape}; expected "
                f"[num_blocks={want[0]}, steps-1={n - 1}, B={batch}, {c}, {cfg.in_dim}, *{latent_hw}]"
            )
        renoise = renoise[: want[0]]
    # output names, decided now (never overwriting an existing file)
    taken: set[Path] = set()
    tags = "".join(f"_{t}" for t in C.output_tags(args, kind))
    videos = []
    if kind == "toy":
        from fkv_jax.pipeline import slug

        labels = prompts if prompts is not None else [f"video{i}" for i in range(batch)]
        videos = [
            C.unique_path(args.output_dir / f"{i:03d}_{slug(p)}_seed{s}{tags}.mp4", taken)
            for i, p in enumerate(labels)
            for s in seeds
        ]
    lat_path = args.save_latents
    if lat_path is None and kind != "toy":
        lat_path = C.unique_path(args.output_dir / f"latents_seed{seeds[0]}{tags}.npy", taken)

    # ---- heavy work ----
    C.enable_compilation_cache()
    if args.distributed:
        import jax

        jax.distributed.initialize()
    progress = not args.no_progress
    C.print_estimate(cfg, sampler, frames, batch)
    t0 = time.perf_counter()
    cfg, model, text_encoder, what = C.load_model(args, kind, progress)
    loaded_graphdef, params = nnx.split(model, nnx.Param)
    if loaded_graphdef != graphdef:  # e.g. a dtype cast at load: same shapes, checked above; nothing compiled yet
        sampler = make_sampler(loaded_graphdef)
    if prompts is not None:
        per_prompt = C.prompts_context(prompts, cfg, kind, text_encoder)
        ctx = np.repeat(per_prompt, len(seeds), axis=0)  # [P * S, L, D]: prompt-major, like the file names
    if noise_npz is not None:
        noise = noise_npz["noise"][:, :frames].astype(np.float32)
    else:  # one draw per video from its own seed: a video does not depend on what else is in the batch
        shape = (1, frames, cfg.in_dim, *latent_hw)
        noise = np.concatenate(
            [
                np.random.default_rng(s).standard_normal(shape, np.float32)
                for _ in range(batch // len(seeds))
                for s in seeds
            ]
        )
    geom = sampler.geom
    mode = "global" if geom.global_attn else f"rolling (sink {geom.sink} + {geom.ring} history frames + chunk {c})"
    if args.policy:
        mode = f"policy {args.policy}, {mode}"
    print(
        f"model: {what}; {frames} latent frames of {latent_hw[0]}x{latent_hw[1]}, batch {batch}; cache: {mode}, "
        f"{geom.kv_bytes() / 2**20:.1f} MiB KV; steps {[round(float(t), 1) for t in sampler.schedule.timesteps[:-1]]}"
        f"; the first chunk includes compilation",
        file=sys.stderr,
    )
    lat = sampler.generate(params, ctx, noise, renoise=renoise, seed=seeds[0], progress=progress)
    written = []
    from fkv_jax.video import save_npy_atomic

    if lat_path is not None:
        C.make_dir(lat_path.parent, "--save-latents folder")
        save_npy_atomic(lat_path, lat)
        written.append(f"{lat_path} {list(lat.shape)} float32")
    if kind == "toy":  # pixel frames in [-1, 1]: one mp4 per prompt and seed
        from fkv_jax.toyworld.video import save_mp4

        C.make_dir(args.output_dir, "--output-dir")
        for i, path in enumerate(videos):
            written.append(str(save_mp4(path, np.clip(lat[i], -1, 1), fps=args.fps or 8)))
    dt = time.perf_counter() - t0
    print(
        f"wrote {', '.join(written)} in {dt:.1f} s ({sampler.trace_count} compilation(s) of the chunk step)",
        file=sys.stderr,
    )
    return args.output_dir if kind == "toy" else lat_path


def main(argv=None, prog: str = "fkv generate") -> int:
    return run_cli(lambda: build_parser(prog), run, argv)
