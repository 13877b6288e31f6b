"""Policy evaluation on the toy world: speed and quality of every policy against the full cache.

For each episode (a simulated scene and its prompt) the first ``context_frames`` true frames are pushed
into the cache as clean context (video extension), then every policy continues the video from the same
noise. Generated frames are compared with the full-cache rollout (PSNR, SSIM) and with the simulator's
truth (sprite position error, prompt alignment, identity after occlusion, chunk discontinuity).

Speed definitions (all on this machine, each policy run in the same process, side by side):
  * denoise FPS: generated latent frames / wall time of the chunk steps (all denoising steps and the clean
    pass), excluding the first generated chunk (it includes compilation);
  * end-to-end FPS: the same frames / (that time + converting the whole videos to uint8 and writing them as
    mp4), the toy model being pixel-space (no VAE);
  * resident KV: bytes of the cache arrays + the policy's memory tokens; peak RSS: the process maximum so far.
"""

from __future__ import annotations

import dataclasses
import json
import math
import resource
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from fkv_jax.eval import metrics as M
from fkv_jax.policies import make_policy
from fkv_jax.sampling.rollout import Sampler, rollout

# Forcing-KV on the toy model: one segment per token-grid row (toyworld.model.toy_policy_options).
# `window` is the toy sampler's own cache (by default the weights' training clip length): the quality reference
# whose attention distances all lie inside training, where `full` (every frame, global) goes beyond it once the
# video is longer than the clip.
# The memory family (toyworld.world.make_memory_episode): a sprite hides in the wrap-around gap for at least
# this many frames (default; --min-hidden), longer than `window` keeps with --window 6.
MEMORY_MIN_HIDDEN = 8
FAMILIES = ("random", "memory")
# Ground-truth metrics: lower is better for the *_px ones, higher for the others.
GT_KEYS = (
    "position_error_px",
    "colour_shown",
    "shape_right",
    "identity_after_occlusion",
    "track_24_px",
    "track_48_px",
    "reappear_identity",
    "reappear_position_px",
)


@dataclasses.dataclass
class PolicyResult:
    name: str
    denoise_fps: float = 0.0
    e2e_fps: float = 0.0
    kv_bytes: int = 0
    peak_rss_mib: float = 0.0
    metrics: dict = dataclasses.field(default_factory=dict)
    ci: dict = dataclasses.field(default_factory=dict)  # metric -> (low, high), 95 % bootstrap over episodes


def _kv_bytes(cache, state) -> int:
    mem = sum(int(x.nbytes) for x in jax.tree.leaves(state.get("layers", {})) if getattr(x, "ndim", 0) >= 4)
    return int(cache["k"].nbytes + cache["v"].nbytes) + mem


def _rollout(sampler, params, ctx, noise, init, seed):
    """Generate; returns (frames, denoise seconds excluding the first generated chunk, kv bytes)."""
    stamps = []
    res = rollout(
        sampler,
        params,
        [ctx],
        noise,
        seed=seed,
        initial_latents=init,
        on_chunk=lambda b, r: (jax.block_until_ready(r.x0), stamps.append(time.perf_counter())),
    )
    secs = stamps[-1] - stamps[0] if len(stamps) > 1 else float("nan")
    return np.clip(res.latents, -1, 1), secs, _kv_bytes(res.cache, res.state)


def quality(frames: np.ndarray, ref: np.ndarray, ep, start: int, min_hidden: int = MEMORY_MIN_HIDDEN) -> dict:
    pa = M.prompt_alignment(frames, ep, start)
    back = M.reappearance(frames, ep, start, min_hidden=min_hidden)
    return {
        "psnr_vs_full": M.psnr(frames[start:], ref[start:]),
        "ssim_vs_full": M.ssim(frames[start:], ref[start:]),
        "position_error_px": M.position_error(frames, ep, start),
        "colour_shown": pa["colour"],
        "shape_right": pa["shape"],
        "extra_colour_px": pa["extra_colour_pixels"],
        "identity_after_occlusion": M.identity_after_occlusion(frames, ep, start),
        "chunk_discontinuity": M.chunk_discontinuity(frames[start:]),
        **M.tracking_error(frames, ep, start),
        "reappear_identity": back["identity"],
        "reappear_position_px": back["position_px"],
    }


