"""Checks and loaders shared by the subcommands. Everything here raises :class:`UsageError` with one line
naming the flag; the cheap checks (paths, sizes, options, backend) run before any weight is loaded."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import sys
import time
from pathlib import Path

import numpy as np

from fkv_jax.cli import UsageError

DEFAULT_PROMPT = "a red circle and a blue square"
MODEL_ALIASES = {"1.3b": "wan2.1-t2v-1.3b", "wan-1.3b": "wan2.1-t2v-1.3b", "wan2.1-1.3b": "wan2.1-t2v-1.3b"}
TOY_SAMPLERS = ("toy", "toyworld")  # --preset names of the toy model's own sampler (the `toy` sampler preset)
TOY_HEAD_TABLE = "forcingkv_heads.json"  # beside the toy weights: `fkv profile heads` on the toy model
TOY_IMPORTANCE = "head_importance.json"  # beside the toy weights: `fkv profile importance` on the toy model


# ---- values -------------------------------------------------------------------------------------------------


def parse_hw(text: str, flag: str = "--latent-size") -> tuple[int, int]:
    try:
        h, w = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise UsageError(f"{flag} must look like 60x104 (latent height x width), got {text!r}") from None
    if h < 1 or w < 1:
        raise UsageError(f"{flag} must be positive, got {text!r}")
    return h, w


def parse_int_list(text: str, flag: str, minimum: int | None = None) -> list[int]:
    try:
        values = [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise UsageError(f"{flag} must be comma-separated integers, got {text!r}") from None
    if not values:
        raise UsageError(f"{flag} is empty")
    if minimum is not None and min(values) < minimum:
        raise UsageError(f"{flag} values must be >= {minimum}, got {text!r}")
    if len(set(values)) != len(values):
        raise UsageError(f"{flag} repeats a value: {text!r}")
    return values


def check_at_least(flag: str, value, minimum) -> None:
    if value is not None and value < minimum:
        raise UsageError(f"{flag} must be >= {minimum}, got {value}")


def seeds_of(args) -> list[int]:
    """--seeds S1,S2 or --seed S (both >= 0: numpy seeds are non-negative)."""
    check_at_least("--seed", args.seed, 0)
    if getattr(args, "seeds", None):
        return parse_int_list(args.seeds, "--seeds", minimum=0)
    return [args.seed]


# ---- paths -------------------------------------------------------------------------------------------------


def check_input_file(path: Path, flag: str, made_by: str | None = None) -> Path:
    """An existing, readable regular file."""
    hint = f" (make one with `{made_by}`)" if made_by else ""
    if path.is_dir():
        raise UsageError(f"{flag} {path} is a directory; expected a file{hint}")
    if not path.is_file():
        raise UsageError(f"{flag} not found: {path}{hint}")
    if not os.access(path, os.R_OK):
        raise UsageError(f"{flag} file {path} is not readable")
    return path


def _existing_ancestor(path: Path) -> Path:
    p = path.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def check_output_dir(folder: Path, flag: str) -> Path:
    """A folder that exists and is writable, or can be created (nothing is created here)."""
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"{flag} {folder} exists and is not a directory")
    base = _existing_ancestor(folder)
    if not base.is_dir():
        raise UsageError(f"{flag} {folder} cannot be created: {base} is a file")
    if not os.access(base, os.W_OK | os.X_OK) or not _can_create_in(base):
        raise UsageError(f"{flag} {folder} is not writable ({base} does not accept new files)")
    return folder


def _can_create_in(folder: Path) -> bool:
    """A real probe (os.access says yes to root on read-only or virtual file systems): create and delete a file."""
    import tempfile

    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".fkv-probe-")
    except OSError:
        return False
    os.close(fd)
    os.unlink(tmp)
    return True


def check_output_file(path: Path, flag: str, suffixes: tuple[str, ...] = ()) -> Path:
    """A file that can be written: not a directory, its folder writable or creatable."""
    if path.is_dir():
        raise UsageError(f"{flag} {path} is a directory; give a file name, e.g. {path / 'out.npy'}")
    if suffixes and path.suffix.lower() not in suffixes:
        raise UsageError(f"{flag} must end in {' or '.join(suffixes)}, got {path}")
    if path.exists() and not os.access(path, os.W_OK):
        raise UsageError(f"{flag} {path} exists and is not writable")
    check_output_dir(path.parent, f"{flag}'s folder")
    return path


def make_dir(folder: Path, flag: str) -> Path:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"cannot create {flag} {folder}: {e.strerror or e}") from None
    return folder


def unique_path(path: Path, taken: set[Path]) -> Path:
    """``path``, or ``stem-2.ext``, ``stem-3.ext``, ... when it exists or another output of this run uses it."""
    out, n = path, 1
    while out.exists() or out in taken:
        n += 1
        out = path.with_name(f"{path.stem}-{n}{path.suffix}")
    taken.add(out)
    return out


def output_tags(args, kind: str) -> list[str]:
    """Name parts that tell outputs of different settings apart: the policy and the sampler preset."""
    tags = []
    if getattr(args, "policy", None):
        tags.append(args.policy)
    if getattr(args, "preset", None) and args.preset not in TOY_SAMPLERS:
        tags.append(args.preset)
    return tags


# ---- prompts -------------------------------------------------------------------------------------------------


def read_prompts(path: Path) -> list[str]:
    """Non-empty lines of a UTF-8 prompts file (:func:`fkv_jax.pipeline.read_prompt_lines`)."""
    from fkv_jax.pipeline import PipelineError, read_prompt_lines

    try:
        return read_prompt_lines(path)
    except PipelineError as e:
        raise UsageError(str(e)) from None


def prompt_of(args) -> str | None:
    prompt_arg = getattr(args, "prompt_arg", None)
    if args.prompt and prompt_arg:
        raise UsageError("give the prompt either positionally or with --prompt, not both")
    prompt = args.prompt or prompt_arg
    if prompt is not None and not prompt.strip():
        raise UsageError("empty prompt")
    return prompt


# ---- models -------------------------------------------------------------------------------------------------


def model_kind(args) -> str:
    """Which model the flags select: "checkpoint", "random" (--model-preset) or "toy" (the default)."""
    if args.checkpoint is not None and args.model_preset is not None:
        raise UsageError("--checkpoint and --model-preset are two different models; give one")
    if args.toy_weights is not None and (args.checkpoint is not None or args.model_preset is not None):
        raise UsageError("--toy-weights selects the toy-world model; it cannot go with --checkpoint or --model-preset")
    if args.checkpoint is not None and not args.checkpoint.is_dir():
        raise UsageError(
            f"--checkpoint directory not found: {args.checkpoint} (make one with `fkv convert --input "
            "CHECKPOINT.pt --output DIR`)"
        )
    if args.toy_weights is not None and not args.toy_weights.is_dir():
        raise UsageError(
            f"cannot load --toy-weights {args.toy_weights}: not a directory (train and export one with "
            "`python -m fkv_jax.toyworld.train --export DIR`)"
        )
    return "checkpoint" if args.checkpoint is not None else "random" if args.model_preset is not None else "toy"


def preset_name(name: str) -> str:
    return MODEL_ALIASES.get(name.lower(), name)


def toy_weights_dir(args) -> Path:
    from fkv_jax.toyworld.model import WEIGHTS_DIR

    return Path(args.toy_weights) if args.toy_weights is not None else WEIGHTS_DIR


def model_config(args, kind: str):
    """(ModelConfig, stored dtype name) from config files only: no weights are read."""
    if kind == "checkpoint":
        from fkv_jax.checkpoint import CheckpointError, read_info

        try:
            info = read_info(args.checkpoint)
        except (CheckpointError, OSError, ValueError) as e:
            raise UsageError(f"cannot load --checkpoint {args.checkpoint}: {e}") from None
        return info.cfg, info.dtype
    if kind == "random":
        from fkv_jax.config import model_preset

        try:
            return model_preset(preset_name(args.model_preset)), "float32"
        except ValueError as e:
            raise UsageError(f"--model-preset: {e} (alias: 1.3b)") from None
    import json

    from fkv_jax.config import ModelConfig

    meta = toy_weights_dir(args) / "config.json"
    where = "--toy-weights" if args.toy_weights is not None else "the shipped toy-world weights"
    try:
        return ModelConfig.from_dict(json.loads(meta.read_text())["model"]), "float32"
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UsageError(f"cannot load {where}: {meta}: {type(e).__name__}: {e}") from None


def load_model(args, kind: str, progress: bool = True):
    """(ModelConfig, CausalWanModel, toy text encoder or None, description); a progress line while loading."""
    from tqdm.auto import tqdm

    dtype = getattr(args, "dtype", None)
    bar = tqdm(total=1, desc="loading model", unit="model", disable=None if progress else True, leave=False)
    try:
        if kind == "checkpoint":
            from fkv_jax.checkpoint import load_transformer

            try:
                cfg, model = load_transformer(args.checkpoint, dtype)
            except (OSError, ValueError) as e:
                raise UsageError(f"cannot load --checkpoint {args.checkpoint}: {e}") from None
            return cfg, model, None, f"checkpoint {args.checkpoint}"
        if kind == "random":
            import jax.numpy as jnp

            from fkv_jax.model.build import init_model

            cfg, _ = model_config(args, kind)
            return (
                cfg,
                init_model(cfg, seed=0, dtype=jnp.dtype(dtype or "float32")),
                None,
                f"random-weight model '{cfg.name}'",
            )
        from fkv_jax.toyworld.model import load_toy_model

        try:
            cfg, model, text_encoder = load_toy_model(None if args.toy_weights is None else str(args.toy_weights))
        except (OSError, ValueError, KeyError) as e:
            where = "--toy-weights" if args.toy_weights is not None else "the shipped toy-world weights"
            raise UsageError(f"cannot load {where}: {e}") from None
        if dtype not in (None, "float32"):
            from fkv_jax.model.build import cast_model

            model = cast_model(cfg, model, dtype)
        return cfg, model, text_encoder, f"toy-world model ({args.toy_weights or 'shipped weights'})"
    finally:
        bar.update(1)
        bar.close()


def load_npy(path: Path, what: str) -> np.ndarray:
    check_input_file(path, what)
    try:
        return np.load(path, allow_pickle=False)
    except Exception as e:  # noqa: BLE001 - any unreadable file is a usage error here
        raise UsageError(f"cannot read {what} file {path}: {type(e).__name__}: {e}") from None


def stand_in_embedding(prompt: str, text_len: int, text_dim: int) -> np.ndarray:
    """Deterministic stand-in for the text encoder (random-weight models): [text_len, text_dim]."""
    seed = int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:8], "little")
    n = min(len(prompt.split()) + 1, text_len)
    out = np.zeros((text_len, text_dim), np.float32)
    out[:n] = np.random.default_rng(seed).standard_normal((n, text_dim)).astype(np.float32)
    return out


def text_source(args, kind: str) -> tuple[list[str] | None, Path | None]:
    """(prompts, None) or (None, --text-embeddings file), checked without loading any model."""
    prompt = prompt_of(args)
    emb = getattr(args, "text_embeddings", None)
    sources = [x for x in (prompt, args.prompts, emb) if x]
    if len(sources) > 1:
        raise UsageError("use only one of PROMPT/--prompt, --prompts and --text-embeddings")
    if emb:
        for f in emb if isinstance(emb, list) else [emb]:
            check_input_file(f, "--text-embeddings")
        return None, emb
    if kind == "checkpoint":
        raise UsageError(
            "this checkpoint needs the text encoder output: pass --text-embeddings FILE.npy "
            "([B, L, text_dim] UMT5 output), or use --model-dir DIR for prompts -> mp4; "
            "prompts alone are only accepted by the embedded models"
        )
    if args.prompts is not None:
        return read_prompts(args.prompts), None
    return [prompt if prompt is not None else DEFAULT_PROMPT], None


def check_toy_words(prompts: list[str], cfg) -> None:
    """Every prompt word is in the toy vocabulary and fits text_len (cheap, before loading the model)."""
    from fkv_jax.toyworld.text import tokenize

    try:
        tokenize(list(prompts), cfg.text_len)
    except ValueError as e:
        raise UsageError(str(e)) from None


def embeddings_context(path: Path, cfg) -> np.ndarray:
    ctx = load_npy(path, "--text-embeddings")
    if ctx.ndim == 2:
        ctx = ctx[None]
    if ctx.ndim != 3 or ctx.shape[2] != cfg.text_dim or ctx.shape[1] > cfg.text_len:
        raise UsageError(
            f"--text-embeddings {path} has shape {ctx.shape}; expected "
            f"[B, L<={cfg.text_len}, {cfg.text_dim}] for this model"
        )
    return ctx.astype(np.float32)


def prompts_context(prompts: list[str], cfg, kind: str, text_encoder=None) -> np.ndarray:
    """[B, L, text_dim] float32 for prompts: the toy text encoder, or stand-in embeddings for random models."""
    if kind == "toy":
        from fkv_jax.toyworld.model import toy_context

        try:
            return toy_context(prompts, text_encoder, cfg)
        except ValueError as e:
            raise UsageError(str(e)) from None
    return np.stack([stand_in_embedding(p, cfg.text_len, cfg.text_dim) for p in prompts])


# ---- sampler, policy, backend -----------------------------------------------------------------------------


def base_sampler_config(args, kind: str):
    """--preset for the Wan models (default self_forcing); the toy model's own sampler for the toy model."""
    from fkv_jax.config import list_presets, sampler_preset

    preset = getattr(args, "preset", None)
    wan = [n for n in list_presets("samplers") if n not in TOY_SAMPLERS]
    if kind == "toy":
        if preset not in (None, *TOY_SAMPLERS):
            raise UsageError(
                f"--preset {preset}: "
                + (
                    "a sampler of the distilled Wan models (flow prediction, re-noised steps); "
                    if preset in wan
                    else "unknown sampler preset; "
                )
                + "the toy-world model has its own (x0 prediction, 16 Euler steps: the `toy` sampler preset) "
                "and uses it by default: drop --preset, or change steps/window with --denoising-steps, "
                "--local-attn-size, --sink-size"
            )
        from fkv_jax.toyworld.model import toy_sampler_config

        return toy_sampler_config(args.toy_weights)
    if preset in TOY_SAMPLERS:
        raise UsageError(
            f"--preset {preset} is the toy-world model's sampler; with --checkpoint / "
            f"--model-preset / --model-dir use one of {', '.join(wan)}"
        )
    try:
        return sampler_preset(preset or "self_forcing")
    except ValueError as e:
        raise UsageError(str(e)) from None


