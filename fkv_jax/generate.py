"""Command line: generate latent videos with the AR KV-cache sampler.

    python -m fkv_jax.generate                          # embedded toy-world model -> outputs/*.mp4, CPU, seconds
    python -m fkv_jax.generate "a green triangle and a cyan cross" --frames 48
    python -m fkv_jax.generate --checkpoint DIR --text-embeddings ctx.npy --frames 21 --save-latents out.npy
    python -m fkv_jax.generate --checkpoint DIR --text-embeddings ctx.npy --noise-file noise.npz \\
        --frames 15 --local-attn-size 9 --sink-size 3 --save-latents out.npy   # replay a PyTorch run

Run with ``--help`` for every option.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from fkv_jax.cli import UsageError, run_cli

DESCRIPTION = """\
Generate latent videos autoregressively, chunk by chunk, with a fixed-shape KV cache.

Model: --checkpoint DIR loads a checkpoint converted by `python -m checkpoints_convert`. Without it, the
embedded default model runs: the toy-world causal Wan shipped with the package (same transformer, cache,
sampler and policies as the real models, 32x32 pixel frames of moving sprites, trained here with
`python -m fkv_jax.toyworld.train`; see docs/toyworld.md). It draws the sprites its prompt names, e.g.
"a red circle and a blue square", and writes one mp4 per prompt to --output-dir in a few seconds on a CPU.
Its words (fkv_jax.toyworld.text.VOCAB): a, and, with, pillar, red, green, blue, yellow, magenta, cyan,
circle, square, triangle, cross. --toy-weights DIR uses
weights you trained instead; --model-preset NAME (e.g. tiny) runs a random-weight model of that preset,
whose output is noise-like latents: useful to time the loop at real-model shapes.

Text: real checkpoints need the UMT5 encoder output as --text-embeddings FILE.npy ([B, L, text_dim]).
A --model-preset random model turns each prompt into a deterministic stand-in embedding (a seeded hash).

Text to video: --model-dir DIR (built by `python -m checkpoints_convert --wan-dir WAN2.1_DOWNLOAD --generator
GEN.pt --output DIR`) encodes the prompts with UMT5, generates, decodes each chunk with the VAE as it is made
and writes mp4 files (H.264, 16 fps) to --output-dir; --prompts FILE gives one video per line, --seeds and
--batch-size multiply and group them, --switch-frames / --schedule switch prompts mid-video (LongLive).

