"""Deep Forcing (arXiv 2512.05081): a deep RoPE-re-aligned sink plus participative token compression.

Composition (defaults = the paper's: budget window ``N = S + C_f + R = 16`` frames of history):

* cache: ``sink_size = S = 10`` sink frames + a ring of the ``recent_frames = R = 4`` last frames; every head
  reads both and the current chunk;
* compressed region (a :class:`~fkv_jax.policies.token_memory.TokenMemory`): ``memory_frames = C_f = 2``
  frames' worth of tokens (``M = C_f * T``) per layer and head. Candidates = the memory U every token of the
  frames leaving the recent window at this write (all tokens between the sink and the recent frames);
  the top ``M`` per head by ``phi_j = sum_r q_r . k_j`` over the recent frames' clean-pass queries (raw
  logits, summed; ``per_head = False`` sums phi over heads too, so every head keeps the same tokens);
  ``phi`` is linear in the queries, so the state keeps only each recent frame's *sum* of queries
  (``q_sum [L, B, R, H, Dh]``, a ring indexed by ``frame % R``), exactly, instead of ``R * T`` queries;
* trigger: the cache write (``on_write``) of every chunk. While the candidates fit (``start <= N``) every
  token is kept, so compression effectively starts when the window is full, as in the paper. The paper
  compresses at the first denoising step of the chunk that overflows the window; everything the scores
  depend on (the cache after the write, the memory, the recent frames' clean queries) is fixed from the end
  of the previous chunk's clean pass until then (denoising passes write nothing), so selecting at the
  write gives the same tokens, and every call of the next chunk reads the compressed cache, as in the paper.
  (If the paper's recent queries include the noisy current chunk, that differs; we use clean queries.)
* RoPE (temporal channels only, by delta rotation of the stored keys; spatial channels untouched):
  - the chunk at ``start`` (queries at their absolute frames) sees the recent frames at their absolute
    positions ``start - R .. start - 1``;
  - the memory tokens of a head, in origin order (frame, then raster token), the i-th at position
    ``start - R - n_f + i // T`` with ``n_f = ceil(kept / T)`` (``= C_f`` once full): they fill the ``C_f``
    frame positions just before the recent frames, ``T`` tokens per position. Set in ``on_write`` for the
    next chunk (``mem_pos`` records each key's current position). Before the window is full these are the
    tokens' own frames, so nothing moves;
  - the sink (``on_chunk_start``): positions ``max(start - N, 0) .. + S - 1``, i.e. just before the memory
    (cumulative delta rotation of the cached sink keys, ``sink_pos`` in the state).
  Scores use the keys as stored at scoring time (memory keys at their current positions, evicted frames at
  their absolute ones).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from fkv_jax.model.rope import shift_temporal
from fkv_jax.policies.token_memory import Candidates, TokenMemory


@dataclasses.dataclass(frozen=True, eq=False)
class DeepForcing(TokenMemory):
    name = "deep_forcing"
    needs_clean_queries = True
    uses_mass = False

    sink_size: int = 10
    recent_frames: int = 4
    memory_frames: float = 2.0
    per_head: bool = True
    sink_rerotation: bool = True
    realign_memory: bool = True

    @property
    def window_frames(self) -> int:
        """N = S + C_f + R: the history frames' worth of tokens every head reads."""
        return self.sink_size + int(self.memory_frames) + self.recent_frames

    def geometry(self, base, num_frames=None):
        if self.memory_frames != int(self.memory_frames) or self.memory_frames < 0:
            raise ValueError(
                f"deep_forcing: memory_frames (C = N - R - S) must be a whole number of frames, "
                f"got {self.memory_frames}"
            )
        if self.recent_frames < 1:
            raise ValueError("deep_forcing needs recent_frames >= 1 (their queries score the candidates)")
        if self.allocator != "uniform" or self.layer_schedule != "uniform":
            raise ValueError(
                "deep_forcing keeps the same C frames' worth of tokens in every head and layer "
                "(allocator='uniform', layer_schedule='uniform'): the RoPE layout depends on it"
            )
        return super().geometry(base, num_frames)

    # ---- state: the recent frames' query sums, the sink's RoPE position ----------------------------------
    def extra_layer_state(self, geom):
        r = self.recent_frames
        return {"q_sum": jnp.zeros((geom.num_layers, geom.batch, r, geom.num_heads, geom.head_dim), jnp.float32)}

    def extra_shared_state(self, geom):
        return {"q_frame": jnp.full((self.recent_frames,), -1, jnp.int32), "sink_pos": jnp.zeros((), jnp.int32)}

    def _recent_queries(self, call):
        """(q_sum ring [L, B, R, H, D], q_frame [R]) after this chunk's frames joined the recent window."""
        state, k_new, start_frame = call.state, call.k_new, call.start_frame
        L, b, h, c, t, d = k_new.shape
        r = self.recent_frames
        per_frame = call.clean_q.astype(jnp.float32).reshape(L, b, c, t, h, d).sum(3)  # [L, B, C, H, D]
        frames = start_frame + jnp.arange(c, dtype=jnp.int32)
        slot = jnp.where(frames >= start_frame + c - r, jnp.mod(frames, r), r)  # only the last R frames
        q_sum = state["layers"]["q_sum"].at[:, :, slot].set(per_frame, mode="drop")
        q_frame = state["q_frame"].at[slot].set(frames, mode="drop")
        return q_sum, q_frame

    def extra_layer_inputs(self, call):
        c = call.k_new.shape[3]
        q_sum, q_frame = self._recent_queries(call)
        recent = (q_frame >= 0) & (q_frame >= call.start_frame + c - self.recent_frames)
        return {"q_sum_new": q_sum, "q_bar": (q_sum * recent[:, None, None]).sum(2)}  # [L, B, H, D]

    def shared_update(self, call):
        return {"q_frame": self._recent_queries(call)[1]}

    # ---- scorer: summed raw logits of the recent queries -------------------------------------------------
    def score_candidates(self, cand: Candidates, x):
        phi = jnp.einsum("bnhd,bhd->bhn", cand.k.astype(jnp.float32), x.layer.extra["q_bar"])
        if not self.per_head:
            phi = jnp.broadcast_to(jnp.where(cand.valid, phi, 0.0).sum(1, keepdims=True), phi.shape)
        return phi, {"q_sum": x.layer.extra["q_sum_new"]}

    # ---- RoPE: memory just before the recent frames, sink just before the memory -------------------------
    def place(self, mem, x, next_start):
        if not self.realign_memory:
            return mem
        t = x.layer.k_new.shape[3]  # [B, H, C, T, D]
        valid = mem["mem_valid"]  # [B, H, Mc], valid first, origin order
        rank = jnp.arange(valid.shape[-1], dtype=jnp.int32)
        n_f = (valid.sum(-1, keepdims=True).astype(jnp.int32) + t - 1) // t
        target = next_start - self.recent_frames - n_f + rank // t
        delta = jnp.where(valid, target - mem["mem_pos"], 0)  # [B, H, Mc]
        k = shift_temporal(mem["mem_k"], jnp.swapaxes(delta, 1, 2))
        return {**mem, "mem_k": k, "mem_pos": jnp.where(valid, target, -1)}

    def on_chunk_start(self, state, cache, start_frame):
        if not self.sink_rerotation or not self.sink_size:
            return state, cache
        target = jnp.maximum(start_frame - self.window_frames, 0)
        delta = target - state["sink_pos"]
        s = self.sink_size
        ks = shift_temporal(cache["k"][:, :, :, :s], delta)
        return {**state, "sink_pos": target}, {**cache, "k": cache["k"].at[:, :, :, :s].set(ks)}
