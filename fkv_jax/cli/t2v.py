"""``fkv generate --model-dir DIR``: prompts -> mp4 through :class:`fkv_jax.pipeline.TextToVideo`."""

from __future__ import annotations

import sys
from pathlib import Path

from fkv_jax.cli import UsageError
from fkv_jax.cli import common as C


def jobs_from_args(args, out_dir: Path, tags: str = "") -> list:
    """One job per prompt (or schedule) and seed; file names ``<index>_<prompt>_seed<S><tags>.mp4``, never an
    existing file (a ``-2``, ``-3`` suffix is added), except with --resume (the names as they are)."""
    from fkv_jax import jobs as J
    from fkv_jax.pipeline import Job, PipelineError, read_schedule_file
    from fkv_jax.sampling.recache import PromptSchedule

    prompt = C.prompt_of(args)
    given = [n for n, v in (("PROMPT", prompt), ("--prompts", args.prompts), ("--schedule", args.schedule)) if v]
    if len(given) != 1:
        raise UsageError(
            "give exactly one of PROMPT, --prompts FILE and --schedule FILE"
            + (f" (got {', '.join(given)})" if given else "")
        )
    seeds = C.seeds_of(args)
    try:
        if args.schedule is not None:
            if args.switch_frames:
                raise UsageError("--switch-frames goes with --prompts; a --schedule file holds its own frames")
            C.check_input_file(args.schedule, "--schedule")
            schedules = [read_schedule_file(args.schedule)]
        elif args.prompts is not None:
            lines = C.read_prompts(args.prompts)
            if args.switch_frames:
                frames = C.parse_int_list(args.switch_frames, "--switch-frames", minimum=1)
                try:
                    schedules = [PromptSchedule(tuple(lines), tuple(frames))]
                except ValueError as e:
                    raise UsageError(f"--prompts {args.prompts} with --switch-frames: {e}") from None
            else:
                schedules = [PromptSchedule((ln,)) for ln in lines]
        else:
            if args.switch_frames:
                raise UsageError("--switch-frames needs --prompts FILE (one prompt per segment)")
            schedules = [PromptSchedule((prompt.strip(),))]
    except PipelineError as e:
        raise UsageError(str(e)) from None
    videos = J.plan(
        schedules,
        seeds,
        out_dir,
        prompt_of=lambda s: s.prompts[0],
        tags=tags,
        resume=getattr(args, "resume", False),
    )
    return [Job(v.item, v.seed, v.path) for v in videos]