def sampler_config(args, kind: str):
    """The base sampler with --frames-per-block, --local-attn-size, --sink-size and --denoising-steps applied."""
    sc = base_sampler_config(args, kind)
    over = {}
    check_at_least("--frames-per-block", getattr(args, "frames_per_block", None), 1)
    check_at_least("--sink-size", getattr(args, "sink_size", None), 0)
    if getattr(args, "frames_per_block", None) is not None:
        over["frames_per_block"] = args.frames_per_block
    las = getattr(args, "local_attn_size", None)
    if las is not None:
        if las == 0 or las < -1:
            raise UsageError(f"--local-attn-size must be -1 (global) or a positive number of frames, got {las}")
        over["local_attn_size"] = las
        if getattr(args, "sink_size", None) is None and las == -1:
            over["sink_size"] = 0
    if getattr(args, "sink_size", None) is not None:
        over["sink_size"] = args.sink_size
    if getattr(args, "denoising_steps", None):
        try:
            steps = tuple(float(x) for x in args.denoising_steps.split(","))
        except ValueError:
            raise UsageError(
                f"--denoising-steps must be comma-separated numbers, got {args.denoising_steps!r}"
            ) from None
        if any(not 0 < s <= 1000 for s in steps):
            raise UsageError(f"--denoising-steps must lie in (0, 1000], got {args.denoising_steps!r}")
        over["denoising_steps"] = steps
    try:
        return dataclasses.replace(sc, **over)
    except (TypeError, ValueError) as e:
        raise UsageError(str(e)) from None


