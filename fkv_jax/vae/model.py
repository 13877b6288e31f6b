"""The Wan2.1 video VAE in Flax NNX, channel-last, with the causal-conv feature cache as explicit state.

Structure (Wan ``wan/modules/vae.py``, ``_video_vae``: dim 96, z_dim 16, dim_mult [1, 2, 4, 4], 2 residual
blocks per level, no attention outside the middle, temporal downsampling at the 2nd and 3rd resample)::

    encode: video [B, 1 + 4k, H, W, 3] -> Encoder3d (first frame alone, then chunks of 4) -> conv1 -> mu
    decode: latents [B, 1 + k, H/8, W/8, 16] -> conv2 -> Decoder3d (one latent frame at a time) -> video

* Every 3x3x3 ``CausalConv3d`` pads time with 2 frames in front; across calls those 2 frames are the last
  2 frames the conv saw (its cache), zeros at the start of a video.
* RMS norm: ``x / max(||x||_2, 1e-12) * sqrt(C) * gamma`` over channels.
* Middle attention: per frame, one head over the H*W positions, scale ``1/sqrt(C)``.
* Decoder temporal upsample (``upsample3d``): a (3,1,1) causal conv to 2C channels whose halves become two
  consecutive frames, then nearest x2 in space and a 3x3 conv to C/2. The very first latent frame of a video
  skips the temporal conv (upstream's "Rep" marker), so latent 0 gives 1 video frame and every later latent 4;
  the temporal conv's history starts from zeros at latent 1 (it never sees latent 0).
* Encoder temporal downsample (``downsample3d``): spatial stride-2 conv, then a (3,1,1) stride-2 conv over
  [last frame of the previous chunk, this chunk]; the first chunk skips it.

The feature cache is a list of arrays (one per cached conv, in call order) that the decode / encode functions
take and return; ``None`` means "start of a video". Nothing in the modules changes during a call.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

WAN21_LATENTS_MEAN = (
    -0.7571,
    -0.7089,
    -0.9113,
    0.1075,
    -0.1745,
    0.9653,
    -0.1517,
    1.5508,
    0.4134,
    -0.0715,
    0.5517,
    -0.3632,
    -0.1922,
    -0.9497,
    0.2503,
    -0.2921,
)
WAN21_LATENTS_STD = (
    2.8184,
    1.4541,
    2.3275,
    2.6558,
    1.2196,
    1.7708,
    2.6052,
    2.0743,
    3.2687,
    2.1526,
    2.8652,
    1.5579,
    1.6382,
    1.1253,
    2.8251,
    1.9160,
)
CACHE_T = 2  # frames of history a causal 3x3x3 conv keeps


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """Sizes of a Wan2.1-style video VAE (upstream's ``_video_vae`` arguments) and its latent statistics."""

    dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_scales: tuple[float, ...] = ()
    temperal_downsample: tuple[bool, ...] = (False, True, True)  # upstream's spelling
    latents_mean: tuple[float, ...] = WAN21_LATENTS_MEAN
    latents_std: tuple[float, ...] = WAN21_LATENTS_STD
    name: str = "wan2.1-vae"

    def __post_init__(self):
        if len(self.temperal_downsample) != len(self.dim_mult) - 1:
            raise ValueError(
                f"temperal_downsample needs {len(self.dim_mult) - 1} entries (one per resample), "
                f"got {list(self.temperal_downsample)}"
            )
        if len(self.latents_mean) != self.z_dim or len(self.latents_std) != self.z_dim:
            raise ValueError(
                f"latents_mean / latents_std need z_dim={self.z_dim} entries, got "
                f"{len(self.latents_mean)} / {len(self.latents_std)}"
            )

    @property
    def temperal_upsample(self) -> tuple[bool, ...]:
        return tuple(reversed(self.temperal_downsample))

    @property
    def spatial_factor(self) -> int:
        return 2 ** (len(self.dim_mult) - 1)

    @property
    def temporal_factor(self) -> int:
        return 2 ** sum(self.temperal_downsample)

    def num_video_frames(self, num_latents: int) -> int:
        """Video frames decoded from ``num_latents`` latent frames: 1 + 4 (k - 1) for Wan2.1."""
        return 0 if num_latents < 1 else 1 + self.temporal_factor * (num_latents - 1)

    # -- layer plans: the single source of the structure (modules and the converter's key map use them) --
    def encoder_plan(self) -> list[tuple]:
        """``("res", cin, cout) | ("attn", c) | ("down", c, temporal)`` in order (upstream's ``downsamples``)."""
        dims = [self.dim * u for u in (1, *self.dim_mult)]
        plan, scale = [], 1.0
        for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
            for _ in range(self.num_res_blocks):
                plan.append(("res", cin, cout))
                if scale in self.attn_scales:
                    plan.append(("attn", cout))
                cin = cout
            if i != len(self.dim_mult) - 1:
                plan.append(("down", cout, bool(self.temperal_downsample[i])))
                scale /= 2.0
        return plan

    def decoder_plan(self) -> list[tuple]:
        """``("res", cin, cout) | ("attn", c) | ("up", c, temporal)`` in order (upstream's ``upsamples``)."""
        dims = [self.dim * u for u in (self.dim_mult[-1], *self.dim_mult[::-1])]
        plan, scale = [], 1.0 / 2 ** (len(self.dim_mult) - 2)
        for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
            if i > 0:  # the resample before this level halved the channels
                cin //= 2
            for _ in range(self.num_res_blocks + 1):
                plan.append(("res", cin, cout))
                if scale in self.attn_scales:
                    plan.append(("attn", cout))
                cin = cout
            if i != len(self.dim_mult) - 1:
                plan.append(("up", cout, bool(self.temperal_upsample[i])))
                scale *= 2.0
        return plan

    @property
    def mid_dim(self) -> int:
        """Width of the encoder's and the decoder's middle blocks (the deepest level)."""
        return self.dim * self.dim_mult[-1]

    @property
    def decoder_out_dim(self) -> int:
        return self.dim * self.dim_mult[0]

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for k in ("dim_mult", "attn_scales", "temperal_downsample", "latents_mean", "latents_std"):
            d[k] = list(d[k])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "VAEConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown VAE config keys: {unknown}")
        kw = dict(d)
        for k, conv in (
            ("dim_mult", int),
            ("attn_scales", float),
            ("temperal_downsample", bool),
            ("latents_mean", float),
            ("latents_std", float),
        ):
            if k in kw:
                kw[k] = tuple(conv(x) for x in kw[k])
        return cls(**kw)