Replay: --noise-file FILE.npz with `noise` [B, F, C, H, W] and `renoise`
[num_blocks, num_steps-1, B, frames_per_block, C, H, W] reproduces a recorded PyTorch rollout number for
number (Self Forcing's B,F,C,H,W layout)."""

EPILOG = """\
cache modes (upstream parameter names):
  --local-attn-size -1           global attention: every frame is kept (cache capacity = --frames,
                                 or --cache-frames)
  --local-attn-size N --sink-size S
                                 rolling window of N frames counted the upstream way: it includes the
                                 S sink frames and the current chunk (LongLive: 12 and 3)

presets: self_forcing (shift 5, 4 warped steps, global), longlive (same, window 12 + sink 3),
         causvid (shift 8, 3 steps, global)
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fkv_jax.generate", description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--checkpoint", type=Path, help="converted checkpoint directory (default: the embedded toy-world "
                                                     "model)")
    g.add_argument("--toy-weights", type=Path, help="toy-world weights directory from `python -m fkv_jax.toyworld."
                                                     "train --export DIR` (default: the shipped weights)")
    g.add_argument("--model-preset", help="run a random-weight model of this preset instead (e.g. tiny, 1.3b)")
    g = p.add_argument_group("text")
    g.add_argument("prompt_arg", nargs="?", metavar="PROMPT", help="prompt (same as --prompt)")
    g.add_argument("--prompt", help="prompt text (embedded model only, see above)")
    g.add_argument("--prompts", type=Path, help="file with one prompt per line: one video per line, as a batch")
    g.add_argument("--text-embeddings", type=Path, help=".npy [B, L, text_dim] text encoder output")
    g = p.add_argument_group("sampling")
    g.add_argument("--preset", help="sampler preset: self_forcing | longlive | causvid (default: self_forcing; the "
                                    "toy model's own sampler, fkv_jax/toyworld/toy_sampler.json, for the toy model)")
    g.add_argument("--frames", type=int, help="latent frames to generate (default 21 (toy model: 48); from "
                                              "--noise-file if given)")
    g.add_argument("--frames-per-block", type=int, help="latent frames per AR chunk (default from the preset: 3)")
    g.add_argument("--local-attn-size", type=int, help="-1 = global cache, N = rolling window of N frames")
    g.add_argument("--sink-size", type=int, help="sink frames kept forever in rolling mode")
    g.add_argument("--cache-frames", type=int, help="capacity of a global cache (default: --frames)")
    g.add_argument("--rope-mode", choices=("absolute", "window_relative"), default="absolute",
                   help="absolute (upstream; at most 1024 latent frames) or window_relative (LongLive's infinite "
                        "variant: rolling windows of any length)")
    g.add_argument("--denoising-steps", help="comma-separated nominal timesteps, e.g. 1000,750,500,250")
    g.add_argument("--latent-size", help="latent HxW, e.g. 60x104 (default: the model preset's; 480x832 video)")
    g.add_argument("--seed", type=int, default=0, help="seed of the initial noise and the re-noise draws")
    g.add_argument("--noise-file", type=Path, help=".npz with `noise` and `renoise` (replays a recorded rollout)")
    g = p.add_argument_group("KV selection policy")
    g.add_argument("--policy", help="KV selection policy: full, window, sink_window, forcing_kv, focused_forcing, "
                                    "focused_forcing_longlive, dummy_forcing, deep_forcing, h2o, snapkv, rkv "
                                    "(default: the plain cache of --local-attn-size / --sink-size)")
    g.add_argument("--policy-opt", action="append", default=[], metavar="KEY=VALUE",
                   help="policy option (repeatable), upstream names, e.g. ar_start=1, sim_retention_ratio=0.33, "
                        "min_budget=4, pooled_tokens=30")
    g.add_argument("--head-table", help="Forcing-KV head table: a JSON file in the upstream format, or a packaged "
                                        "table: selfforcing, longlive, causalforcing, raven, realtime_14b")
    g.add_argument("--head-importance", type=Path, help="Focused Forcing head importance JSON "
                                                         '({"<layer * num_heads + head>": score})')
    g.add_argument("--attention-backend", default="xla",
                   help="attention backend: xla (reference, everywhere), pallas_tpu, mosaic_gpu (Hopper), triton, "
                        "auto (picks by platform) (default: xla)")
    g = p.add_argument_group("devices")
    g.add_argument("--mesh", help="shard over a device mesh, e.g. data=2,model=4 (batch on data, heads on model)")
    g.add_argument("--distributed", action="store_true",
                   help="multi-host: call jax.distributed.initialize() first (then --mesh spans every host)")
    g = p.add_argument_group("output")
    g.add_argument("--save-latents", type=Path, help="write final latents [B, F, C, H, W] float32 .npy here")
    g.add_argument("--output-dir", type=Path, default=Path("outputs"),
                   help="where the toy model's mp4 files (one per prompt) and, without --save-latents, the latents "
                        "of other models go (default: ./outputs)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    from fkv_jax.pipeline import add_arguments

    add_arguments(p)  # --model-dir: prompts -> mp4 (text encoder, VAE, prompt switching)
    return p


DEFAULT_PROMPT = "a red circle and a blue square"


def _stand_in_embedding(prompt: str, text_len: int, text_dim: int) -> np.ndarray:
    """Deterministic stand-in for the text encoder (embedded model only): [text_len, text_dim]."""
    if not prompt.strip():
        raise UsageError("empty prompt")
    seed = int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:8], "little")
    n = min(len(prompt.split()) + 1, text_len)
    out = np.zeros((text_len, text_dim), np.float32)
    out[:n] = np.random.default_rng(seed).standard_normal((n, text_dim)).astype(np.float32)
    return out


def _load_npy(path: Path, what: str) -> np.ndarray:
    if not path.is_file():
        raise UsageError(f"{what} file not found: {path}")
    try:
        return np.load(path, allow_pickle=False)
    except Exception as e:  # noqa: BLE001 - any unreadable file is a usage error here
        raise UsageError(f"cannot read {what} file {path}: {e}") from e


def model_kind(args) -> str:
    """Which model the flags select: "checkpoint", "random" (--model-preset) or "toy" (the default)."""
    if args.checkpoint is not None and args.model_preset is not None:
        raise UsageError("--checkpoint and --model-preset are two different models; give one")
    if args.toy_weights is not None and (args.checkpoint is not None or args.model_preset is not None):
        raise UsageError("--toy-weights selects the toy-world model; it cannot go with --checkpoint or --model-preset")
    if args.checkpoint is not None and not args.checkpoint.is_dir():
        raise UsageError(f"--checkpoint directory not found: {args.checkpoint}")
    return "checkpoint" if args.checkpoint is not None else "random" if args.model_preset is not None else "toy"


def load_model(args, kind: str):
    """(ModelConfig, CausalWanModel, toy text encoder or None, description) for ``model_kind(args)``."""
    if kind == "checkpoint":
        from fkv_jax.checkpoint import load_transformer

        try:
            cfg, model = load_transformer(args.checkpoint)
        except (OSError, ValueError) as e:
            raise UsageError(f"cannot load --checkpoint {args.checkpoint}: {e}") from e
        return cfg, model, None, f"checkpoint {args.checkpoint}"
    if kind == "random":
        from fkv_jax.config import model_preset
        from fkv_jax.model.build import init_model

        try:
            cfg = model_preset(args.model_preset)
        except ValueError as e:
            raise UsageError(str(e)) from e
        return cfg, init_model(cfg, seed=0), None, f"random-weight model '{cfg.name}'"
    from fkv_jax.toyworld.model import load_toy_model

    try:
        cfg, model, text_encoder = load_toy_model(None if args.toy_weights is None else str(args.toy_weights))
    except (OSError, ValueError, KeyError) as e:
        where = "--toy-weights" if args.toy_weights is not None else "the shipped toy-world weights"
        raise UsageError(f"cannot load {where}: {e}") from e
    return cfg, model, text_encoder, f"toy-world model ({args.toy_weights or 'shipped weights'})"


def _resolve_text(args, cfg, model_kind: str, text_encoder=None) -> tuple[np.ndarray, list[str]]:
    """(context [B, L, text_dim] float32, prompts) from PROMPT / --prompts / --text-embeddings.

    model_kind: "toy" (prompts go through the toy text encoder), "random" (seeded stand-in embeddings) or
    "checkpoint" (only --text-embeddings).
    """
    if args.prompt and args.prompt_arg:
        raise UsageError("give the prompt either positionally or with --prompt, not both")
    prompt = args.prompt or args.prompt_arg
    sources = [x for x in (prompt, args.prompts, args.text_embeddings) if x is not None]
    if len(sources) > 1:
        raise UsageError("use only one of PROMPT/--prompt, --prompts and --text-embeddings")
    if args.text_embeddings is not None:
        ctx = _load_npy(args.text_embeddings, "--text-embeddings")
        if ctx.ndim == 2:
            ctx = ctx[None]
        if ctx.ndim != 3 or ctx.shape[2] != cfg.text_dim or ctx.shape[1] > cfg.text_len:
            raise UsageError(f"--text-embeddings {args.text_embeddings} has shape {ctx.shape}; expected "
                             f"[B, L<={cfg.text_len}, {cfg.text_dim}] for this model")
        return ctx.astype(np.float32), [f"video{i}" for i in range(ctx.shape[0])]
    if model_kind == "checkpoint":
        raise UsageError("this checkpoint needs the text encoder output: pass --text-embeddings FILE.npy "
                         "([B, L, text_dim] UMT5 output), or use --model-dir DIR for prompts -> mp4; "
                         "prompts alone are only accepted by the embedded models")
    if args.prompts is not None:
        if not args.prompts.is_file():
            raise UsageError(f"--prompts file not found: {args.prompts}")
        prompts = [ln.strip() for ln in args.prompts.read_text().splitlines() if ln.strip()]
        if not prompts:
            raise UsageError(f"--prompts file {args.prompts} has no prompts")
    else:
        prompts = [prompt if prompt is not None else DEFAULT_PROMPT]
    if model_kind == "toy":
        from fkv_jax.toyworld.model import toy_context

        try:
            return toy_context(prompts, text_encoder, cfg), prompts
        except ValueError as e:
            raise UsageError(str(e)) from e
    return np.stack([_stand_in_embedding(p, cfg.text_len, cfg.text_dim) for p in prompts]), prompts


def base_sampler_config(args, toy: bool):
    """--preset (default self_forcing; the toy sampler for the toy model)."""
    from fkv_jax.config import sampler_preset

    if args.preset is None and toy:
        from fkv_jax.toyworld.model import toy_sampler_config

        return toy_sampler_config(args.toy_weights)
    return sampler_preset(args.preset or "self_forcing")


def _sampler_config(args, toy: bool):
    sc = base_sampler_config(args, toy)
    over = {}
    if args.frames_per_block is not None:
        over["frames_per_block"] = args.frames_per_block
    if args.local_attn_size is not None:
        over["local_attn_size"] = args.local_attn_size
        if args.sink_size is None and args.local_attn_size == -1:
            over["sink_size"] = 0
    if args.sink_size is not None:
        over["sink_size"] = args.sink_size
    if args.denoising_steps:
        try:
            over["denoising_steps"] = tuple(float(x) for x in args.denoising_steps.split(","))
        except ValueError as e:
            raise UsageError(f"--denoising-steps must be comma-separated numbers, got {args.denoising_steps!r}") from e
    return dataclasses.replace(sc, **over)


def _policy(args, cfg):
    from fkv_jax.policies import make_policy, parse_options

    if args.policy is None:
        if args.policy_opt or args.head_table or args.head_importance:
            raise UsageError("--policy-opt, --head-table and --head-importance need --policy")
        return None
    if args.local_attn_size is not None or args.sink_size is not None:
        raise UsageError("--local-attn-size/--sink-size describe the plain cache; with --policy set the window "
                         "through --policy-opt (e.g. local_attn_size=12, sink_size=3)")
    if args.head_importance is not None and not args.head_importance.is_file():
        raise UsageError(f"--head-importance file not found: {args.head_importance}")
    return make_policy(args.policy, parse_options(args.policy_opt), head_table=args.head_table,
                       head_importance=args.head_importance, num_layers=cfg.num_layers, num_heads=cfg.num_heads)


def _parse_hw(s: str) -> tuple[int, int]:
    try:
        h, w = (int(x) for x in s.lower().split("x"))
    except ValueError as e:
        raise UsageError(f"--latent-size must look like 60x104, got {s!r}") from e
    return h, w


def _save_npy_atomic(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, arr)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _enable_compilation_cache() -> None:
    """Persist compiled executables between runs (FKV_JAX_CACHE_DIR, default ~/.cache/fkv_jax/xla; '' = off)."""
    import jax

    path = os.environ.get("FKV_JAX_CACHE_DIR", str(Path.home() / ".cache" / "fkv_jax" / "xla"))
    if path:
        jax.config.update("jax_compilation_cache_dir", path)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def run(args) -> Path:
    from fkv_jax.pipeline import run_cli, wants_pipeline

    if wants_pipeline(args):  # --model-dir: the text-to-video pipeline (fkv_jax/pipeline.py)
        return run_cli(args, UsageError)
    # Validate everything cheap first, import/compile later.
    kind = model_kind(args)
    noise_npz = None
    if args.noise_file is not None:
        if not args.noise_file.is_file():
            raise UsageError(f"--noise-file not found: {args.noise_file}")
        try:
            noise_npz = dict(np.load(args.noise_file, allow_pickle=False))
        except Exception as e:  # noqa: BLE001
            raise UsageError(f"cannot read --noise-file {args.noise_file}: {e}") from e
        missing = [k for k in ("noise", "renoise") if k not in noise_npz]
        if missing:
            raise UsageError(f"--noise-file {args.noise_file} lacks key(s) {missing} (has {sorted(noise_npz)})")
    out_path = args.save_latents or (None if kind == "toy" else args.output_dir / "latents.npy")
    for folder in {x for x in (out_path.parent if out_path else None,
                               args.output_dir if kind == "toy" else None) if x is not None}:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UsageError(f"cannot create output folder {folder}: {e.strerror or e}") from e
        if not os.access(folder, os.W_OK):
            raise UsageError(f"output folder {folder} is not writable")
    if args.fps is not None and kind != "toy":
        raise UsageError("--fps sets the frame rate of an mp4: it applies to the toy-world model and --model-dir; "
                         "--checkpoint and --model-preset write latents")
    if args.fps is not None and args.fps <= 0:
        raise UsageError(f"--fps must be positive, got {args.fps}")
    try:
        sampler_cfg = _sampler_config(args, toy=kind == "toy")
    except ValueError as e:
        raise UsageError(str(e)) from e

    _enable_compilation_cache()
    if args.distributed:
        import jax

        jax.distributed.initialize()
    from flax import nnx

    from fkv_jax.sampling.rollout import Sampler

    t0 = time.perf_counter()
    cfg, model, text_encoder, what = load_model(args, kind)
    graphdef, params = nnx.split(model, nnx.Param)
    ctx, prompts = _resolve_text(args, cfg, kind, text_encoder)
    batch = ctx.shape[0]

    c = sampler_cfg.frames_per_block
    if noise_npz is not None:
        noise = noise_npz["noise"].astype(np.float32)
        if noise.ndim != 5 or noise.shape[0] != batch or noise.shape[2] != cfg.in_dim:
            raise UsageError(f"--noise-file `noise` has shape {noise.shape}; expected [B={batch}, F, {cfg.in_dim}, H, W]")
        if args.frames is not None and args.frames != noise.shape[1]:
            if args.frames > noise.shape[1]:
                raise UsageError(f"--frames {args.frames} is more than the {noise.shape[1]} frames in --noise-file")
            noise = noise[:, :args.frames]
        frames, latent_hw = noise.shape[1], tuple(noise.shape[3:])
    else:
        frames = args.frames if args.frames is not None else (48 if kind == "toy" else 21)
        latent_hw = _parse_hw(args.latent_size) if args.latent_size else cfg.latent_hw
    try:
        cfg.grid_hw(latent_hw)
        policy = _policy(args, cfg)
        kw = dict(batch=batch, latent_hw=latent_hw, num_frames=frames, cache_frames=args.cache_frames, policy=policy,
                  attention_backend=args.attention_backend, rope_mode=args.rope_mode)
        if args.mesh:
            from fkv_jax.parallel import ShardedSampler, make_mesh

            sampler = ShardedSampler(graphdef, cfg, sampler_cfg, mesh=make_mesh(args.mesh), **kw)
        else:
            sampler = Sampler(graphdef, cfg, sampler_cfg, **kw)
        sampler.check_length(frames)
    except ValueError as e:
        raise UsageError(str(e)) from e
    renoise = None
    n = sampler.schedule.num_steps
    if noise_npz is not None:
        renoise = noise_npz["renoise"].astype(np.float32)
        want = (frames // c, n - 1, batch, c, cfg.in_dim, *latent_hw)
        if renoise.ndim != 7 or renoise.shape[1:] != want[1:] or renoise.shape[0] < want[0]:
            raise UsageError(f"--noise-file `renoise` has shape {renoise.shape}; expected "
                             f"[num_blocks={want[0]}, steps-1={n - 1}, B={batch}, {c}, {cfg.in_dim}, *{latent_hw}]")
        renoise = renoise[: want[0]]
    else:
        noise = np.random.default_rng(args.seed).standard_normal((batch, frames, cfg.in_dim, *latent_hw), np.float32)

    geom = sampler.geom
    mode = "global" if geom.global_attn else f"rolling (sink {geom.sink} + {geom.ring} history frames + chunk {c})"
    if args.policy:
        mode = f"policy {args.policy}, {mode}"
    print(f"model: {what}; {frames} latent frames of {latent_hw[0]}x{latent_hw[1]}, batch {batch}; cache: {mode}, "
          f"{geom.kv_bytes() / 2**20:.1f} MiB KV; steps {[round(float(t), 1) for t in sampler.schedule.timesteps[:-1]]}",
          file=sys.stderr)
    lat = sampler.generate(params, ctx, noise, renoise=renoise, seed=args.seed,
                           progress=not args.no_progress)
    written = []
    if out_path is not None:
        _save_npy_atomic(out_path, lat)
        written.append(f"{out_path} {list(lat.shape)} float32")
    if kind == "toy":  # pixel frames in [-1, 1]: one mp4 per prompt
        from fkv_jax.pipeline import slug
        from fkv_jax.toyworld.video import save_mp4

        for i, prompt in enumerate(prompts):
            path = save_mp4(args.output_dir / f"{i:03d}_{slug(prompt)}.mp4", np.clip(lat[i], -1, 1),
                             fps=args.fps or 8)
            written.append(str(path))
        out_path = args.output_dir
    dt = time.perf_counter() - t0
    print(f"wrote {', '.join(written)} in {dt:.1f} s ({sampler.trace_count} compilation(s) of the chunk step)",
          file=sys.stderr)
    return out_path


def main(argv=None) -> int:
    return run_cli(build_parser, run, argv)


if __name__ == "__main__":
    sys.exit(main())
