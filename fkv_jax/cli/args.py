"""Argument groups shared by the subcommands (declared once): model, text, sampler, policy, backend, output.

Each ``add_*`` function adds one group to a parser; ``only=`` picks a subset of its flags for commands that
need fewer (e.g. ``profile`` has no ``--noise-file``). Values are checked in :mod:`fkv_jax.cli.common`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

DTYPE_CHOICES = ("float32", "bfloat16")
BACKEND_HELP = (
    "attention backend: auto (picks by platform: cpu_ffi on a CPU when it is built, else xla; pallas_tpu on TPU; "
    "mosaic_gpu/triton on GPU), xla (the reference, everywhere), cpu_ffi (CPU: the C++ kernel built by pip "
    "install, about 2x xla's attention speed), pallas_tpu (TPU), mosaic_gpu (Hopper GPU), triton (CUDA/ROCm GPU "
    "with jax-triton) (default: auto)"
)


def _add(group, only, name, *args, **kw):
    if only is None or name in only:
        group.add_argument(*args, **kw)


def add_model_args(p: argparse.ArgumentParser, only=None) -> None:
    g = p.add_argument_group("model")
    _add(
        g,
        only,
        "checkpoint",
        "--checkpoint",
        type=Path,
        help="converted checkpoint directory (`fkv convert`) (default: the embedded toy-world model)",
    )
    _add(
        g,
        only,
        "toy_weights",
        "--toy-weights",
        type=Path,
        help="toy-world weights directory from `python -m fkv_jax.toyworld.train --export DIR` "
        "(default: the shipped weights)",
    )
    _add(
        g,
        only,
        "model_preset",
        "--model-preset",
        metavar="NAME",
        help="a random-weight model of this preset: tiny, mid, wan2.1-t2v-1.3b (alias 1.3b); noise-like output, "
        "for timing the loop at a model's shapes",
    )
    _add(
        g,
        only,
        "dtype",
        "--dtype",
        choices=DTYPE_CHOICES,
        help="compute dtype (default: the checkpoint's stored dtype; the toy and random models: float32); "
        "weights are cast at load, attention accumulates in float32",
    )
    _add(
        g,
        only,
        "cache_dtype",
        "--cache-dtype",
        choices=DTYPE_CHOICES,
        help="dtype of the KV cache and the policies' K/V memories (default: the compute dtype)",
    )


def add_text_args(p: argparse.ArgumentParser, only=None, repeat_embeddings: bool = False) -> None:
    g = p.add_argument_group("text")
    _add(g, only, "prompt_arg", "prompt_arg", nargs="?", metavar="PROMPT", help="prompt (same as --prompt)")
    _add(g, only, "prompt", "--prompt", help="prompt text (the toy and random models, or --model-dir)")
    _add(g, only, "prompts", "--prompts", type=Path, help="UTF-8 text file, one prompt per line: one video per line")
    if repeat_embeddings:
        _add(
            g,
            only,
            "text_embeddings",
            "--text-embeddings",
            type=Path,
            action="append",
            default=[],
            help=".npy [1, L, text_dim] text encoder output (repeatable: one run each)",
        )
    else:
        _add(
            g,
            only,
            "text_embeddings",
            "--text-embeddings",
            type=Path,
            help=".npy [B, L, text_dim] text encoder output (needed by --checkpoint)",
        )


def add_sampler_args(p: argparse.ArgumentParser, only=None, frames_default: int | None = None) -> None:
    g = p.add_argument_group("sampling")
    _add(
        g,
        only,
        "preset",
        "--preset",
        metavar="NAME",
        help="sampler preset of the Wan models: self_forcing | longlive | causvid (default: self_forcing); the "
        "toy-world model has its own sampler (the `toy` preset, its default) and refuses these",
    )
    _add(
        g,
        only,
        "frames",
        "--frames",
        type=int,
        default=frames_default,
        help="latent frames to generate, a multiple of the chunk size (default 21; the toy model: 48; "
        "--noise-file: its length)"
        if frames_default is None
        else f"latent frames per run, a multiple of the chunk size (default {frames_default})",
    )
    _add(
        g,
        only,
        "frames_per_block",
        "--frames-per-block",
        type=int,
        help="latent frames per AR chunk (default from the preset: 3)",
    )
    _add(
        g,
        only,
        "local_attn_size",
        "--local-attn-size",
        type=int,
        help="-1 = global cache, N = rolling window of N frames",
    )
    _add(g, only, "sink_size", "--sink-size", type=int, help="sink frames kept forever in rolling mode")
    _add(g, only, "cache_frames", "--cache-frames", type=int, help="capacity of a global cache (default: --frames)")
    _add(
        g,
        only,
        "rope_mode",
        "--rope-mode",
        choices=("absolute", "window_relative"),
        default="absolute",
        help="absolute (upstream; at most 1024 latent frames) or window_relative (LongLive's infinite variant)",
    )
    _add(
        g, only, "denoising_steps", "--denoising-steps", help="comma-separated nominal timesteps, e.g. 1000,750,500,250"
    )
    _add(
        g,
        only,
        "latent_size",
        "--latent-size",
        metavar="HxW",
        help="latent HxW, e.g. 60x104 (default: the model's; 60x104 is a 480x832 video)",
    )
    _add(g, only, "seed", "--seed", type=int, default=0, help="seed of the initial noise and re-noise draws (>= 0)")
    _add(
        g,
        only,
        "seeds",
        "--seeds",
        metavar="S1,S2,...",
        help="comma-separated seeds: one video per prompt and seed (the toy model and --model-dir)",
    )
    _add(
        g,
        only,
        "noise_file",
        "--noise-file",
        type=Path,
        help=".npz with `noise` and `renoise` (replays a recorded rollout)",
    )


def add_policy_args(p: argparse.ArgumentParser, only=None) -> None:
    g = p.add_argument_group("KV selection policy")
    _add(
        g,
        only,
        "policy",
        "--policy",
        help="KV selection policy: full, window, sink_window, forcing_kv, focused_forcing, focused_forcing_longlive, "
        "dummy_forcing, deep_forcing, h2o, snapkv, rkv (default: the plain cache of --local-attn-size)",
    )
    _add(
        g,
        only,
        "policy_opt",
        "--policy-opt",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="policy option (repeatable), upstream names, e.g. ar_start=1, sim_retention_ratio=0.33",
    )
    _add(
        g,
        only,
        "head_table",
        "--head-table",
        metavar="FILE|NAME",
        help="Forcing-KV head table: a JSON file (`fkv profile heads`) or a packaged table: selfforcing, longlive, "
        "causalforcing, raven, realtime_14b (the toy model: its shipped table)",
    )
    _add(
        g,
        only,
        "head_importance",
        "--head-importance",
        type=Path,
        metavar="FILE",
        help='Focused Forcing head importance JSON ({"<layer * num_heads + head>": score}, `fkv profile '
        "importance`) (the toy model: its shipped file)",
    )


def add_backend_args(p: argparse.ArgumentParser, only=None) -> None:
    g = p.add_argument_group("attention backend and devices")
    _add(g, only, "attention_backend", "--attention-backend", default="auto", metavar="NAME", help=BACKEND_HELP)
    _add(
        g, only, "mesh", "--mesh", help="shard over a device mesh, e.g. data=2,model=4 (batch on data, heads on model)"
    )
    _add(
        g,
        only,
        "distributed",
        "--distributed",
        action="store_true",
        help="multi-process: join JAX's distributed runtime with its cluster auto-detection (SLURM, Open MPI, "
        "Cloud TPU); --mesh then spans every process's devices (default mesh: data over all devices)",
    )
    if only is None or "coordinator" in only:
        add_cluster_args(p)


def add_cluster_args(p: argparse.ArgumentParser) -> None:
    """Explicit multi-process flags (docs/cluster.md): one process per host (or per set of devices)."""
    g = p.add_argument_group("several processes (docs/cluster.md)")
    g.add_argument(
        "--coordinator",
        metavar="HOST:PORT",
        help="address of process 0, which serves the runtime's coordinator there (with --num-processes, --process-id)",
    )
    g.add_argument("--num-processes", type=int, metavar="N", help="number of processes of the run")
    g.add_argument("--process-id", type=int, metavar="I", help="this process's index, 0 .. N-1")
    g.add_argument(
        "--local-processes",
        type=int,
        metavar="N",
        help="run N processes of this command on this machine over loopback and wait for them (one command "
        "for a local multi-process run; on a CPU give each process K devices with "
        "XLA_FLAGS=--xla_force_host_platform_device_count=K)",
    )
    g.add_argument(
        "--peer-timeout",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="a process silent for this long is declared dead; the others name it and exit with code 1 (default 30)",
    )


def add_job_args(p: argparse.ArgumentParser) -> None:
    """Batch jobs (fkv_jax/jobs.py): fixed batches, a manifest, resumable reruns."""
    g = p.add_argument_group("batch jobs (mp4 outputs: the toy model and --model-dir)")
    g.add_argument(
        "--batch-size",
        type=int,
        help="videos generated together (default: the toy model min(videos, 8), --model-dir 1; rounded up to a "
        "multiple of the mesh's data axis)",
    )
    g.add_argument(
        "--resume",
        action="store_true",
        help="job mode: fixed file names (no -2 suffix) and skip every video the manifest lists as complete "
        "with its file present; rerun the same command after a crash or pre-emption to finish the rest",
    )
    g.add_argument(
        "--manifest",
        type=Path,
        metavar="FILE.jsonl",
        help="JSON lines, one per finished video (prompt, seed, policy, file, timings), rewritten atomically "
        "by process 0 after every batch (default: OUTPUT_DIR/manifest.jsonl with --resume or several "
        "processes; none for a plain run)",
    )


def add_output_args(
    p: argparse.ArgumentParser,
    only=None,
    output_dir_default: Path | None = Path("outputs"),
    output_dir_help: str | None = None,
) -> None:
    g = p.add_argument_group("output")
    _add(
        g,
        only,
        "output_dir",
        "--output-dir",
        type=Path,
        default=output_dir_default,
        help=output_dir_help
        or "folder of the mp4 files (named <index>_<prompt>_seed<S>[_<policy>][_<preset>].mp4; "
        "an existing file is never overwritten: a -2, -3, ... suffix is added; --resume keeps the names fixed) "
        "and, without "
        "--save-latents, of other models' latents (default: ./outputs)",
    )
    _add(
        g,
        only,
        "save_latents",
        "--save-latents",
        type=Path,
        metavar="FILE.npy",
        help="also write the final latents [B, F, C, H, W] float32 here",
    )
    _add(g, only, "output", "--output", type=Path, required=True, metavar="FILE", help="file to write")
    _add(g, only, "fps", "--fps", type=float, help="frame rate of the mp4 (default 16; the toy-world model: 8)")
    _add(g, only, "no_progress", "--no-progress", action="store_true", help="no progress bars")