# ---- building blocks ------------------------------------------------------------------------------------


class Conv(nnx.Module):
    """Channel-last 2-d or 3-d convolution with bias; kernel ``[(kt,) kh, kw, cin, cout]``, explicit padding.

    A 3-d conv runs as one 2-d conv over the ``kt`` temporal taps stacked on the channel axis (XLA:CPU's 3-d
    convolution is several times slower than its 2-d one); 1x1 spatial kernels run as a matrix product.
    """

    def __init__(
        self, cin: int, cout: int, kernel: tuple[int, ...], stride: tuple[int, ...] | None = None, *, dtype=jnp.float32
    ):
        self.kernel = nnx.Param(jnp.zeros((*kernel, cin, cout), dtype))
        self.bias = nnx.Param(jnp.zeros((cout,), dtype))
        self.stride = tuple(stride or (1,) * len(kernel))

    def __call__(self, x: jax.Array, padding) -> jax.Array:
        """x: ``[B, T, H, W, C]`` (3-d; time padding, if any, already applied) or ``[N, H, W, C]`` (2-d);
        ``padding``: ``[(lo, hi)]`` per spatial axis (the temporal entry of a 3-d conv must be (0, 0))."""
        k = self.kernel[...]
        if k.ndim == 5:
            kt, kh, kw, cin, cout = k.shape
            st = self.stride[0]
            assert tuple(padding[0]) == (0, 0), "pad time explicitly before a 3-d conv"
            b, t = x.shape[:2]
            to = (t - kt) // st + 1
            taps = [x[:, i : i + st * (to - 1) + 1 : st] for i in range(kt)]
            x = jnp.concatenate(taps, axis=-1) if kt > 1 else taps[0]  # [B, To, H, W, kt*C]
            k = k.transpose(1, 2, 0, 3, 4).reshape(kh, kw, kt * cin, cout)
            y = self._conv2d(x.reshape(b * to, *x.shape[2:]), k, self.stride[1:], padding[1:])
            return y.reshape(b, to, *y.shape[1:])
        return self._conv2d(x, k, self.stride, padding)

    def _conv2d(self, x, k, stride, padding):
        if k.shape[:2] == (1, 1) and tuple(stride) == (1, 1) and all(tuple(p) == (0, 0) for p in padding):
            return jnp.einsum("...c,cd->...d", x, k[0, 0]) + self.bias[...]
        y = jax.lax.conv_general_dilated(
            x, k, tuple(stride), [tuple(p) for p in padding], dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        return y + self.bias[...]


class CausalConv3d(Conv):
    """A 3-d conv padded causally in time (2 * pt frames in front, none after) and symmetrically in space.

    ``__call__(x, cache) -> (y, new_cache)``: ``cache`` holds the ``2 * pt`` frames before ``x`` (``None`` =
    start of the video = zeros); ``new_cache`` the last ``2 * pt`` frames of ``[cache, x]``.
    """

    def __init__(self, cin: int, cout: int, kernel=(3, 3, 3), padding=(1, 1, 1), *, dtype=jnp.float32):
        super().__init__(cin, cout, tuple(kernel), dtype=dtype)
        self.padding = tuple(padding)

    def __call__(self, x, cache=None):
        pt, ph, pw = self.padding
        front = 2 * pt
        if front:
            if cache is None:
                cache = jnp.zeros((x.shape[0], front, *x.shape[2:]), x.dtype)
            x = jnp.concatenate([cache.astype(x.dtype), x], axis=1)
        y = super().__call__(x, [(0, 0), (ph, ph), (pw, pw)])
        return y, (x[:, -front:] if front else None)


class RMSNorm(nnx.Module):
    """Upstream's ``RMS_norm``: L2-normalise over channels (eps 1e-12), times sqrt(C) and gamma."""

    def __init__(self, dim: int, *, dtype=jnp.float32):
        self.gamma = nnx.Param(jnp.ones((dim,), dtype))
        self.scale = math.sqrt(dim)

    def __call__(self, x):
        xf = x.astype(jnp.float32)
        norm = jnp.sqrt(jnp.sum(jnp.square(xf), axis=-1, keepdims=True))
        y = xf / jnp.maximum(norm, 1e-12) * self.scale
        return y.astype(x.dtype) * self.gamma[...]


class Caches:
    """Trace-time cursor over the feature cache list: ``take()`` the next entry (None at the start of a video),
    ``put()`` its replacement. The list itself is a plain pytree passed in and returned by the caller."""

    def __init__(self, old: list | None):
        self.old, self.new, self.i = old, [], 0

    def take(self):
        c = None if self.old is None else self.old[self.i]
        self.i += 1
        return c

    def put(self, c) -> None:
        self.new.append(c)

    def conv(self, layer: CausalConv3d, x):
        y, c = layer(x, self.take())
        self.put(c)
        return y


class ResidualBlock(nnx.Module):
    """``RMSNorm -> SiLU -> conv3 -> RMSNorm -> SiLU -> conv3`` plus a 1x1x1 conv shortcut when cin != cout."""

    def __init__(self, cin: int, cout: int, *, dtype=jnp.float32):
        self.norm1 = RMSNorm(cin, dtype=dtype)
        self.conv1 = CausalConv3d(cin, cout, dtype=dtype)
        self.norm2 = RMSNorm(cout, dtype=dtype)
        self.conv2 = CausalConv3d(cout, cout, dtype=dtype)
        self.shortcut = CausalConv3d(cin, cout, (1, 1, 1), (0, 0, 0), dtype=dtype) if cin != cout else None

    def __call__(self, x, caches: Caches):
        h = x if self.shortcut is None else self.shortcut(x)[0]
        x = caches.conv(self.conv1, jax.nn.silu(self.norm1(x)))
        x = caches.conv(self.conv2, jax.nn.silu(self.norm2(x)))
        return x + h


class AttentionBlock(nnx.Module):
    """Per-frame single-head self-attention over the H*W positions (1x1 convs as dense layers)."""

    def __init__(self, dim: int, *, dtype=jnp.float32):
        self.norm = RMSNorm(dim, dtype=dtype)
        self.to_qkv = nnx.Linear(dim, 3 * dim, rngs=nnx.Rngs(0), param_dtype=dtype, dtype=dtype)
        self.proj = nnx.Linear(dim, dim, rngs=nnx.Rngs(0), param_dtype=dtype, dtype=dtype)

    def __call__(self, x, caches: Caches = None):
        b, t, h, w, c = x.shape
        qkv = self.to_qkv(self.norm(x)).reshape(b * t, h * w, 3, c)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        logits = jnp.einsum("nqc,nkc->nqk", q, k, preferred_element_type=jnp.float32) / math.sqrt(c)
        p = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        y = jnp.einsum("nqk,nkc->nqc", p, v).reshape(b, t, h, w, c)
        return x + self.proj(y)


def _frames(fn, x):
    """Apply a per-image fn to [B, T, H, W, C] as [B*T, H, W, C]."""
    b, t = x.shape[:2]
    y = fn(x.reshape(b * t, *x.shape[2:]))
    return y.reshape(b, t, *y.shape[1:])


class Upsample(nnx.Module):
    """Decoder resample: (temporal x2 via a causal (3,1,1) conv to 2C channels,) nearest x2, 3x3 conv C -> C/2."""

    def __init__(self, dim: int, temporal: bool, *, dtype=jnp.float32):
        self.resample = Conv(dim, dim // 2, (3, 3), dtype=dtype)
        self.time_conv = CausalConv3d(dim, 2 * dim, (3, 1, 1), (1, 0, 0), dtype=dtype) if temporal else None

    def __call__(self, x, caches: Caches):
        if self.time_conv is not None:
            cache = caches.take()
            if cache is None:  # the first latent frame of a video: no temporal upsampling ("Rep")
                caches.put(jnp.zeros((x.shape[0], CACHE_T, *x.shape[2:]), x.dtype))
            else:
                y, c = self.time_conv(x, cache)
                caches.put(c)
                b, t, h, w, _ = y.shape
                x = y.reshape(b, t, h, w, 2, -1).transpose(0, 1, 4, 2, 3, 5).reshape(b, 2 * t, h, w, -1)

        def spatial(img):
            img = jnp.repeat(jnp.repeat(img, 2, axis=1), 2, axis=2)
            return self.resample(img, [(1, 1), (1, 1)])

        return _frames(spatial, x)


class Downsample(nnx.Module):
    """Encoder resample: zero-pad right/bottom, stride-2 3x3 conv; then (temporal) a stride-2 (3,1,1) conv over
    [last frame of the previous chunk, this chunk] (skipped for the first chunk)."""

    def __init__(self, dim: int, temporal: bool, *, dtype=jnp.float32):
        self.resample = Conv(dim, dim, (3, 3), (2, 2), dtype=dtype)
        self.time_conv = Conv(dim, dim, (3, 1, 1), (2, 1, 1), dtype=dtype) if temporal else None

    def __call__(self, x, caches: Caches):
        x = _frames(lambda img: self.resample(img, [(0, 1), (0, 1)]), x)
        if self.time_conv is not None:
            cache = caches.take()
            caches.put(x[:, -1:])
            if cache is not None:
                x = self.time_conv(jnp.concatenate([cache.astype(x.dtype), x], axis=1), [(0, 0)] * 3)
        return x


def _make_layer(spec, dtype):
    kind = spec[0]
    if kind == "res":
        return ResidualBlock(spec[1], spec[2], dtype=dtype)
    if kind == "attn":
        return AttentionBlock(spec[1], dtype=dtype)
    if kind == "up":
        return Upsample(spec[1], spec[2], dtype=dtype)
    if kind == "down":
        return Downsample(spec[1], spec[2], dtype=dtype)
    raise ValueError(f"unknown layer kind {kind!r}")


class Encoder3d(nnx.Module):
    def __init__(self, cfg: VAEConfig, *, dtype=jnp.float32):
        c = cfg.mid_dim
        self.conv1 = CausalConv3d(3, cfg.dim, dtype=dtype)
        self.downsamples = nnx.List([_make_layer(s, dtype) for s in cfg.encoder_plan()])
        self.middle = nnx.List(
            [ResidualBlock(c, c, dtype=dtype), AttentionBlock(c, dtype=dtype), ResidualBlock(c, c, dtype=dtype)]
        )
        self.head_norm = RMSNorm(c, dtype=dtype)
        self.head_conv = CausalConv3d(c, 2 * cfg.z_dim, dtype=dtype)

    def __call__(self, x, caches: Caches):
        x = caches.conv(self.conv1, x)
        for layer in (*self.downsamples, *self.middle):
            x = layer(x, caches)
        return caches.conv(self.head_conv, jax.nn.silu(self.head_norm(x)))


class Decoder3d(nnx.Module):
    def __init__(self, cfg: VAEConfig, *, dtype=jnp.float32):
        c = cfg.mid_dim
        self.conv1 = CausalConv3d(cfg.z_dim, c, dtype=dtype)
        self.middle = nnx.List(
            [ResidualBlock(c, c, dtype=dtype), AttentionBlock(c, dtype=dtype), ResidualBlock(c, c, dtype=dtype)]
        )
        self.upsamples = nnx.List([_make_layer(s, dtype) for s in cfg.decoder_plan()])
        self.head_norm = RMSNorm(cfg.decoder_out_dim, dtype=dtype)
        self.head_conv = CausalConv3d(cfg.decoder_out_dim, 3, dtype=dtype)

    def __call__(self, x, caches: Caches):
        x = caches.conv(self.conv1, x)
        for layer in (*self.middle, *self.upsamples):
            x = layer(x, caches)
        return caches.conv(self.head_conv, jax.nn.silu(self.head_norm(x)))


class WanVAE(nnx.Module):
    """Encoder, decoder and the two 1x1x1 convs around the latent (``conv1`` after the encoder -> mu / log var,
    ``conv2`` before the decoder). Channel-last throughout: video ``[B, T, H, W, 3]``, latents ``[B, t, h, w, z]``.
    """

    def __init__(self, cfg: VAEConfig, *, dtype=jnp.float32):
        self.cfg = cfg
        z = cfg.z_dim
        self.encoder = Encoder3d(cfg, dtype=dtype)
        self.conv1 = CausalConv3d(2 * z, 2 * z, (1, 1, 1), (0, 0, 0), dtype=dtype)
        self.conv2 = CausalConv3d(z, z, (1, 1, 1), (0, 0, 0), dtype=dtype)
        self.decoder = Decoder3d(cfg, dtype=dtype)

    # -- latent statistics ----------------------------------------------------------------------------
    def _stats(self, dtype):
        mean = jnp.asarray(self.cfg.latents_mean, jnp.float32)
        inv_std = 1.0 / jnp.asarray(self.cfg.latents_std, jnp.float32)  # upstream keeps scale = [mean, 1/std]
        return mean.astype(dtype), inv_std.astype(dtype)

    def denormalize(self, z):
        """Model-space latents (what the DiT produces) -> the decoder's input: ``z / (1/std) + mean``."""
        mean, inv_std = self._stats(z.dtype)
        return z / inv_std + mean

    def normalize(self, mu):
        mean, inv_std = self._stats(mu.dtype)
        return (mu - mean) * inv_std

    # -- one step of the causal loops -------------------------------------------------------------------
    def decode_step(self, z, cache: list | None):
        """One latent frame ``z [B, 1, h, w, z_dim]`` (model space) -> video frames ``[B, 1|4, H, W, 3]`` (not
        clamped) and the new cache. ``cache=None`` starts a video (1 output frame)."""
        caches = Caches(cache)
        x = self.conv2(self.denormalize(z))[0]
        return self.decoder(x, caches), caches.new

    def encode_step(self, video, cache: list | None):
        """A chunk of frames ``[B, 1|4, H, W, 3]`` (1 at the start of a video, 4 after) -> normalised mu
        ``[B, 1, h, w, z_dim]`` and the new cache."""
        caches = Caches(cache)
        out = self.conv1(self.encoder(video, caches))[0]
        return self.normalize(out[..., : self.cfg.z_dim]), caches.new


def abstract_vae(cfg: VAEConfig, dtype=jnp.float32) -> WanVAE:
    return nnx.eval_shape(lambda: WanVAE(cfg, dtype=dtype))


def abstract_params(cfg: VAEConfig, dtype=jnp.float32) -> dict:
    """The pure param dict of a VAE with this config, as ``ShapeDtypeStruct`` leaves."""
    return nnx.to_pure_dict(nnx.state(abstract_vae(cfg, dtype), nnx.Param))
