"""A policy wrapper that counts the keys each query reads, for meters and benchmarks.

For one attention call of one layer: the selected cache slots' tokens, the allowed frames of the query's own
chunk, and the policy's memory tokens (what :mod:`fkv_jax.bench.policies` turns into FLOPs and ``fkv serve``
shows per head).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from fkv_jax.policies.base import Policy


@dataclasses.dataclass(frozen=True, eq=False)
class KeyMeter(Policy):
    """A policy, unchanged, whose select aux also carries the keys each (row, head) reads: ``(inner aux,
    float32 [B, H])`` (mean over the query groups of the call)."""

    inner: Policy = None
    name = "key_meter"

    @property
    def supports_relative_rope(self):  # type: ignore[override]
        return self.inner.supports_relative_rope

    @property
    def needs_clean_queries(self):  # type: ignore[override]
        return self.inner.needs_clean_queries

    def geometry(self, base, num_frames=None):
        return self.inner.geometry(base, num_frames)

    def init_state(self, geom):
        return self.inner.init_state(geom)

    def on_chunk_start(self, state, cache, start_frame):
        return self.inner.on_chunk_start(state, cache, start_frame)

    def on_write(self, call):
        inner = None if call.clean_select is None else call.clean_select[0]
        return self.inner.on_write(dataclasses.replace(call, clean_select=inner))

    def post_attention(self, call, out):
        return self.inner.post_attention(call, out)

    def select(self, call):
        sel, aux = self.inner.select(call)
        t, c = call.geom.tokens_per_frame, call.geom.frames_per_block
        keys = (sel.frames >= 0).sum(-1).astype(jnp.float32) * t  # [B, Qf, H]
        keys = keys + (sel.chunk_mask.sum(-1) * t if sel.chunk_mask is not None else c * t)
        if sel.mem_valid is not None:  # [B, H, M]
            keys = keys + sel.mem_valid.sum(-1)[:, None, :]
        return sel, (aux, keys.mean(axis=1))  # [B, H]
