"""The causal Wan2.1 DiT in Flax NNX (Self Forcing's ``CausalWanModel``, text-to-video).

Modules only define parameters and math. State that changes during a rollout (the KV cache, the text
K/V) is passed in and returned explicitly; the model never mutates itself. Blocks are stacked on a leading
layer axis and run with ``lax.scan``, so the compiled graph holds one block whatever the depth.

Shapes: B batch, F frames in the call, T tokens per frame, S = F*T, D model width, H heads, Dh head dim,
L layers, Lt text tokens, N cache slots.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from fkv_jax.attention.reference import chunk_attention, dense_attention
from fkv_jax.config import ModelConfig
from fkv_jax.model.embeddings import patchify, timestep_sinusoid, unpatchify
from fkv_jax.model.rope import RopeTables, apply_rope, chunk_cos_sin

# attn_fn(carry, layer_idx, layer_x, q, k, v) -> (out, carry, layer_y); see CausalWanModel.forward
SelfAttnFn = Callable[..., tuple[jax.Array, Any, Any]]


def layer_norm(x: jax.Array, eps: float) -> jax.Array:
    """Non-affine LayerNorm over the last axis, statistics in float32."""
    xf = x.astype(jnp.float32)
    mean = xf.mean(-1, keepdims=True)
    var = jnp.square(xf - mean).mean(-1, keepdims=True)
    return ((xf - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


class RMSNorm(nnx.Module):
    """y = x * rsqrt(mean(x^2) + eps) * scale over the full width (Wan's q/k norm), statistics in float32."""

    def __init__(self, dim: int, eps: float, *, dtype=jnp.float32):
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((dim,), dtype))

    def __call__(self, x):
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.square(xf).mean(-1, keepdims=True) + self.eps)
        return y.astype(x.dtype) * self.scale[...]


class AffineLayerNorm(nnx.Module):
    """LayerNorm with weight and bias (Wan's ``norm3``, the cross-attention pre-norm)."""

    def __init__(self, dim: int, eps: float, *, dtype=jnp.float32):
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((dim,), dtype))
        self.bias = nnx.Param(jnp.zeros((dim,), dtype))

    def __call__(self, x):
        return layer_norm(x, self.eps) * self.scale[...] + self.bias[...]


def _linear(din, dout, rngs, dtype):
    return nnx.Linear(din, dout, use_bias=True, rngs=rngs, param_dtype=dtype, dtype=dtype)


class MLP2(nnx.Module):
    """Linear -> activation -> Linear."""

    def __init__(self, din, dhidden, dout, act, *, rngs, dtype=jnp.float32):
        self.fc1 = _linear(din, dhidden, rngs, dtype)
        self.fc2 = _linear(dhidden, dout, rngs, dtype)
        self.act = act

    def __call__(self, x):
        return self.fc2(self.act(self.fc1(x)))


def _gelu_tanh(x):
    return jax.nn.gelu(x, approximate=True)


class _Projections(nnx.Module):
    """q, k, v, o Linear layers plus RMSNorms on q and k over the full width (Wan's attention parameters)."""

    def __init__(self, cfg: ModelConfig, *, rngs, dtype=jnp.float32):
        d = cfg.dim
        self.num_heads = cfg.num_heads
        self.q = _linear(d, d, rngs, dtype)
        self.k = _linear(d, d, rngs, dtype)
        self.v = _linear(d, d, rngs, dtype)
        self.o = _linear(d, d, rngs, dtype)
        self.norm_q = RMSNorm(d, cfg.eps, dtype=dtype)
        self.norm_k = RMSNorm(d, cfg.eps, dtype=dtype)


