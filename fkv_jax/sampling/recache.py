"""LongLive prompt switching: KV re-cache, and an AR loop whose prompt changes mid-video.

When the prompt changes at the first chunk whose start frame ``cur`` reaches the next switch frame, LongLive
(``pipeline/interactive_causal_inference.py``, reference section 5.3) re-runs the model **once** on the
``n = min(local_attn_size, cur)`` most recent clean latents (all ``cur`` of them for a global cache) with the
**new** prompt at ``t = 0``, frames ``rs = cur - n .. cur - 1``, and keeps the K/V of that call:

* the ``n`` frames attend to each other **bidirectionally** (no causal mask in the cached path), plus the sink;
* ``global_sink=True`` and ``rs > 0``: the sink slots keep the old prompt's K/V of frames ``0..S-1``; the first
  ``S`` re-cached frames are not written and so are not keys either (upstream writes into the window slots
  only and attends to what the buffer holds);
* ``global_sink=False`` (``sink_recache_after_switch``), or ``rs == 0`` (upstream's recompute flag needs a
  positive start): every re-cached frame is written, the sink becomes frames ``rs .. rs+S-1`` of the new
  prompt, and the keys are exactly the ``n`` re-cached frames;
* the cross-attention K/V are those of the new prompt (computed once per prompt).

Our cache stores what the next chunk reads (``docs/design.md``): the sink and the last ``W`` frames. So after a
re-cache it holds the re-computed K/V of frames ``cur - W .. cur - 1`` in their ring slots, and the sink either
untouched or rewritten; which slots are keys during the re-cache is derived from ``slot_frame`` (filled sink
slots) and from the chunk frames' positions, never from slot order.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fkv_jax.attention.selection import Selection, pack_mask
from fkv_jax.cache.kv_cache import CacheGeometry, write
from fkv_jax.model.embeddings import timestep_sinusoid_np
from fkv_jax.policies.base import Policy


def recache_frames(geom: CacheGeometry, local_attn_size: int, start_frame: int) -> int:
    """How many clean latents a switch at ``start_frame`` re-runs: ``min(local_attn_size, cur)`` (all for global)."""
    return start_frame if geom.global_attn or local_attn_size == -1 else min(local_attn_size, start_frame)


def recache(
    graphdef: nnx.GraphDef,
    geom: CacheGeometry,
    rope,
    params,
    cache: dict,
    ctx_kv,
    latents: jax.Array,
    recache_start: jax.Array,
    rewrite_sink: jax.Array,
    *,
    attention: Callable | None = None,
) -> dict:
    """Re-compute the cache from clean latents with new text K/V (one model call at ``t = 0``).

    Args:
      cache: the cache before the switch (its sink is read when ``rewrite_sink`` is False).
      ctx_kv: the new prompt's cross-attention K/V ``[L, B, Lt, H, Dh]`` each.
      latents: ``[B, n, C, H, W]`` clean latents of frames ``recache_start .. recache_start + n - 1``.
      recache_start: int32 scalar ``rs``.
      rewrite_sink: bool scalar; True for ``global_sink=False`` or ``rs == 0`` (see the module docstring).
    Returns the new cache (same shapes). Both scalars may be traced: one executable per re-cache length.
    """
    from fkv_jax.attention.reference import selection_attention

    attention = attention or selection_attention
    model = nnx.merge(graphdef, params)
    b, n = latents.shape[:2]
    s, num_slots = geom.sink, geom.num_slots
    rewrite = jnp.asarray(rewrite_sink, bool) | (s == 0)
    frame_pos = recache_start + jnp.arange(n, dtype=jnp.int32)
    # keys: the kept sink (filled sink slots, from slot_frame) and the re-cached frames that land in the window;
    # after a sink rewrite, exactly the n re-cached frames
    sf = cache["slot_frame"]
    kept_sink = (jnp.arange(num_slots) < s) & (sf >= 0)
    slots = kept_sink & ~rewrite
    own = rewrite | (frame_pos >= recache_start + s)
    h = geom.num_heads
    sel = Selection(
        frames=pack_mask(jnp.broadcast_to(slots, (b, 1, h, num_slots))), chunk_mask=jnp.broadcast_to(own, (b, 1, h, n))
    )

    def attn_fn(layer, lx, q, k, v):
        ck, cv = lx
        return attention(q, k, v, ck, cv, sel), None

    t0 = jnp.asarray(timestep_sinusoid_np(np.zeros(1), model.cfg.freq_dim))
    ts = jnp.broadcast_to(t0, (b, n, t0.shape[-1]))
    _, k_new, v_new, _ = model.forward(latents, ts, ctx_kv, rope, frame_pos, (cache["k"], cache["v"]), attn_fn)

    if s == 0:  # no sink: every frame goes to its ring slot (write keeps the last W)
        return write(geom, cache, k_new, v_new, recache_start)
    if n <= s:  # only when rs == 0: the re-cached frames are sink frames, written if the sink is rewritten
        new = write(geom, cache, k_new, v_new, recache_start)
        return jax.tree.map(lambda a, o: jnp.where(rewrite, a, o), new, cache)
    # the sink: the first S re-cached frames, or untouched; then the window from frame rs + S on
    sink_k = jnp.where(rewrite, k_new[:, :, :, :s].astype(cache["k"].dtype), cache["k"][:, :, :, :s])
    sink_v = jnp.where(rewrite, v_new[:, :, :, :s].astype(cache["v"].dtype), cache["v"][:, :, :, :s])
    cache = {
        **cache,
        "k": cache["k"].at[:, :, :, :s].set(sink_k),
        "v": cache["v"].at[:, :, :, :s].set(sink_v),
        "slot_frame": cache["slot_frame"].at[:s].set(jnp.where(rewrite, frame_pos[:s], sf[:s])),
    }
    return write(geom, cache, k_new[:, :, :, s:], v_new[:, :, :, s:], recache_start + s)


class PromptSwitcher:
    """Jitted :func:`recache` for one sampler (compiles once per re-cache length)."""

    def __init__(self, sampler, graphdef: nnx.GraphDef | None = None, *, global_sink: bool = True):
        if getattr(sampler, "rope_mode", "absolute") != "absolute":
            raise ValueError("prompt switching (KV re-cache) supports rope_mode='absolute' only")
        if type(sampler.policy) is not Policy:
            raise ValueError(
                f"prompt switching (KV re-cache) needs the plain cache; the sampler uses the "
                f"{getattr(sampler.policy, 'name', type(sampler.policy).__name__)!r} policy"
            )
        self.sampler, self.global_sink = sampler, global_sink
        graphdef = graphdef if graphdef is not None else sampler._graphdef
        geom, rope = sampler.geom, sampler.rope
        self._fn = jax.jit(
            lambda params, cache, ctx_kv, lat, rs, rewrite: recache(
                graphdef, geom, rope, params, cache, ctx_kv, lat, rs, rewrite, attention=sampler.attention
            ),
            donate_argnums=(1,),
        )

    def num_frames(self, start_frame: int) -> int:
        return recache_frames(self.sampler.geom, self.sampler.sampler_cfg.local_attn_size, start_frame)

    def __call__(self, params, cache: dict, ctx_kv, latents: np.ndarray, start_frame: int) -> dict:
        """Re-cache after a switch at ``start_frame`` from the generated latents ``[B, >= start_frame, C, H, W]``."""
        n = self.num_frames(start_frame)
        if n == 0:
            return cache
        rs = start_frame - n
        lat = jnp.asarray(latents[:, rs:start_frame], jnp.float32)
        return self._fn(params, cache, ctx_kv, lat, jnp.int32(rs), jnp.asarray((not self.global_sink) or rs == 0))


@dataclasses.dataclass(frozen=True)
class PromptSchedule:
    """Prompts of one video and the latent frames at which each prompt after the first starts."""

    prompts: tuple[str, ...]
    switch_frames: tuple[int, ...] = ()

    def __post_init__(self):
        if not self.prompts:
            raise ValueError("a prompt schedule needs at least one prompt")
        if len(self.switch_frames) != len(self.prompts) - 1:
            raise ValueError(
                f"{len(self.prompts)} prompts need {len(self.prompts) - 1} switch frames, got "
                f"{len(self.switch_frames)} ({list(self.switch_frames)})"
            )
        if any(f <= 0 for f in self.switch_frames) or list(self.switch_frames) != sorted(set(self.switch_frames)):
            raise ValueError(f"switch frames must be positive and strictly increasing, got {list(self.switch_frames)}")

    def check_length(self, num_frames: int) -> None:
        if self.switch_frames and self.switch_frames[-1] >= num_frames:
            raise ValueError(f"switch frame {self.switch_frames[-1]} is not inside the {num_frames}-frame video")

    def segment_of_chunk(self, start_frame: int) -> int:
        """LongLive's rule: prompt i + 1 starts at the first chunk whose start frame is >= switch_frames[i]."""
        return sum(start_frame >= f for f in self.switch_frames)