def build_toy_policies(
    names, cfg, graphdef, params, sampler_cfg, enc, *, profile_frames=24, seed=0, log=print, window=None
):
    """Policies for the toy model; Forcing-KV's head table and Focused Forcing's head importance are profiled
    on the toy model itself (reported in the result)."""
    from fkv_jax.policies.calibration import head_importance, profile_static_dynamic
    from fkv_jax.toyworld.model import toy_context, toy_policy_options
    from fkv_jax.toyworld.world import make_episode, world_for

    calib = []
    for i in range(2):
        ep = make_episode(10_000 + seed + i, profile_frames, world_for(cfg.latent_hw))
        noise = np.random.default_rng(i).standard_normal((1, profile_frames, cfg.in_dim, *cfg.latent_hw))
        calib.append((toy_context([ep.prompt], enc, cfg), noise.astype(np.float32)))

    def make_sampler(policy):
        return Sampler(
            graphdef, cfg, sampler_cfg, batch=1, latent_hw=cfg.latent_hw, num_frames=profile_frames, policy=policy
        )

    out, profiles = {}, {}
    for name in names:
        opts = toy_policy_options(name, cfg)
        if name == "window":
            opts["local_attn_size"] = str(window if window is not None else sampler_cfg.local_attn_size)
        if name == "forcing_kv":
            table, scores = profile_static_dynamic(make_sampler, params, calib, progress=False)
            st, dy = table.counts()
            profiles["forcing_kv_heads"] = {"static": st, "dynamic": dy, "scores": np.round(scores, 3).tolist()}
            log(f"  profiled toy heads (Forcing-KV mass ratio): {st} static, {dy} dynamic")
            out[name] = make_policy(name, opts, head_table=table)
        elif name in ("focused_forcing", "focused_forcing_longlive"):
            imp = head_importance(make_sampler, params, calib[:1], progress=False)
            profiles["head_importance"] = np.round(imp, 4).tolist()
            log(f"  profiled toy head importance (single-head ablation): {imp.min():.3g}..{imp.max():.3g}")
            out[name] = make_policy(name, opts, head_importance=imp)
        else:
            out[name] = make_policy(name, opts)
    return out, profiles


def evaluate(
    policies: list[str],
    *,
    episodes: int = 2,
    frames: int = 120,
    context_frames: int = 3,
    seed: int = 0,
    out_dir: Path,
    weights: str | None = None,
    plots: bool = True,
    vbench_dir: Path | None = None,
    family: str = "random",
    window: int | None = None,
    min_hidden: int = MEMORY_MIN_HIDDEN,
    log=print,
) -> dict:
    from fkv_jax.toyworld.model import load_toy_model, save_video, toy_context, toy_sampler_config
    from fkv_jax.toyworld.world import make_episode, make_memory_episode, world_for

    if family not in FAMILIES:
        raise ValueError(f"unknown episode family {family!r}; one of {', '.join(FAMILIES)}")
    cfg, model, enc = load_toy_model(weights)
    world = world_for(cfg.latent_hw)  # the world the weights were trained on (scaled to their frame size)
    graphdef, params = nnx.split(model, nnx.Param)
    sc = toy_sampler_config(weights)
    c = sc.frames_per_block
    if frames % c or context_frames % c or not 0 < context_frames < frames:
        raise ValueError(
            f"--frames ({frames}) and --context-frames ({context_frames}) must be multiples of {c}, "
            f"with 0 < context < frames"
        )
    if family == "memory":  # fail before any profiling if the length cannot hold a memory episode
        make_memory_episode(seed, frames, context_frames=context_frames, min_hidden=min_hidden, cfg=world)
    log(
        f"toy model {cfg.name}: {cfg.num_layers} layers, {cfg.num_heads} heads, {cfg.tokens_per_frame()} tokens/frame;"
        f" {episodes} episode(s) x {frames} frames, {context_frames} true context frames; policies: {policies}"
    )
    pols, profiles = build_toy_policies(
        [p for p in policies if p != "full"], cfg, graphdef, params, sc, enc, seed=seed, log=log, window=window
    )
    pols = {"full": make_policy("full"), **pols}
    results = {name: PolicyResult(name) for name in pols}
    per_episode = {name: [] for name in pols}
    secs = {name: [0.0, 0] for name in pols}
    enc_secs = {name: 0.0 for name in pols}
    samplers = {
        name: Sampler(graphdef, cfg, sc, batch=1, latent_hw=cfg.latent_hw, num_frames=frames, policy=p)
        for name, p in pols.items()
    }
    examples = {}
    for e in range(episodes):
        if family == "memory":
            ep = make_memory_episode(seed + e, frames, context_frames=context_frames, min_hidden=min_hidden, cfg=world)
        else:
            ep = make_episode(seed + e, frames, world)
        ctx = toy_context([ep.prompt], enc, cfg)
        init = np.asarray(ep.frames[None, :context_frames], np.float32)
        noise = np.random.default_rng((seed, e)).standard_normal((1, frames, cfg.in_dim, *cfg.latent_hw), np.float32)
        ref = None
        for name, sampler in samplers.items():
            video, t, kv = _rollout(sampler, params, ctx, noise, init, seed + e)
            video = video[0]
            ref = video if name == "full" else ref
            generated = frames - context_frames - c  # the first generated chunk is excluded from timing
            secs[name][0] += t
            secs[name][1] += generated
            t0 = time.perf_counter()
            target = (vbench_dir / name / f"{ep.prompt}-{e}.mp4") if vbench_dir else Path(tempfile.mkdtemp()) / "v.mp4"
            target.parent.mkdir(parents=True, exist_ok=True)
            save_video(target, video)
            enc_secs[name] += time.perf_counter() - t0
            results[name].kv_bytes = kv
            per_episode[name].append(quality(video, ref, ep, context_frames, min_hidden))
            if e == 0:
                examples[name] = video
        log(f"  episode {e + 1}/{episodes}: {ep.prompt!r}")
    for name, r in results.items():
        s, n = secs[name]
        r.denoise_fps = n / s if s > 0 else float("nan")
        r.e2e_fps = n / (s + enc_secs[name]) if s > 0 else float("nan")
        r.peak_rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        keys = per_episode[name][0].keys()
        r.metrics = {k: M.mean_ci([m[k] for m in per_episode[name]])[0] for k in keys}
        r.ci = {k: M.mean_ci([m[k] for m in per_episode[name]])[1:] for k in GT_KEYS}
    report = _report(results, profiles, frames, episodes, context_frames)
    report["family"] = family
    report["min_hidden"] = min_hidden
    report["window"] = int(window if window is not None else sc.local_attn_size)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "eval.json").write_text(json.dumps(report, indent=2, default=float) + "\n")
    (out_dir / "eval.md").write_text(_markdown(report))
    if plots:
        _plots(report, examples, samplers["full"], params, out_dir, cfg, sc, enc)
    return report