def check_frames(frames: int | None, sampler_cfg, flag: str = "--frames") -> None:
    if frames is None:
        return
    c = sampler_cfg.frames_per_block
    if frames < 1 or frames % c:
        raise UsageError(f"{flag} must be a positive multiple of frames_per_block={c}, got {frames}")


def build_policy(args, cfg, kind: str):
    """--policy with its options; the toy model gets its shipped head table / importance file by default."""
    from fkv_jax.policies import POLICIES, make_policy, parse_options

    if args.policy is None:
        if args.policy_opt or args.head_table or args.head_importance:
            raise UsageError("--policy-opt, --head-table and --head-importance need --policy")
        return None
    if args.policy not in POLICIES:
        raise UsageError(f"unknown policy {args.policy!r}; available: {', '.join(sorted(POLICIES))}")
    if getattr(args, "local_attn_size", None) is not None or getattr(args, "sink_size", None) is not None:
        raise UsageError(
            "--local-attn-size/--sink-size describe the plain cache; with --policy set the window "
            "through --policy-opt (e.g. local_attn_size=12, sink_size=3)"
        )
    try:
        opts = parse_options(args.policy_opt)
    except ValueError as e:
        raise UsageError(str(e)) from None
    head_table, importance = args.head_table, args.head_importance
    takes_table = args.policy == "forcing_kv"
    takes_importance = args.policy.startswith("focused_forcing")
    if head_table is not None:
        if not takes_table:
            raise UsageError(f"--head-table is Forcing-KV's; policy {args.policy} takes none")
        p = Path(head_table)
        if p.is_dir():
            raise UsageError(
                f"--head-table {p} is a directory; expected a JSON file (make one with "
                "`fkv profile heads ... --output heads.json`) or a packaged table name"
            )
        if (p.suffix == ".json" or "/" in head_table) and not p.is_file():
            raise UsageError(
                f"--head-table file not found: {p} (make one with `fkv profile heads ... --output {p.name}`)"
            )
    if importance is not None:
        if not takes_importance:
            raise UsageError(f"--head-importance is Focused Forcing's; policy {args.policy} takes none")
        check_input_file(importance, "--head-importance", "fkv profile importance ... --output importance.json")
    if kind == "toy":
        from fkv_jax.toyworld.model import toy_policy_options

        for k, v in toy_policy_options(args.policy, cfg).items():  # Forcing-KV: one segment per token-grid row
            opts.setdefault(k, v)
        folder = toy_weights_dir(args)
        if takes_table and head_table is None and (folder / TOY_HEAD_TABLE).is_file():
            head_table = str(folder / TOY_HEAD_TABLE)
        if takes_importance and importance is None:
            importance = folder / TOY_IMPORTANCE
            if not importance.is_file():
                raise UsageError(
                    f"--policy {args.policy} needs per-head importance scores and {folder} has no "
                    f"{TOY_IMPORTANCE}: make one with `fkv profile importance --toy-weights {folder} "
                    f"--output {importance}` (or pass --head-importance FILE)"
                )
    elif takes_importance and importance is None:
        raise UsageError(
            f"--policy {args.policy} needs --head-importance FILE (per-head scores; make one with "
            "`fkv profile importance --checkpoint DIR --text-embeddings a.npy --output importance.json`)"
        )
    try:
        return make_policy(
            args.policy,
            opts,
            head_table=head_table,
            head_importance=importance,
            num_layers=cfg.num_layers,
            num_heads=cfg.num_heads,
        )
    except (ValueError, TypeError) as e:
        raise UsageError(str(e)) from None