def run_model_dir(args, rt=None) -> Path:
    """Check everything, then generate; returns the output folder. ``rt``: the distributed runtime joined by
    the caller (:func:`fkv_jax.distributed.session`; default: one process)."""
    from fkv_jax import jobs as J
    from fkv_jax.distributed import Runtime
    from fkv_jax.pipeline import ModelDir, PipelineError, TextToVideo
    from fkv_jax.video import VideoError

    rt = rt or Runtime()
    if args.model_dir is None:
        used = [
            f"--{f.replace('_', '-')}"
            for f in ("switch_frames", "schedule", "no_global_sink")
            if getattr(args, f, None) not in (None, False)
        ]
        raise UsageError(f"{', '.join(used)} need(s) --model-dir DIR")
    clash = [
        n
        for n, v in (
            ("--checkpoint", args.checkpoint),
            ("--text-embeddings", args.text_embeddings),
            ("--noise-file", args.noise_file),
            ("--model-preset", args.model_preset),
            ("--toy-weights", args.toy_weights),
        )
        if v is not None
    ]
    if clash:
        raise UsageError(f"--model-dir encodes prompts and draws noise itself; drop {', '.join(clash)}")
    C.check_at_least("--batch-size", args.batch_size, 1)
    C.check_at_least("--cache-frames", args.cache_frames, 1)
    if args.fps is not None and args.fps <= 0:
        raise UsageError(f"--fps must be positive, got {args.fps:g}")
    if args.frames is not None and args.frames < 1:
        raise UsageError(f"--frames must be a positive multiple of the chunk size, got {args.frames}")
    C.check_output_dir(args.output_dir, "--output-dir")
    if args.save_latents is not None:
        C.check_output_file(args.save_latents, "--save-latents", (".npy",))
    manifest = C.manifest_path(args, rt)
    try:
        model_dir = ModelDir.check(args.model_dir)
    except PipelineError as e:
        raise UsageError(str(e)) from None
    kind = "model_dir"
    jobs = jobs_from_args(args, args.output_dir, "".join(f"_{t}" for t in C.output_tags(args, kind)))
    sampler_cfg = C.sampler_config(args, kind)
    frames = 21 if args.frames is None else args.frames
    C.check_frames(frames, sampler_cfg)
    latent_hw = C.parse_hw(args.latent_size) if args.latent_size else tuple(model_dir.model_cfg.latent_hw)
    policy = C.build_policy(args, model_dir.model_cfg, kind)
    if any(j.schedule.switch_frames for j in jobs) and policy is not None:
        raise UsageError("prompt switching (KV re-cache) works with the plain cache only; drop --policy")
    dtype = args.dtype or model_dir.model_dtype
    C.check_backend(
        args.attention_backend, model_dir.model_cfg, latent_hw, dtype, args.cache_dtype, sampler_cfg.frames_per_block
    )
    mesh_spec = args.mesh or ("data=-1" if rt.multi else None)  # several processes: videos over every device
    data = C.data_axis(mesh_spec)
    batch = 1 if args.batch_size is None else min(args.batch_size, len(jobs))
    batch = -(-batch // data) * data  # a multiple of the data axis
    mesh = None
    if mesh_spec:
        from fkv_jax.parallel import make_mesh

        mesh = make_mesh(mesh_spec)
    try:
        t2v = TextToVideo(
            model_dir,
            sampler_cfg,
            num_frames=frames,
            latent_hw=latent_hw,
            mesh=mesh,
            rope_mode=args.rope_mode,
            batch_size=batch,
            cache_frames=args.cache_frames,
            policy=policy,
            attention_backend=args.attention_backend,
            global_sink=not args.no_global_sink,
            fps=args.fps or 16,
            progress=not args.no_progress and rt.is_main,
            log=None if rt.is_main else (lambda s: None),  # several processes: process 0 speaks for all
            dtype=args.dtype,
            cache_dtype=args.cache_dtype,
            decoder=args.decoder or "wan",
        )
        for j in jobs:
            j.schedule.check_length(t2v.num_frames)
        t2v.check_jobs(jobs)
    except (PipelineError, VideoError, ValueError) as e:
        raise UsageError(str(e)) from None
    # which videos are left: process 0 reads the manifest, every process gets its answer
    entries = C.job_entries(manifest, rt)
    videos = [J.Video(i, j.schedule.prompts[0], j.seed, j.path) for i, j in enumerate(jobs)]
    left = [v.index for v in (J.todo(videos, entries, args.output_dir) if args.resume else videos)]
    left = rt.broadcast_json("todo", left if rt.is_main else None)
    log = (lambda s: print(s, file=sys.stderr)) if rt.is_main else (lambda s: None)
    if args.resume and len(left) < len(jobs):
        log(f"resume: {len(jobs) - len(left)} of {len(jobs)} video(s) already complete in {manifest}")
    jobs = [jobs[i] for i in left]
    if not jobs:
        log(f"nothing to do: every video is complete ({manifest})")
        return args.output_dir
    C.enable_compilation_cache()
    m, v, (h, w) = model_dir.model_cfg, model_dir.vae_cfg, t2v.latent_hw
    where = f"; mesh {mesh_spec}" if mesh_spec else ""
    if rt.multi:
        where = f"; {rt.num_processes} processes{where}"
    log(
        f"model:  {model_dir.root} ({m.name}: dim {m.dim}, {m.num_layers} layers); {len(jobs)} video(s) of "
        f"{t2v.num_frames} latent frames ({v.num_video_frames(t2v.num_frames)} video frames at "
        f"{v.spatial_factor * h}x{v.spatial_factor * w}), batch {t2v.batch_size}{where} -> {args.output_dir}"
    )
    if rt.is_main:
        C.print_estimate(m, t2v.sampler, frames, t2v.batch_size)
    C.make_dir(args.output_dir, "--output-dir")
    t2v.run(
        jobs,
        save_latents=args.save_latents,
        rt=rt,
        manifest=manifest,
        entries=entries,
        out_dir=args.output_dir,
        policy_name=args.policy,
        atomic=args.resume,
    )
    return args.output_dir