def _report(results, profiles, frames, episodes, context_frames) -> dict:
    full = results["full"]
    rows = {}
    for name, r in results.items():
        row = {
            "denoise_fps": r.denoise_fps,
            "e2e_fps": r.e2e_fps,
            "speedup": r.denoise_fps / full.denoise_fps,
            "kv_mib": r.kv_bytes / 2**20,
            "peak_rss_mib": r.peak_rss_mib,
            **r.metrics,
            "ci95": r.ci,
        }
        # relative degradation of each ground-truth metric vs full (positive = worse)
        deg = {}
        for k in GT_KEYS:
            a, b = r.metrics.get(k, float("nan")), full.metrics.get(k, float("nan"))
            if not (math.isnan(a) or math.isnan(b)) and b != 0:
                deg[k] = (a - b) / abs(b) if k.endswith("_px") else (b - a) / abs(b)
        row["worst_gt_degradation"] = max(deg.values()) if deg else float("nan")
        rows[name] = row
    return {
        "frames": frames,
        "episodes": episodes,
        "context_frames": context_frames,
        "policies": rows,
        "profiles": profiles,
        "targets": "forcing_kv and focused_forcing: >= 1.4x denoise speedup over full with <= 5 % degradation "
        "of the ground-truth metrics (reported, not enforced)",
    }