def check_backend(name: str, cfg, latent_hw, dtype: str, cache_dtype: str | None, frames_per_block: int) -> str:
    """Resolve --attention-backend for this machine and model (no weights needed); returns the resolved name."""
    from fkv_jax.attention.backends import BackendError, resolve_backend

    try:
        tokens = cfg.tokens_per_frame(tuple(latent_hw))
        resolved, _ = resolve_backend(
            name,
            dtype=dtype,
            cache_dtype=cache_dtype or dtype,
            head_dim=cfg.head_dim,
            tokens_per_frame=tokens,
            query_tokens_per_group=None,
        )
    except BackendError as e:
        raise UsageError(f"--attention-backend: {e}") from None
    except ValueError as e:
        raise UsageError(str(e)) from None
    return resolved


def check_mesh(spec: str | None) -> None:
    if not spec:
        return
    import jax

    from fkv_jax.parallel.mesh import parse_mesh_spec

    try:
        parse_mesh_spec(spec, jax.device_count())
    except ValueError as e:
        raise UsageError(f"--mesh: {e}") from None


def enable_compilation_cache() -> None:
    """Persist compiled executables between runs (FKV_JAX_CACHE_DIR, default ~/.cache/fkv_jax/xla; '' = off)."""
    import jax

    path = os.environ.get("FKV_JAX_CACHE_DIR", str(Path.home() / ".cache" / "fkv_jax" / "xla"))
    if path:
        jax.config.update("jax_compilation_cache_dir", path)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


