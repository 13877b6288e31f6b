"""Step-by-step streaming: the AR rollout one chunk at a time, with a prompt that may change at any chunk boundary.

:func:`fkv_jax.sampling.rollout.rollout` runs a whole video with its prompt schedule fixed in advance. A live
consumer (``fkv serve``) decides between chunks: which rows of the batch are still wanted, and whether a row's
prompt changes now. :class:`Streamer` exposes exactly the pieces of that loop, as pure steps over an explicit
:class:`StreamState`::

    st = streamer.begin(params, context)                    # context [B, Lt, text_dim]
    out, st = streamer.step(params, st, noise_chunk, eps)   # one chunk: denoise, clean pass, cache write
    st, recached = streamer.switch(params, st, new_context, rows)   # LongLive re-cache of some rows

The batch rows run in lockstep (one start frame, one ``slot_frame`` for the whole batch), so a switch re-caches
only the rows whose prompt changed: the re-cache runs for the batch and each row keeps either its new or its
old K/V. Rows that switch get exactly the K/V a one-row run would (rows never interact in the model).

Policies other than the plain cache keep state outside the cache that a re-cache does not rebuild
(:class:`~fkv_jax.sampling.recache.PromptSwitcher` refuses them); with such a policy :meth:`Streamer.switch`
only swaps the cross-attention K/V of the switched rows and says so (``recached=False``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fkv_jax.cache.kv_cache import visible_slots
from fkv_jax.policies.base import Policy
from fkv_jax.sampling.recache import recache, recache_frames
from fkv_jax.sampling.rollout import ChunkOutput, Sampler


@dataclasses.dataclass(frozen=True)
class StreamState:
    """Everything that carries from one chunk to the next (the cache and policy state are donated by a step:
    use only the state a call returns)."""

    cache: dict  # the KV cache, [L, B, H, N, T, Dh] K/V
    policy_state: Any  # the policy's state
    context: np.ndarray  # [B, Lt, text_dim] float32: the current prompt of every row
    ctx_kv: Any  # cross-attention K/V of ``context``, [L, B, Lt, H, Dh] each
    recent: np.ndarray  # [B, K, C, H, W] float32: the last K clean latents (what a re-cache re-runs)
    next_frame: int  # start frame of the next chunk


class Streamer:
    """Chunk-at-a-time driver of one :class:`Sampler` (built once; every step reuses its compiled executable)."""

    def __init__(self, sampler: Sampler, *, global_sink: bool = True):
        self.sampler, self.global_sink = sampler, global_sink
        sc = sampler.sampler_cfg
        self.frames_per_block = sc.frames_per_block
        self.num_steps = sampler.schedule.num_steps
        # a re-cache re-runs at most local_attn_size frames; a global cache re-runs everything it holds
        self.keep = sampler.geom.capacity_frames if sampler.geom.global_attn else sc.local_attn_size
        self.can_recache = type(sampler.policy) is Policy and sampler.rope_mode == "absolute"
        geom, rope, graphdef, attention = sampler.geom, sampler.rope, sampler._graphdef, sampler.attention

        def recache_rows(params, cache, ctx_kv, latents, rs, rewrite, rows):
            """Re-cache the batch, keep the new K/V only in ``rows`` (bool [B]); slot positions are unchanged
            (the re-cached frames are the ones already held)."""
            new = recache(graphdef, geom, rope, params, cache, ctx_kv, latents, rs, rewrite, attention=attention)
            m = rows[None, :, None, None, None, None]  # over [L, B, H, N, T, Dh]
            return {**new, "k": jnp.where(m, new["k"], cache["k"]), "v": jnp.where(m, new["v"], cache["v"])}

        self._recache_rows = jax.jit(recache_rows, donate_argnums=(1,))

    @property
    def batch(self) -> int:
        return self.sampler.batch

    def begin(self, params, context: np.ndarray) -> StreamState:
        """A fresh stream state for text context ``[B, Lt, text_dim]`` (B = the sampler's batch)."""
        s = self.sampler
        context = np.asarray(context, np.float32)
        shape = (s.batch, 0, s.model_cfg.in_dim, *s.latent_hw)
        return StreamState(
            cache=s.init_cache(),
            policy_state=s.init_state(),
            context=context,
            ctx_kv=s.context_kv(params, context),
            recent=np.zeros(shape, np.float32),
            next_frame=0,
        )

    def visible_frames(self, st: StreamState) -> int:
        """Cached frames the next chunk's window allows (what the plain cache reads besides the chunk itself)."""
        return int(jnp.sum(visible_slots(self.sampler.geom, st.cache, jnp.int32(st.next_frame))))

    def step(self, params, st: StreamState, noise: np.ndarray, eps: np.ndarray) -> tuple[ChunkOutput, StreamState]:
        """One chunk: ``noise`` [B, C_blk, C, H, W], ``eps`` [n - 1, B, C_blk, C, H, W] re-noise draws."""
        s, start = self.sampler, st.next_frame
        s.check_length(start + self.frames_per_block)
        out, cache, pstate = s.chunk_step(
            params,
            st.cache,
            st.policy_state,
            st.ctx_kv,
            jnp.asarray(noise, jnp.float32),
            jnp.asarray(eps, jnp.float32),
            jnp.int32(start),
        )
        x0 = np.asarray(out.x0, np.float32)  # [B, C_blk, C, H, W]
        recent = np.concatenate([st.recent, x0], axis=1)[:, -self.keep :]
        new = dataclasses.replace(
            st, cache=cache, policy_state=pstate, recent=recent, next_frame=start + self.frames_per_block
        )
        return out, new

    def switch(self, params, st: StreamState, context: np.ndarray, rows) -> tuple[StreamState, bool]:
        """Switch the prompt of ``rows`` (bool [B]) to their rows of ``context`` [B, Lt, text_dim] before the
        next chunk. Returns (new state, whether the KV cache was re-cached)."""
        rows = np.asarray(rows, bool)
        merged = np.where(rows[:, None, None], np.asarray(context, np.float32), st.context)
        ctx_kv = self.sampler.context_kv(params, merged)
        cur = st.next_frame
        n = recache_frames(self.sampler.geom, self.sampler.sampler_cfg.local_attn_size, cur)
        if not self.can_recache or n == 0 or not rows.any():
            return dataclasses.replace(st, context=merged, ctx_kv=ctx_kv), False
        rs = cur - n
        lat = jnp.asarray(st.recent[:, -n:], jnp.float32)  # frames rs .. cur - 1
        rewrite = jnp.asarray((not self.global_sink) or rs == 0)
        cache = self._recache_rows(params, st.cache, ctx_kv, lat, jnp.int32(rs), rewrite, jnp.asarray(rows))
        return dataclasses.replace(st, cache=cache, context=merged, ctx_kv=ctx_kv), True


def kv_bytes(st: StreamState) -> int:
    """Resident KV bytes of a stream state: the cache's K/V plus the policy's K/V memories (leaves of its
    per-layer state with >= 4 dims, the way :mod:`fkv_jax.bench.policies` counts them)."""
    state = st.policy_state if isinstance(st.policy_state, dict) else {}
    mem = sum(int(x.nbytes) for x in jax.tree.leaves(state.get("layers", {})) if getattr(x, "ndim", 0) >= 4)
    return int(st.cache["k"].nbytes + st.cache["v"].nbytes) + mem