class SelfAttention(_Projections):
    def qkv(self, x, cos, sin):
        """x: [B, S, D] -> q, k (rotated), v: [B, S, H, Dh]."""
        b, s, d = x.shape
        shape = (b, s, self.num_heads, d // self.num_heads)
        q = self.norm_q(self.q(x)).reshape(shape)
        k = self.norm_k(self.k(x)).reshape(shape)
        v = self.v(x).reshape(shape)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


class CrossAttention(_Projections):
    def kv(self, ctx):
        """Text K/V, computed once per prompt. ctx: [B, Lt, D] -> k, v: [B, Lt, H, Dh]."""
        b, lt, d = ctx.shape
        shape = (b, lt, self.num_heads, d // self.num_heads)
        return self.norm_k(self.k(ctx)).reshape(shape), self.v(ctx).reshape(shape)

    def __call__(self, x, ctx_k, ctx_v):
        b, s, d = x.shape
        q = self.norm_q(self.q(x)).reshape(b, s, self.num_heads, d // self.num_heads)
        return self.o(dense_attention(q, ctx_k, ctx_v).reshape(b, s, d))


class Block(nnx.Module):
    """One Wan attention block: modulated self-attention, cross-attention, modulated FFN."""

    def __init__(self, cfg: ModelConfig, *, rngs, dtype=jnp.float32):
        self.eps = cfg.eps
        self.modulation = nnx.Param(jax.random.normal(rngs.params(), (6, cfg.dim), dtype) / math.sqrt(cfg.dim))
        self.self_attn = SelfAttention(cfg, rngs=rngs, dtype=dtype)
        self.norm3 = AffineLayerNorm(cfg.dim, cfg.eps, dtype=dtype)
        self.cross_attn = CrossAttention(cfg, rngs=rngs, dtype=dtype)
        self.ffn = MLP2(cfg.dim, cfg.ffn_dim, cfg.dim, _gelu_tanh, rngs=rngs, dtype=dtype)

    # The block is split around self-attention so that the caller owns attention: ``q, k, v = qkv(...)``,
    # ``out = <any attention over the cache>``, ``x = finish(...)``. Nothing is carried out of a closure.
    def _mods(self, e0):
        """e0: [B, F, 6, D] -> shift1, scale1, gate1, shift2, scale2, gate2, each [B, F, 1, D]."""
        m = self.modulation[...][None, None] + e0
        return [m[:, :, i, None, :] for i in range(6)]

    def qkv(self, x, e0, cos, sin):
        """x: [B, F*T, D]; e0: [B, F, 6, D] -> the self-attention's q, k (rotated), v: [B, F*T, H, Dh]."""
        shift1, scale1, *_ = self._mods(e0)
        return self.self_attn.qkv(_modulate(layer_norm(x, self.eps), shift1, scale1), cos, sin)

    def finish(self, x, attn, e0, ctx_k, ctx_v):
        """The rest of the block after self-attention. attn: [B, F*T, H, Dh] -> the new x [B, F*T, D]."""
        b, s, d = x.shape
        _, _, gate1, shift2, scale2, gate2 = self._mods(e0)
        x = x + _gated(self.self_attn.o(attn.reshape(b, s, d)), gate1)
        x = x + self.cross_attn(self.norm3(x), ctx_k, ctx_v)
        return x + _gated(self.ffn(_modulate(layer_norm(x, self.eps), shift2, scale2)), gate2)


def _modulate(h, shift, scale):
    """h: [B, F*T, D]; shift, scale: [B, F, 1, D] (per frame)."""
    b, s, d = h.shape
    f = shift.shape[1]
    return (h.reshape(b, f, s // f, d) * (1 + scale) + shift).reshape(b, s, d)


def _gated(y, gate):
    b, s, d = y.shape
    f = gate.shape[1]
    return (y.reshape(b, f, s // f, d) * gate).reshape(b, s, d)


class Head(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs, dtype=jnp.float32):
        self.eps = cfg.eps
        self.modulation = nnx.Param(jax.random.normal(rngs.params(), (2, cfg.dim), dtype) / math.sqrt(cfg.dim))
        self.head = _linear(cfg.dim, cfg.out_patch_dim, rngs, dtype)

    def __call__(self, x, e, f):
        """x: [B, F*T, D]; e: [B, F, D] (time embedding, not projected) -> [B, F*T, out_patch_dim]."""
        b, s, d = x.shape
        m = self.modulation[...][None, None] + e[:, :, None, :]  # [B, F, 2, D]
        shift, scale = m[:, :, 0, None, :], m[:, :, 1, None, :]
        h = (layer_norm(x, self.eps).reshape(b, f, s // f, d) * (1 + scale) + shift).reshape(b, s, d)
        return self.head(h)


class CausalWanModel(nnx.Module):
    """Wan2.1 T2V DiT with a frame-causal KV-cache forward."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.cfg = cfg
        d = cfg.dim
        # Conv3d with kernel = stride = patch: a Linear on (c, kt, kh, kw)-ordered patch vectors.
        self.patch_embedding = _linear(cfg.patch_dim, d, rngs, dtype)
        self.text_embedding = MLP2(cfg.text_dim, d, d, _gelu_tanh, rngs=rngs, dtype=dtype)
        self.time_embedding = MLP2(cfg.freq_dim, d, d, jax.nn.silu, rngs=rngs, dtype=dtype)
        self.time_projection = _linear(d, 6 * d, rngs, dtype)

        @nnx.split_rngs(splits=cfg.num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make_blocks(r):
            return Block(cfg, rngs=r, dtype=dtype)

        self.blocks = make_blocks(rngs)  # every Param has a leading [L] axis
        self.head = Head(cfg, rngs=rngs, dtype=dtype)

    # ---- text -------------------------------------------------------------------------------------
    def embed_text(self, context: jax.Array) -> jax.Array:
        """UMT5 output [B, Lc, text_dim] (Lc <= text_len, zero-padded by us) -> [B, text_len, D]."""
        b, lc, _ = context.shape
        if lc > self.cfg.text_len:
            raise ValueError(f"context has {lc} tokens, more than the model's text_len={self.cfg.text_len}")
        context = jnp.pad(context, ((0, 0), (0, self.cfg.text_len - lc), (0, 0)))
        return self.text_embedding(context)

    def context_kv(self, context: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Cross-attention K/V of every layer, computed once per prompt: [L, B, Lt, H, Dh] each."""
        ctx = self.embed_text(context)
        gdef, state = nnx.split(self.blocks)

        def body(_, st):
            return None, nnx.merge(gdef, st).cross_attn.kv(ctx)

        _, (k, v) = jax.lax.scan(body, None, state)
        return k, v

    # ---- time -------------------------------------------------------------------------------------
    def embed_time(self, t_sin: jax.Array) -> tuple[jax.Array, jax.Array]:
        """t_sin: [B, F, freq_dim] sinusoid -> e [B, F, D], e0 [B, F, 6, D]."""
        e = self.time_embedding(t_sin)
        e0 = self.time_projection(jax.nn.silu(e))
        return e, e0.reshape(*e.shape[:-1], 6, self.cfg.dim)

    # ---- forward ----------------------------------------------------------------------------------
    def forward(
        self,
        x: jax.Array,
        t_sin: jax.Array,
        ctx_kv: tuple[jax.Array, jax.Array],
        rope: RopeTables,
        frame_pos: jax.Array,
        layer_xs,
        attn_fn: SelfAttnFn,
    ):
        """The general forward: self-attention is delegated to ``attn_fn`` layer by layer.

        Args:
          x: [B, F, C, H, W] latents of the chunk (Self Forcing layout).
          t_sin: [B, F, freq_dim] timestep sinusoid (``timestep_sinusoid_np`` on host, float64-exact).
            A [B, F] float array is also accepted and embedded in float32.
          ctx_kv: text K/V from :meth:`context_kv`, each [L, B, Lt, H, Dh].
          rope: RoPE tables for this latent size.
          frame_pos: int32 [F] absolute latent-frame index of each frame (sets the temporal RoPE).
          layer_xs: a pytree whose leaves have a leading [L] axis (e.g. the cache, per-layer policy state);
            layer l's slice is handed to ``attn_fn``.
          attn_fn: ``attn_fn(layer_idx, layer_x, q, k, v) -> (out, layer_y)`` with q, k, v [B, S, H, Dh]
            (q, k rotated) and out [B, S, H, Dh]; ``layer_y`` (e.g. a policy's aux) is stacked over layers.
        Returns:
          flow [B, F, C, H, W], keys and values of the chunk [L, B, H, F, T, Dh] each, and the stacked
          ``layer_y``.
        """
        cfg = self.cfg
        b, f, c, hh, ww = x.shape
        _, ph, pw = cfg.patch_size
        gh, gw = cfg.grid_hw((hh, ww))
        t = gh * gw
        if t_sin.ndim == 2:
            t_sin = timestep_sinusoid(t_sin, cfg.freq_dim)
        tokens = self.patch_embedding(patchify(x, (ph, pw)))  # [B, F*T, D]
        e, e0 = self.embed_time(t_sin)
        cos, sin = chunk_cos_sin(rope, frame_pos)  # [F*T, Dh/2]
        nh, dh = cfg.num_heads, cfg.head_dim
        gdef, state = nnx.split(self.blocks)

        def body(xs, layer):
            idx, st, lx, xk, xv = layer
            blk = nnx.merge(gdef, st)
            q, k, v = blk.qkv(xs, e0, cos, sin)  # [B, S, H, Dh]
            out, y = attn_fn(idx, lx, q, k, v)
            xs = blk.finish(xs, out, e0, xk, xv)
            # the chunk's K/V in the cache's heads-first layout [B, H, F, T, Dh] (a chunk-sized transpose)
            kv = (jnp.moveaxis(k.reshape(b, f, t, nh, dh), 3, 1), jnp.moveaxis(v.reshape(b, f, t, nh, dh), 3, 1))
            return xs, (kv, y)

        layers = (jnp.arange(cfg.num_layers), state, layer_xs, *ctx_kv)
        tokens, ((k_new, v_new), ys) = jax.lax.scan(body, tokens, layers)
        out = self.head(tokens, e, f)
        flow = unpatchify(out, f, (gh, gw), (ph, pw), cfg.out_dim)
        return flow, k_new, v_new, ys

    def __call__(
        self,
        x: jax.Array,
        t_sin: jax.Array,
        ctx_kv: tuple[jax.Array, jax.Array],
        rope: RopeTables,
        frame_pos: jax.Array,
        cache_k: jax.Array | None = None,
        cache_v: jax.Array | None = None,
        slot_mask: jax.Array | None = None,
    ):
        """Flow prediction for one chunk over the cache slots allowed by ``slot_mask``; the cache is read only.

        Args (see :meth:`forward` for the others):
          cache_k, cache_v: [L, B, H, N, T, Dh] cache slots, or None for no history.
          slot_mask: bool [B|1, Qf, H|1, N] slots each (query-frame group, head) may read, same for every layer.
        Returns:
          flow [B, F, C, H, W] and the chunk's rotated keys/values per layer, each [L, B, H, F, T, Dh].
        """
        cfg = self.cfg
        if cache_k is None:
            t = cfg.tokens_per_frame(tuple(x.shape[-2:]))
            cache_k = jnp.zeros((cfg.num_layers, x.shape[0], cfg.num_heads, 0, t, cfg.head_dim), x.dtype)
            cache_v = cache_k
            slot_mask = jnp.zeros((1, 1, 1, 0), bool)

        def attn_fn(idx, lx, q, k, v):
            ck, cv = lx
            return chunk_attention(q, k, v, ck, cv, slot_mask), None

        flow, k_new, v_new, _ = self.forward(x, t_sin, ctx_kv, rope, frame_pos, (cache_k, cache_v), attn_fn)
        return flow, k_new, v_new