# ---- expectations ------------------------------------------------------------------------------------------


def _matmul_rate() -> float:
    """This machine's float32 matmul rate in FLOP/s (a 0.1 s probe)."""
    import jax
    import jax.numpy as jnp

    n = 512
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    t0, reps = time.perf_counter(), 0
    while time.perf_counter() - t0 < 0.1:
        f(a).block_until_ready()
        reps += 1
    return 2 * n**3 * reps / (time.perf_counter() - t0)


def run_flops(
    cfg,
    tokens_per_frame: int,
    frames: int,
    calls_per_chunk: int,
    frames_per_block: int,
    batch: int,
    history_frames: int,
) -> float:
    """Rough FLOPs of a rollout: 2 x params x tokens for every model call, plus attention over the kept history."""
    from fkv_jax.model.build import count_params

    n_chunks = frames // frames_per_block
    q = frames_per_block * tokens_per_frame
    dense = 2 * count_params(cfg) * q
    attn = 4 * cfg.num_layers * cfg.dim * q * (history_frames + frames_per_block) * tokens_per_frame
    return float(batch * n_chunks * calls_per_chunk * (dense + attn))


def print_estimate(
    cfg, sampler, frames: int, batch: int, log=lambda s: print(s, file=sys.stderr), threshold_s: float = 60.0
) -> float | None:
    """Before a run that will take minutes on a CPU: print an estimate (labelled as one). Returns seconds."""
    import jax

    if jax.default_backend() != "cpu":
        return None
    geom = sampler.geom
    history = min(frames, geom.num_slots) // 2  # frames attended on average
    flops = run_flops(
        cfg,
        cfg.tokens_per_frame(sampler.latent_hw),
        frames,
        sampler.schedule.num_steps + 1,
        sampler.sampler_cfg.frames_per_block,
        batch,
        history,
    )
    if flops < 1e12:  # a second or two: not worth a probe
        return None
    secs = flops / max(_matmul_rate() for _ in range(2))
    if secs >= threshold_s:
        took = f"{secs / 3600:.1f} hours" if secs >= 7200 else f"{secs / 60:.0f} min"
        log(
            f"estimate: about {took} on this CPU ({flops / 1e12:.0f} TFLOP at this machine's measured "
            f"matmul rate; an estimate, not a measurement). Smaller: --frames, --latent-size, --model-preset tiny."
        )
    return secs


