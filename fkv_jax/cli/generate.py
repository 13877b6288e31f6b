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
from fkv_jax import jobs as J

DESCRIPTION = """\
Generate videos autoregressively, chunk by chunk, with a fixed-shape KV cache.

Model: the default is the embedded toy-world model shipped with the package (a causal Wan with the same
transformer, cache, sampler and policies as the real models, 24x24 pixel frames of moving sprites; see
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

several processes (docs/cluster.md): --distributed (SLURM, Cloud TPU: auto-detected), or --coordinator HOST:PORT
  --num-processes N --process-id I on every process, or --local-processes N (this machine). Prompts and seeds
  are split over the mesh's data axis (default mesh: data over every device); each process writes the videos
  it holds; process 0 writes the manifest and --save-latents.

batch jobs: --prompts FILE runs in fixed batches (--batch-size). With --resume (or several processes, or
  --manifest FILE) OUTPUT_DIR/manifest.jsonl lists every finished video; --resume also keeps file names fixed
  and skips the videos the manifest lists as complete (rerun the same command after a crash).

exit codes: 0 done, 2 bad input (one 'error: ...' line, nothing written), 1 a process failed (the others name
  it and stop), 130 interrupted.
"""

PIPELINE_FLAGS = ("switch_frames", "schedule", "no_global_sink", "decoder")