def _markdown(report) -> str:
    cols = [
        ("denoise_fps", "denoise FPS", ".2f"),
        ("speedup", "speedup", ".2f"),
        ("e2e_fps", "e2e FPS", ".2f"),
        ("kv_mib", "KV MiB", ".3f"),
        ("psnr_vs_full", "PSNR vs full", ".1f"),
        ("ssim_vs_full", "SSIM", ".3f"),
        ("position_error_px", "pos err px", ".2f"),
        ("colour_shown", "colour", ".2f"),
        ("shape_right", "shape", ".2f"),
        ("identity_after_occlusion", "identity", ".2f"),
        ("chunk_discontinuity", "chunk disc", ".2f"),
        ("worst_gt_degradation", "worst GT degr.", "+.1%"),
    ]
    lines = [
        f"# Toy-world policy evaluation ({report['episodes']} {report.get('family', 'random')} episode(s) x "
        f"{report['frames']} frames, {report['context_frames']} true context frames)",
        "",
        "| policy | " + " | ".join(c[1] for c in cols) + " |",
        "|---" * (len(cols) + 1) + "|",
    ]
    for name, row in report["policies"].items():
        vals = []
        for k, _, fmt in cols:
            v = row.get(k, float("nan"))
            vals.append("n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt))
        lines.append(f"| {name} | " + " | ".join(vals) + " |")
    n = report["episodes"]
    lines += [
        "",
        f"Ground-truth metrics, mean [95 % bootstrap CI over {n} episode(s)] (track_H = position error over the "
        "first H generated frames; reappear = the first 3 fully visible frames after a sprite was hidden "
        f">= {report.get('min_hidden', MEMORY_MIN_HIDDEN)} frames; `window` keeps "
        f"{report.get('window', 'n/a')} frames):",
        "",
        "| policy | " + " | ".join(GT_KEYS) + " |",
        "|---" * (len(GT_KEYS) + 1) + "|",
    ]
    for name, row in report["policies"].items():
        cells = []
        for k in GT_KEYS:
            v, (lo, hi) = row.get(k, float("nan")), row.get("ci95", {}).get(k, (float("nan"), float("nan")))
            if v is None or (isinstance(v, float) and math.isnan(v)):
                cells.append("n/a")
            else:
                cells.append(f"{v:.2f}" + (f" [{lo:.2f}, {hi:.2f}]" if not math.isnan(lo) else ""))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if report["profiles"].get("forcing_kv_heads"):
        h = report["profiles"]["forcing_kv_heads"]
        lines += ["", f"Forcing-KV profiler on the toy model: {h['static']} static, {h['dynamic']} dynamic heads."]
    rss = max(row.get("peak_rss_mib", 0.0) for row in report["policies"].values())
    lines += [
        "",
        f"Peak RSS of the whole run (one process for every policy, so not per policy): {rss:.0f} MiB; "
        "the resident KV of each policy is its `KV MiB`.",
    ]
    lines += ["", f"Targets: {report['targets']}.", ""]
    return "\n".join(lines)


def _plots(report, examples, sampler, params, out_dir: Path, cfg, sc, enc) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        (out_dir / "PLOTS_SKIPPED.txt").write_text("matplotlib is not installed: pip install matplotlib\n")
        return
    rows = report["policies"]
    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    for name, r in rows.items():
        ax[0].scatter(r["speedup"], r.get("position_error_px", np.nan), label=name)
        ax[1].scatter(
            r["speedup"],
            r.get("psnr_vs_full", np.nan) if np.isfinite(r.get("psnr_vs_full", np.nan)) else 60,
            label=name,
        )
    ax[0].set(
        title="speed vs truth", xlabel="denoise speedup over full", ylabel="sprite position error (px, lower is better)"
    )
    ax[1].set(
        title="speed vs agreement with full",
        xlabel="denoise speedup over full",
        ylabel="PSNR vs full (dB; full plotted at 60)",
    )
    ax[0].legend(fontsize=7)
    fig.suptitle(f"KV policies on the toy world ({report['episodes']} episode(s) x {report['frames']} frames)")
    fig.tight_layout()
    fig.savefig(out_dir / "frontier.png", dpi=100)
    plt.close(fig)
    _attention_plot(sampler, params, out_dir, cfg, sc, enc, plt)


def _attention_plot(sampler, params, out_dir, cfg, sc, enc, plt) -> None:
    """Per-head attention mass over key frames for the clean pass of every chunk (a few heads)."""
    from fkv_jax.policies.calibration import AttentionMassProbe
    from fkv_jax.toyworld.model import toy_context
    from fkv_jax.toyworld.world import make_episode, world_for

    frames = 24
    ep = make_episode(123, frames, world_for(cfg.latent_hw))
    s = Sampler(
        sampler._graphdef,
        cfg,
        sc,
        batch=1,
        latent_hw=cfg.latent_hw,
        num_frames=frames,
        policy=AttentionMassProbe(max_frames=frames),
    )
    masses = []
    noise = np.random.default_rng(0).standard_normal((1, frames, cfg.in_dim, *cfg.latent_hw), np.float32)
    s.generate(
        params,
        toy_context([ep.prompt], enc, cfg),
        noise,
        progress=False,
        on_chunk=lambda b, r: masses.append(np.asarray(r.select_aux)[-1]),
    )  # clean pass: [L, H, F]
    m = np.stack(masses)  # [chunks, L, H, F]
    heads = [(0, 0), (cfg.num_layers // 2, 1 % cfg.num_heads), (cfg.num_layers - 1, cfg.num_heads - 1)]
    fig, ax = plt.subplots(1, len(heads), figsize=(4 * len(heads), 3.2))
    for a, (layer, head) in zip(ax, heads):
        mm = m[:, layer, head]
        im = a.imshow(mm / np.maximum(mm.sum(-1, keepdims=True), 1e-9), aspect="auto", cmap="viridis", vmin=0)
        a.set(title=f"layer {layer} head {head}", xlabel="key frame", ylabel="query chunk")
        fig.colorbar(im, ax=a, label="share of attention mass")
    fig.suptitle("attention mass over key frames, clean pass of each chunk (full cache)")
    fig.tight_layout()
    fig.savefig(out_dir / "attention.png", dpi=100)
    plt.close(fig)