# ---- several processes ---------------------------------------------------------------------------------------


def cluster_spec(args):
    """The :class:`~fkv_jax.distributed.ClusterSpec` of --distributed / --coordinator ... (None: one process),
    checked without touching the network."""
    from fkv_jax.distributed import ClusterSpec

    explicit = [getattr(args, k, None) for k in ("coordinator", "num_processes", "process_id")]
    local = getattr(args, "local_processes", None)
    if local is not None:
        if local < 1:
            raise UsageError(f"--local-processes must be >= 1, got {local}")
        if args.distributed or any(v is not None for v in explicit):
            raise UsageError(
                "--local-processes starts the processes itself; drop --distributed / --coordinator / "
                "--num-processes / --process-id"
            )
    if not args.distributed and all(v is None for v in explicit):
        if getattr(args, "peer_timeout", 30.0) < 1:
            raise UsageError(f"--peer-timeout must be >= 1 second, got {args.peer_timeout:g}")
        return None
    spec = ClusterSpec(*explicit, auto=args.distributed, peer_timeout=args.peer_timeout)
    try:
        spec.check()
    except ValueError as e:
        raise UsageError(str(e)) from None
    return spec


def data_axis(mesh_spec: str | None) -> int:
    """Size of the data axis of --mesh on this run's devices (1 without a mesh)."""
    if not mesh_spec:
        return 1
    import jax

    from fkv_jax.parallel.mesh import parse_mesh_spec

    try:
        return parse_mesh_spec(mesh_spec, jax.device_count())["data"]
    except ValueError as e:
        raise UsageError(f"--mesh: {e}") from None


def manifest_path(args, rt) -> Path | None:
    """--manifest, or OUTPUT_DIR/manifest.jsonl for a --resume job or a run of several processes; a plain
    single-process run keeps none. Checked (writable, .jsonl) here."""
    from fkv_jax.jobs import MANIFEST_NAME

    path = args.manifest or (args.output_dir / MANIFEST_NAME if args.resume or rt.multi else None)
    if path is not None:
        check_output_file(path, "--manifest", (".jsonl",))
    return path


def job_entries(manifest: Path | None, rt) -> list[dict]:
    """The manifest's entries, read by process 0 (the others get [])."""
    from fkv_jax.jobs import ManifestError, read_manifest

    if manifest is None or not rt.is_main:
        return []
    try:
        return read_manifest(manifest)
    except ManifestError as e:
        raise UsageError(str(e)) from None
