"""TAEHV, the tiny video decoder (madebyollin/taehv, MIT) as a fast preview decoder for Wan2.1 latents.

A Flax NNX port of TAEHV's decoder (channel-last), with its per-block memory as explicit state::

    from fkv_jax.vae.taehv import TAEHV
    tae = TAEHV.load("DIR/taehv")          # converted by `fkv convert --taehv taew2_1.pth --output DIR`
    video = tae.decode(latents)            # [B, T, 16, h, w] model space -> [B, 4T - 3, 8h, 8w, 3] in [-1, 1]
    dec = tae.stream()                     # chunk by chunk, as the sampler emits them
    frames = dec(latents[:, :3])           # 9 frames, then 12 per later chunk of 3

It is a drop-in for :class:`fkv_jax.vae.VAE` (same input layout and output convention, same frame count
``1 + 4 (T - 1)``, same ``decode`` / ``decode_chunk`` / ``stream`` calls), much cheaper and less faithful.

Structure (``n`` = channels per level, 256 / 128 / 64 / 64 for every released checkpoint)::

    latents [B, T, h, w, z] -> 3 tanh(x / 3) -> conv3x3 (z -> n0) -> ReLU
    3 levels: 3 MemBlocks -> nearest x2 in space -> TGrow (x1 | x2 in time) -> conv3x3 (n_l -> n_l+1, no bias)
    ReLU -> conv3x3 (n3 -> 3 p^2) -> pixel shuffle (patch p) -> frames in [0, 1] -> 2 x - 1

* MemBlock(x_t, m_t): ``ReLU(conv(ReLU(conv(ReLU(conv([x_t, m_t]))))) + x_t)`` where the memory
  ``m_t`` is the block's own input one frame earlier (zeros for the first frame of a video). That input is
  the only thing carried between frames: the state is one ``[B, H_l, W_l, C_l]`` array per MemBlock.
* TGrow: a 1x1 conv to ``stride * C`` channels whose ``stride`` slices become consecutive frames. The
  Wan2.1 model grows time x1, x2, x2: every latent frame gives 4 frames and the first ``4 - 1 = 3`` frames
  of a video are dropped (TAEHV's alignment with the Wan VAE's ``1 + 4 (T - 1)``).
* Every frame of a chunk runs at once (the memories of frame t are the inputs of frame t - 1, known within
  the chunk); decoding a video in one call or chunk by chunk gives the same frames.

The latents are the sampler's (model space: TAEW2.1 was trained on the normalised Wan latents, so there is
no de-normalisation, unlike the Wan VAE). Compute runs in the params' dtype (float32 or bfloat16); frames are
returned as float32.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from fkv_jax.checkpoint import CheckpointError, read_meta, restore_checkpoint_params, save_checkpoint_dir

FORMAT = "fkv_jax.taehv"
FORMAT_VERSION = 1
IMAGE_CHANNELS = 3


@dataclasses.dataclass(frozen=True)
class TAEHVConfig:
    """Sizes of a TAEHV decoder (read from a checkpoint's tensor shapes by the converter)."""

    latent_channels: int = 16  # z: 16 for Wan2.1 (taew2_1), 48 for Wan2.2 (taew2_2)
    patch_size: int = 1  # output pixel shuffle: 1 for taew2_1, 2 for taew2_2
    channels: tuple[int, ...] = (256, 128, 64, 64)  # conv_in width, then the output width of each level
    blocks_per_level: int = 3  # MemBlocks per level
    time_upscale: tuple[bool, ...] = (False, True, True)  # TGrow stride 2 (else 1) after each level
    name: str = "taew2.1"

    def __post_init__(self):
        if len(self.channels) != 4 or len(self.time_upscale) != 3:
            raise ValueError(
                f"TAEHV has 3 levels: channels needs 4 entries and time_upscale 3, got {list(self.channels)} / "
                f"{list(self.time_upscale)}"
            )
        if min(self.latent_channels, self.patch_size, self.blocks_per_level, *self.channels) < 1:
            raise ValueError(f"TAEHV sizes must be positive: {self}")

    @property
    def z_dim(self) -> int:
        """The latent channels (the name the Wan VAE's config uses)."""
        return self.latent_channels

    @property
    def spatial_factor(self) -> int:
        return 8 * self.patch_size

    @property
    def temporal_factor(self) -> int:
        return 2 ** sum(bool(t) for t in self.time_upscale)

    @property
    def frames_to_trim(self) -> int:
        """Frames dropped at the start of a video (aligns the decode with the Wan VAE's first frame)."""
        return self.temporal_factor - 1

    def num_video_frames(self, num_latents: int) -> int:
        """Frames decoded from ``num_latents`` latent frames: ``4 T - 3`` (= the Wan VAE's 1 + 4 (T - 1))."""
        return 0 if num_latents < 1 else self.temporal_factor * num_latents - self.frames_to_trim

    def memory_shapes(self, batch: int, latent_hw: tuple[int, int]) -> list[tuple[int, ...]]:
        """Shape of each MemBlock's memory, in call order: ``[B, H_l, W_l, C_l]``, ``H_l = h 2^l``."""
        h, w = latent_hw
        return [
            (batch, h * 2**lv, w * 2**lv, self.channels[lv]) for lv in range(3) for _ in range(self.blocks_per_level)
        ]

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["channels"], d["time_upscale"] = list(self.channels), list(self.time_upscale)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TAEHVConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown TAEHV config keys: {unknown}")
        kw = dict(d)
        if "channels" in kw:
            kw["channels"] = tuple(int(c) for c in kw["channels"])
        if "time_upscale" in kw:
            kw["time_upscale"] = tuple(bool(t) for t in kw["time_upscale"])
        return cls(**kw)


# ---- modules ---------------------------------------------------------------------------------------------


class Conv(nnx.Module):
    """Channel-last 2-d convolution, stride 1, 'same' padding; kernel ``[kh, kw, cin, cout]``."""

    def __init__(self, cin: int, cout: int, k: int = 3, *, bias: bool = True, dtype=jnp.float32):
        self.kernel = nnx.Param(jnp.zeros((k, k, cin, cout), dtype))
        self.bias = nnx.Param(jnp.zeros((cout,), dtype)) if bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: ``[..., H, W, cin]`` (leading axes flattened into the batch) -> ``[..., H, W, cout]``."""
        k = self.kernel[...]
        lead = x.shape[:-3]
        x = x.reshape(-1, *x.shape[-3:])  # [N, H, W, cin]
        if k.shape[:2] == (1, 1):
            y = jnp.einsum("nhwc,cd->nhwd", x, k[0, 0])
        else:
            p = k.shape[0] // 2
            y = jax.lax.conv_general_dilated(x, k, (1, 1), [(p, p), (p, p)], dimension_numbers=("NHWC", "HWIO", "NHWC"))
        if self.bias is not None:
            y = y + self.bias[...]
        return y.reshape(*lead, *y.shape[1:])


class MemBlock(nnx.Module):
    """``ReLU(conv3(ReLU(conv2(ReLU(conv1([x, past]))))) + x)`` at a constant width (the decoder's only kind;
    no released model uses the reference's 1x1 skip for differing widths)."""

    def __init__(self, c: int, *, dtype=jnp.float32):
        self.conv1 = Conv(2 * c, c, dtype=dtype)
        self.conv2 = Conv(c, c, dtype=dtype)
        self.conv3 = Conv(c, c, dtype=dtype)

    def __call__(self, x, past):
        h = jax.nn.relu(self.conv1(jnp.concatenate([x, past], axis=-1)))
        return jax.nn.relu(self.conv3(jax.nn.relu(self.conv2(h))) + x)


class Level(nnx.Module):
    """MemBlocks at one resolution, then nearest x2 in space, TGrow in time and a conv to the next width."""

    def __init__(self, cin: int, cout: int, blocks: int, time_stride: int, *, dtype=jnp.float32):
        self.blocks = nnx.List([MemBlock(cin, dtype=dtype) for _ in range(blocks)])
        self.tgrow = Conv(cin, cin * time_stride, 1, bias=False, dtype=dtype)
        self.conv = Conv(cin, cout, bias=False, dtype=dtype)
        self.time_stride = time_stride


class TAEHVDecoder(nnx.Module):
    """The decoder. :meth:`__call__` decodes a chunk of latent frames given the memories of the frames before."""

    def __init__(self, cfg: TAEHVConfig, *, dtype=jnp.float32):
        self.cfg = cfg
        n = cfg.channels
        self.conv_in = Conv(cfg.latent_channels, n[0], dtype=dtype)
        self.levels = nnx.List(
            [
                Level(n[lv], n[lv + 1], cfg.blocks_per_level, 2 if cfg.time_upscale[lv] else 1, dtype=dtype)
                for lv in range(3)
            ]
        )
        self.conv_out = Conv(n[3], IMAGE_CHANNELS * cfg.patch_size**2, dtype=dtype)

    def __call__(self, z: jax.Array, memory: tuple[jax.Array, ...]) -> tuple[jax.Array, tuple[jax.Array, ...]]:
        """``z [B, T, h, w, z_dim]`` (model space, the params' dtype) and the memories (``memory_shapes``) ->
        frames ``[B, temporal_factor T, H, W, 3]`` in [0, 1] (untrimmed, not clamped) and the new memories."""
        x = jax.nn.relu(self.conv_in(3.0 * jnp.tanh(z / 3.0)))  # [B, T, h, w, n0]
        new, i = [], 0
        for level in self.levels:
            for block in level.blocks:
                past = jnp.concatenate([memory[i][:, None].astype(x.dtype), x[:, :-1]], axis=1)  # input at t - 1
                new.append(x[:, -1])
                x = block(x, past)
                i += 1
            x = jnp.repeat(jnp.repeat(x, 2, axis=2), 2, axis=3)  # nearest x2: [B, T, 2H, 2W, C]
            b, t, h, w, c = x.shape
            s = level.time_stride
            x = level.tgrow(x).reshape(b, t, h, w, s, c).transpose(0, 1, 4, 2, 3, 5).reshape(b, t * s, h, w, c)
            x = level.conv(x)
        x = self.conv_out(jax.nn.relu(x))  # [B, T', H, W, 3 p^2]
        p = self.cfg.patch_size
        if p > 1:  # pixel shuffle: channel (c, i, j) -> pixel (p y + i, p x + j) of channel c
            b, t, h, w, _ = x.shape
            x = x.reshape(b, t, h, w, IMAGE_CHANNELS, p, p).transpose(0, 1, 2, 5, 3, 6, 4)
            x = x.reshape(b, t, h * p, w * p, IMAGE_CHANNELS)
        return x, tuple(new)


# ---- explicit streaming state and the pure decode ----------------------------------------------------------


@struct.dataclass
class TAEHVState:
    """What a video's decode carries from one chunk to the next: each MemBlock's last input frame.

    ``started`` is static (part of the tree structure): the first chunk of a video drops its first
    ``frames_to_trim`` frames, so the first and the later chunks are two executables.
    """

    memory: tuple[jax.Array, ...]  # per MemBlock, in call order: [B, H_l, W_l, C_l]
    started: bool = struct.field(pytree_node=False, default=False)


def init_state(cfg: TAEHVConfig, batch: int, latent_hw: tuple[int, int], dtype: Any = jnp.float32) -> TAEHVState:
    """The state at the start of ``batch`` videos of latent size ``latent_hw``: zero memories."""
    return TAEHVState(tuple(jnp.zeros(s, dtype) for s in cfg.memory_shapes(batch, latent_hw)), started=False)


def decode_chunk(
    model: TAEHVDecoder, state: TAEHVState, latents: jax.Array, *, clamp: bool = True
) -> tuple[TAEHVState, jax.Array]:
    """Pure: the next latent frames ``[B, T, z, h, w]`` (the sampler's layout, model space) of B videos ->
    ``(new state, frames [B, T', H, W, 3] float32 in [-1, 1])``; ``T' = 4T - 3`` for the first chunk, ``4T``
    after. ``clamp=False`` keeps values outside [-1, 1]."""
    dtype = model.conv_in.kernel[...].dtype
    z = jnp.transpose(jnp.asarray(latents), (0, 1, 3, 4, 2)).astype(dtype)  # [B, T, h, w, z]
    x, memory = model(z, state.memory)
    if not state.started:
        x = x[:, model.cfg.frames_to_trim :]
    x = x.astype(jnp.float32)
    if clamp:
        x = jnp.clip(x, 0.0, 1.0)
    return TAEHVState(memory, started=True), 2.0 * x - 1.0


def decode_video(model: TAEHVDecoder, latents: jax.Array, *, clamp: bool = True) -> jax.Array:
    """Pure whole-video decode: ``[B, T, z, h, w]`` -> ``[B, 4T - 3, H, W, 3]`` float32 in [-1, 1]."""
    b, _, _, h, w = latents.shape
    state = init_state(model.cfg, b, (h, w), model.conv_in.kernel[...].dtype)
    return decode_chunk(model, state, latents, clamp=clamp)[1]


def _decode_chunk_fn(graphdef, params, state, latents, clamp):
    return decode_chunk(nnx.merge(graphdef, params), state, latents, clamp=clamp)


@functools.cache
def _jitted():
    """The jitted chunk decode (module-level: every TAEHV of one structure shares executables, one per chunk
    shape and ``started``)."""
    return jax.jit(_decode_chunk_fn, static_argnums=(0, 4))


# ---- the converted directory -------------------------------------------------------------------------------


def abstract_decoder(cfg: TAEHVConfig, dtype=jnp.float32) -> TAEHVDecoder:
    return nnx.eval_shape(lambda: TAEHVDecoder(cfg, dtype=dtype))


def abstract_params(cfg: TAEHVConfig, dtype=jnp.float32) -> dict:
    """The pure param dict of a decoder with this config, as ``ShapeDtypeStruct`` leaves."""
    return nnx.to_pure_dict(nnx.state(abstract_decoder(cfg, dtype), nnx.Param))


def save_taehv(
    path: str | Path,
    cfg: TAEHVConfig,
    params: Mapping,
    dtype: Any,
    source: Mapping[str, Any],
    *,
    overwrite: bool = False,
) -> Path:
    """Write a converted TAEHV atomically: ``DIR/config.json`` (format ``fkv_jax.taehv``) + ``DIR/params/``."""
    config = {"format": FORMAT, "format_version": FORMAT_VERSION, "taehv": cfg.to_dict()}
    return save_checkpoint_dir(path, config, params, dtype, source, abstract_params(cfg), overwrite=overwrite)


def read_taehv_config(path: str | Path) -> TAEHVConfig:
    """The config of a converted TAEHV (cheap: reads config.json only)."""
    meta = read_meta(path, FORMAT, FORMAT_VERSION)
    try:
        return TAEHVConfig.from_dict(meta["taehv"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{Path(path) / 'config.json'}: bad TAEHV config: {e}") from None


def load_taehv(path: str | Path, dtype: Any = None) -> tuple[TAEHVConfig, TAEHVDecoder]:
    """Load a converted TAEHV as ``(cfg, TAEHVDecoder)``; ``dtype`` defaults to the stored one."""
    meta = read_meta(path, FORMAT, FORMAT_VERSION)
    cfg = read_taehv_config(path)
    params = restore_checkpoint_params(path, abstract_params(cfg), meta["dtype"], dtype)
    gdef, state = nnx.split(abstract_decoder(cfg, jax.tree.leaves(params)[0].dtype), nnx.Param)
    nnx.replace_by_pure_dict(state, params)
    return cfg, nnx.merge(gdef, state)


# ---- the loaded decoder: the Wan VAE's calling convention --------------------------------------------------


class TAEHV:
    """A loaded TAEHV with the calls of :class:`fkv_jax.vae.VAE` (``decode``, ``decode_chunk``, ``stream``);
    results are numpy float32 ``[B, T', H, W, 3]`` in [-1, 1]."""

    def __init__(self, cfg: TAEHVConfig, model: TAEHVDecoder):
        self.cfg = cfg
        self.graphdef, self.params = nnx.split(model, nnx.Param)
        self.dtype = jax.tree.leaves(self.params)[0].dtype

    @classmethod
    def load(cls, path: str | Path, dtype: Any = None) -> "TAEHV":
        return cls(*load_taehv(path, dtype))

    def _check_latents(self, latents) -> jax.Array:
        lat = jnp.asarray(latents, jnp.float32)
        if lat.ndim != 5 or lat.shape[2] != self.cfg.z_dim or lat.shape[1] < 1:
            raise ValueError(
                f"latents must be [B, F, {self.cfg.z_dim}, h, w] (the sampler's layout) with F >= 1, "
                f"got {tuple(lat.shape)}"
            )
        return lat

    def init_state(self, batch: int, latent_hw: tuple[int, int]) -> TAEHVState:
        return init_state(self.cfg, batch, latent_hw, self.dtype)

    def decode_chunk(self, latents, cache: TAEHVState | None = None, *, clamp: bool = True):
        """Decode the next latent frames ``[B, T, z, h, w]`` of B videos: ``(video [B, T', H, W, 3], new
        state)``. ``cache=None`` starts the videos (``4T - 3`` frames, then ``4T`` per later call)."""
        lat = self._check_latents(latents)
        b, _, _, h, w = lat.shape
        state = self.init_state(b, (h, w)) if cache is None else cache
        want = self.cfg.memory_shapes(b, (h, w))
        if [tuple(m.shape) for m in state.memory] != want:
            raise ValueError(
                f"the state was made for other videos (memory {tuple(state.memory[0].shape)}, latents "
                f"{tuple(lat.shape)} need {want[0]})"
            )
        state, video = _jitted()(self.graphdef, self.params, state, lat, False)  # one executable for both clamps
        video = np.asarray(video)
        return (np.clip(video, -1.0, 1.0) if clamp else video), state

    def decode(self, latents, *, clamp: bool = True) -> np.ndarray:
        """Whole-video decode: latents ``[B, F, z, h, w]`` (model space) -> ``[B, 4F - 3, H, W, 3]`` in one call,
        clamped to [-1, 1] unless ``clamp=False``. Holds every frame's activations at once (about
        ``F * 8h * 8w * 64 * 4 * 4`` bytes at the last level in float32): chunk long videos with :meth:`stream`."""
        return self.decode_chunk(latents, None, clamp=clamp)[0]

    def stream(self, *, clamp: bool = True) -> "TAEHVStreamingDecoder":
        return TAEHVStreamingDecoder(self, clamp=clamp)


class TAEHVStreamingDecoder:
    """Decode a video chunk by chunk as the sampler emits it (the same calls as
    :class:`fkv_jax.vae.StreamingDecoder`): ``dec(latent_chunk [B, C_blk, z, h, w]) -> [B, T', H, W, 3]``."""

    def __init__(self, taehv: TAEHV, *, clamp: bool = True):
        self.vae, self.clamp, self.cache = taehv, clamp, None
        self.frames_out = 0

    def __call__(self, latents) -> np.ndarray:
        video, self.cache = self.vae.decode_chunk(latents, self.cache, clamp=self.clamp)
        self.frames_out += video.shape[1]
        return video