def build_parser(prog: str = "fkv generate") -> Parser:
    p = Parser(prog=prog, description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    A.add_model_args(p)
    A.add_text_args(p)
    A.add_sampler_args(p)
    A.add_policy_args(p)
    A.add_backend_args(p)
    A.add_output_args(p, only={"output_dir", "save_latents", "fps", "no_progress"})
    A.add_job_args(p)
    g = p.add_argument_group("text to video (--model-dir): prompts -> mp4")
    g.add_argument(
        "--model-dir",
        type=Path,
        help="model folder from `fkv convert --wan-dir ... --generator ...` "
        "(transformer/, vae/, text_encoder/, tokenizer/)",
    )
    g.add_argument(
        "--decoder",
        choices=("wan", "taehv"),
        help="decoder of the latents: wan (the Wan2.1 VAE; default) or taehv (the tiny TAEHV preview decoder, "
        "tens of times faster, lower fidelity; add DIR/taehv/ with `fkv convert --taehv taew2_1.pth --output DIR`)",
    )
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


def run(args, argv: list[str] | None = None) -> Path | None:
    """Check, join the distributed runtime when asked, generate. ``argv``: the command line (for
    --local-processes, which runs this command N times)."""
    from fkv_jax import distributed as D

    spec = C.cluster_spec(args)
    if args.local_processes is not None:
        return _launch_local(args, argv)
    try:
        with D.session(spec) as rt:
            try:
                return _run(args, rt)
            except BaseException as e:
                if rt.multi and not isinstance(e, SystemExit):
                    _exit_now(rt, e)
                raise
    except D.DistributedError as e:
        if spec is not None and "cannot join" not in str(e) and "found no cluster" not in str(e):
            print(f"error: {e}", file=sys.stderr)
            raise SystemExit(D.EXIT_PEER_FAILED) from None
        raise UsageError(str(e)) from None


def _exit_now(rt, e: BaseException) -> None:
    """A multi-process run ends at once on an error in this process (never waits for the peers at exit)."""
    import os

    from fkv_jax import distributed as D

    if isinstance(e, UsageError):
        print(f"error: {e}", file=sys.stderr, flush=True)
        os._exit(2)
    if isinstance(e, KeyboardInterrupt):
        print("interrupted", file=sys.stderr, flush=True)
        os._exit(130)
    if isinstance(e, D.DistributedError):
        print(f"error: {e}", file=sys.stderr, flush=True)
        os._exit(D.EXIT_PEER_FAILED)
    D.fail_fast(rt, e)


def _launch_local(args, argv: list[str] | None) -> None:
    from fkv_jax.distributed import launch_local

    argv = list(sys.argv[1:] if argv is None else argv)
    rest, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == "--local-processes":
            skip = True
            continue
        if a.startswith("--local-processes="):
            continue
        rest.append(a)
    code = launch_local([sys.executable, "-m", "fkv_jax.generate", *rest], args.local_processes)
    if code:
        raise SystemExit(code)
    return None


def _run(args, rt) -> Path:
    if wants_pipeline(args):  # --model-dir: text -> mp4 with the VAE (fkv_jax/pipeline.py)
        from fkv_jax.cli.t2v import run_model_dir

        return run_model_dir(args, rt)
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
    job_flags = [
        f for f, v in (("--batch-size", args.batch_size), ("--resume", args.resume), ("--manifest", args.manifest)) if v
    ]
    if job_flags and kind != "toy":
        raise UsageError(
            f"{', '.join(job_flags)}: batch jobs write mp4s (the toy model and --model-dir); --checkpoint and "
            "--model-preset write one latents file"
        )
    if job_flags and args.noise_file is not None:
        raise UsageError(f"--noise-file fixes the whole batch; it cannot go with {', '.join(job_flags)}")
    C.check_at_least("--batch-size", args.batch_size, 1)
    if args.fps is not None and args.fps <= 0:
        raise UsageError(f"--fps must be positive, got {args.fps:g}")
    C.check_at_least("--cache-frames", args.cache_frames, 1)
    if args.frames is not None and args.frames < 1:
        raise UsageError(f"--frames must be a positive multiple of the chunk size, got {args.frames}")
    if args.save_latents is not None:
        C.check_output_file(args.save_latents, "--save-latents", (".npy",))
    C.check_output_dir(args.output_dir, "--output-dir")
    manifest = C.manifest_path(args, rt) if kind == "toy" else None
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
    backend = C.check_backend(
        args.attention_backend, cfg, latent_hw, dtype, args.cache_dtype, sampler_cfg.frames_per_block
    )
    mesh_spec = args.mesh or ("data=-1" if rt.multi else None)  # several processes: prompts over every device
    data = C.data_axis(mesh_spec)
    # the sampler on the abstract model: checks cache, policy and video length before loading weights
    from flax import nnx

    from fkv_jax.checkpoint import DTYPES
    from fkv_jax.model.build import abstract_model
    from fkv_jax.sampling.rollout import Sampler

    tags = "".join(f"_{t}" for t in C.output_tags(args, kind))
    videos = []
    if kind == "toy":
        labels = prompts if prompts is not None else [f"video{i}" for i in range(batch_of_embeddings(emb_file, cfg))]
        videos = J.plan(
            list(range(len(labels))),
            seeds,
            args.output_dir,
            prompt_of=labels.__getitem__,
            tags=tags,
            resume=args.resume,
        )
        if noise_npz is not None:
            batch = len(videos)
        else:
            batch = args.batch_size or min(len(videos), DEFAULT_TOY_BATCH)
        batch = -(-batch // data) * data  # a multiple of the data axis
    else:
        batch = len(prompts) * len(seeds) if prompts is not None else batch_of_embeddings(emb_file, cfg)
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
            if mesh_spec:
                from fkv_jax.parallel import ShardedSampler, make_mesh

                s = ShardedSampler(graphdef, cfg, sampler_cfg, mesh=make_mesh(mesh_spec), **kw)
            else:
                s = Sampler(graphdef, cfg, sampler_cfg, **kw)
            s.check_length(frames)
        except ValueError as e:
            if "axis" in str(e) and mesh_spec:
                where = f"--mesh {mesh_spec}" if args.mesh else f"{rt.num_processes} processes (mesh {mesh_spec})"
                raise UsageError(f"{where}: {e}; set --batch-size or --mesh") from None
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
    lat_path = args.save_latents
    if lat_path is None and kind != "toy":
        lat_path = C.unique_path(args.output_dir / f"latents_seed{seeds[0]}{tags}.npy", set())
    entries = []
    if kind == "toy":  # which videos are left: process 0 reads the manifest, every process gets its answer
        entries = C.job_entries(manifest, rt)
        left = [v.index for v in (J.todo(videos, entries, args.output_dir) if args.resume else videos)]
        left = rt.broadcast_json("todo", left if rt.is_main else None)
        todo = [videos[i] for i in left]
        if args.resume and len(todo) < len(videos):
            _log(rt, f"resume: {len(videos) - len(todo)} of {len(videos)} video(s) already complete in {manifest}")
        if not todo:
            _log(rt, f"nothing to do: every video is complete ({manifest})")
            return args.output_dir

    # ---- heavy work ----
    C.enable_compilation_cache()
    progress = not args.no_progress and rt.is_main
    if rt.is_main:
        C.print_estimate(cfg, sampler, frames, batch)
    t0 = time.perf_counter()
    cfg, model, text_encoder, what = C.load_model(args, kind, progress)
    loaded_graphdef, params = nnx.split(model, nnx.Param)
    if loaded_graphdef != graphdef:  # e.g. a dtype cast at load: same shapes, checked above; nothing compiled yet
        sampler = make_sampler(loaded_graphdef)
    if mesh_spec:
        params = sampler.shard_params(params)
    if prompts is not None:
        per_prompt = C.prompts_context(prompts, cfg, kind, text_encoder)  # [P, L, D]
    else:
        per_prompt = C.embeddings_context(emb_file, cfg)
    geom = sampler.geom
    mode = "global" if geom.global_attn else f"rolling (sink {geom.sink} + {geom.ring} history frames + chunk {c})"
    if args.policy:
        mode = f"policy {args.policy}, {mode}"
    where = (
        f"; {rt.num_processes} processes, mesh {mesh_spec}"
        if rt.multi
        else (f"; mesh {mesh_spec}" if mesh_spec else "")
    )
    _log(
        rt,
        f"model: {what}; {frames} latent frames of {latent_hw[0]}x{latent_hw[1]}, batch {batch}{where}; cache: {mode}, "
        f"{geom.kv_bytes() / 2**20:.1f} MiB KV; attention {backend}"
        + (f" ({args.attention_backend})" if backend != args.attention_backend else "")
        + f"; steps {[round(float(t), 1) for t in sampler.schedule.timesteps[:-1]]}"
        f"; the first chunk includes compilation",
    )
    from fkv_jax.distributed import gather_rows, owned_rows
    from fkv_jax.video import save_npy_atomic

    chunk_sharding = sampler.shardings.chunk if sampler.shardings is not None else None
    rows = owned_rows(chunk_sharding, batch) if chunk_sharding is not None else list(range(batch))
    if kind != "toy":  # one batch, one latents file (written by process 0)
        ctx = np.repeat(per_prompt, len(seeds), axis=0)
        if noise_npz is not None:
            noise = noise_npz["noise"][:, :frames].astype(np.float32)
        else:
            noise = np.concatenate(
                [np.random.default_rng(seeds[0]).standard_normal((1, frames, cfg.in_dim, *latent_hw), np.float32)]
                * batch
            )
        lat = sampler.generate(params, ctx, noise, renoise=renoise, seed=seeds[0], progress=progress)
        if chunk_sharding is not None:
            lat = gather_rows(lat, chunk_sharding)
        if rt.is_main:
            C.make_dir(lat_path.parent, "--save-latents folder")
            save_npy_atomic(lat_path, lat)
        _log(rt, f"wrote {lat_path} {list(lat.shape)} float32 in {time.perf_counter() - t0:.1f} s")
        return lat_path

    from fkv_jax.sampling.noise import renoise_draws
    from fkv_jax.toyworld.video import save_mp4

    C.make_dir(args.output_dir, "--output-dir")
    fps = args.fps or 8
    shape = (frames, cfg.in_dim, *latent_hw)

    def generate_batch(k: int, group: list, n_real: int):
        ctx = per_prompt[[v.item for v in group]]  # [B, L, D]
        if noise_npz is not None:
            noise, ren = noise_npz["noise"][:, :frames].astype(np.float32), renoise
        else:  # one draw per video from its own seed: a video does not depend on what else is in the batch
            noise = np.stack([np.random.default_rng(v.seed).standard_normal(shape, np.float32) for v in group])

            def ren(blk):
                return np.concatenate([renoise_draws(v.seed, blk, n, (1, c, *shape[1:])) for v in group], axis=1)

        lat = sampler.generate(params, ctx, noise, renoise=ren, seed=seeds[0], progress=progress)
        written = []
        for r in rows:
            if r < n_real:
                written.append(group[r])
                save_mp4(group[r].path, np.clip(lat[r], -1, 1), fps=fps)
        if args.save_latents is not None:
            lat = gather_rows(lat, chunk_sharding) if chunk_sharding is not None else lat
            return written, lat[:n_real] if rt.is_main else None
        return written, None

    entries, extras = J.run(
        todo,
        batch,
        generate_batch,
        rt=rt,
        out_dir=args.output_dir,
        manifest=manifest,
        entries=entries,
        policy=args.policy,
        log=lambda m: _log(rt, m),
    )
    if args.save_latents is not None and rt.is_main:
        lat = np.concatenate(extras)
        C.make_dir(args.save_latents.parent, "--save-latents folder")
        save_npy_atomic(args.save_latents, lat)
        _log(rt, f"latents: {args.save_latents} {list(lat.shape)} float32")
    dt = time.perf_counter() - t0
    _log(
        rt,
        f"wrote {len(todo)} video(s) to {args.output_dir}{f' and {manifest}' if manifest else ''} in {dt:.1f} s "
        f"({sampler.trace_count} compilation(s) of the chunk step)",
    )
    return args.output_dir


DEFAULT_TOY_BATCH = 8


def batch_of_embeddings(emb_file, cfg) -> int:
    return C.embeddings_context(emb_file, cfg).shape[0]


def _log(rt, message: str) -> None:
    if rt.is_main:
        print(message, file=sys.stderr)


def main(argv=None, prog: str = "fkv generate") -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    return run_cli(lambda: build_parser(prog), lambda args: run(args, argv), argv)
