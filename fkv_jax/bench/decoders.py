"""Video decoders side by side: TAEHV (the tiny preview decoder) against the Wan2.1 VAE decode.

    python -m fkv_jax.bench.decoders                         # 8x13 latents (64x104 px), 2 chunks of 3, 3 repeats
    python -m fkv_jax.bench.decoders --latent-hw 60x104      # the real 480x832 size (very slow on a CPU)

Both decoders have their real channel counts (Wan2.1 VAE: dim 96, mult 1/2/4/4; TAEHV: 256/128/64/64, the
taew2_1 layout) and random weights (the time does not depend on the values). Each repeat streams the same
latents through both, chunk by chunk as the sampler emits them (``stream()``: 3 latent frames per chunk), the
two decoders interleaved: the first chunk of a video gives 9 frames, every later one 12. The table shows the
medians over repeats of the first chunk's and of the later chunks' wall time (host numpy output included,
compilation excluded: one warm-up video first, whose time is shown as "first call"), the frames per second of
the later chunks and the ratio Wan VAE / TAEHV.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from fkv_jax.bench.common import median, rss_mib
from fkv_jax.vae.codec import VAE
from fkv_jax.vae.model import VAEConfig, WanVAE
from fkv_jax.vae.taehv import TAEHV, TAEHVConfig, TAEHVDecoder


def _randomize(model, seed: int, dtype):
    """Small random values for every param (zeros could hit special fast paths); numpy draws, no compiles."""
    gdef, params = nnx.split(model, nnx.Param)
    rng = np.random.default_rng(seed)
    params = jax.tree.map(lambda p: jnp.asarray(0.02 * rng.standard_normal(p.shape, np.float32), dtype), params)
    return nnx.merge(gdef, params)


def build(dtype) -> dict[str, object]:
    """The two decoders, real widths, random weights."""
    wan_cfg, tae_cfg = VAEConfig(), TAEHVConfig()
    wan = VAE(wan_cfg, _randomize(WanVAE(wan_cfg, dtype=dtype), 0, dtype))
    tae = TAEHV(tae_cfg, _randomize(TAEHVDecoder(tae_cfg, dtype=dtype), 1, dtype))
    return {"Wan2.1 VAE": wan, "TAEHV": tae}


def stream_times(dec, latents: np.ndarray, chunk: int) -> list[float]:
    """Wall time of each chunk of one streamed video (until its frames are on the host)."""
    s, times = dec.stream(), []
    for start in range(0, latents.shape[1], chunk):
        t0 = time.perf_counter()
        video = s(latents[:, start : start + chunk])
        times.append(time.perf_counter() - t0)
        assert np.isfinite(video).all()
    return times


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m fkv_jax.bench.decoders",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--latent-hw", default="8x13", metavar="HxW", help="latent height x width (default 8x13)")
    p.add_argument("--chunks", type=int, default=2, help="chunks per video (default 2: a first and a later one)")
    p.add_argument("--chunk", type=int, default=3, help="latent frames per chunk (default 3, the sampler's)")
    p.add_argument("--repeats", type=int, default=3, help="timed videos per decoder (default 3; medians)")
    p.add_argument("--batch", type=int, default=1, help="videos decoded together (default 1)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="compute dtype")
    args = p.parse_args(argv)
    try:
        h, w = (int(v) for v in args.latent_hw.lower().split("x"))
    except ValueError:
        p.error(f"--latent-hw must be HxW, e.g. 16x26, got {args.latent_hw!r}")
    if min(h, w) < 1:
        p.error(f"--latent-hw must be positive, got {args.latent_hw}")
    for flag, value, low in (("--chunks", args.chunks, 2), ("--chunk", args.chunk, 1), ("--repeats", args.repeats, 1)):
        if value < low:
            p.error(f"{flag} must be >= {low}, got {value}")
    if args.batch < 1:
        p.error(f"--batch must be >= 1, got {args.batch}")

    dtype = jnp.dtype(args.dtype)
    decoders = build(dtype)
    f = args.chunks * args.chunk
    latents = np.random.default_rng(0).standard_normal((args.batch, f, 16, h, w)).astype(np.float32)
    frames_first, frames_later = 4 * args.chunk - 3, 4 * args.chunk
    print(
        f"latents [{args.batch}, {f}, 16, {h}, {w}] -> {4 * f - 3} frames of {8 * h}x{8 * w}, {args.chunks} chunks of "
        f"{args.chunk} ({frames_first} frames, then {frames_later}); {args.dtype}; {args.repeats} repeats; "
        f"jax {jax.__version__} on {jax.devices()[0].platform} ({jax.devices()[0].device_kind})"
    )
    for name, dec in decoders.items():
        params = nnx.to_pure_dict(dec.params)
        if name != "TAEHV":  # the Wan VAE's decode path: conv2 and the decoder (not the encoder)
            params = {k: params[k] for k in ("conv2", "decoder")}
        print(f"  {name}: {sum(x.size for x in jax.tree.leaves(params)) / 1e6:.2f} M decoder params")

    warm = {}
    for name, dec in decoders.items():  # compile (first and later chunk shapes)
        t0 = time.perf_counter()
        stream_times(dec, latents, args.chunk)
        warm[name] = time.perf_counter() - t0
    first = {k: [] for k in decoders}
    later = {k: [] for k in decoders}
    for _ in tqdm(range(args.repeats), desc="repeats", unit="video"):
        for name, dec in decoders.items():  # interleaved: both see the same machine load
            t = stream_times(dec, latents, args.chunk)
            first[name].append(t[0])
            later[name].extend(t[1:])

    rows = []
    for name in decoders:
        tf, tl = median(first[name]), median(later[name])
        rows.append((name, warm[name], tf, tl, args.batch * frames_later / tl))
    wan, tae = rows[0], rows[1]
    print("\n| decoder | first call (compile + run) s | first chunk s | later chunk s | frames/s (later) |")
    print("|---|---|---|---|---|")
    for name, wt, tf, tl, fps in rows:
        print(f"| {name} | {wt:.2f} | {tf:.3f} | {tl:.3f} | {fps:.1f} |")
    print(
        f"\nWan VAE / TAEHV: first chunk {wan[2] / tae[2]:.1f}x, later chunks {wan[3] / tae[3]:.1f}x "
        f"(medians of {args.repeats} first chunks and {args.repeats * (args.chunks - 1)} later chunks); "
        f"RSS {rss_mib():.0f} MiB"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
