"""LLM KV-compression baselines on the token memory: H2O, SnapKV, R-KV.

All three are :class:`~fkv_jax.policies.token_memory.TokenMemory` (sink frames + a ring of recent frames read
by every head, plus a per-(layer, head) memory of ``M`` tokens refreshed at each cache write from the current
memory U the frames leaving the ring) with a different scorer. Attention mass below is the clean (t = 0)
pass's softmax over everything it read (chunk, sink, ring, memory), averaged over its ``C * T`` queries.

* **H2O** (heavy hitters): a token's score is its attention mass accumulated over every clean pass since it
  was written (its own chunk's included: queries attend bidirectionally within a chunk). Ring tokens carry
  their running score in ``slot_score [L, B, N, T, H]`` until they are evicted; memory tokens keep adding.
  The ring is H2O's "recent" half, the memory its heavy-hitter half.
* **SnapKV**: the observation window is the current chunk's clean queries; a candidate's score is the mass
  from that window, smoothed by 1-D pooling (``kernel_size`` 5, ``pooling`` avg as kvpress; the original
  SnapKV code max-pools) over the candidate sequence in origin order (memory tokens, then the evicted frames'
  tokens in raster order); recomputed every chunk, nothing accumulates.
* **R-KV**: ``lambda * importance - (1 - lambda) * redundancy``, importance = the SnapKV score (R-KV's code:
  max pooling, kernel 7), redundancy = each key's mean cosine similarity to the other candidate keys of the
  same head, softmax-normalised over the candidates (as R-KV's ``cal_similarity``). R-KV's extra rule that
  zeroes each key's similarity to its last near-duplicate (threshold 0.5) is left out: the plain mean then
  has the closed form of :func:`~fkv_jax.policies.token_memory.mean_cosine_to_others` (no N x N matrix).

Video analogues of the LLM settings: the "prompt" is the history, compression runs once per chunk (at the
cache write) instead of once after prefill (SnapKV) or every decoding step (H2O), scores use the clean pass's
queries only (denoising passes see noisy latents and write nothing), and memory keys keep the RoPE phase of
their origin frame (absolute positions, as the cache).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from fkv_jax.policies.token_memory import Candidates, TokenMemory, masked_softmax, mean_cosine_to_others, pool1d


@dataclasses.dataclass(frozen=True, eq=False)
class H2O(TokenMemory):
    name = "h2o"
    uses_mass = True

    def extra_layer_state(self, geom):
        shape = (geom.num_layers, geom.batch, geom.num_heads, geom.num_slots, geom.tokens_per_frame)
        return {"slot_score": jnp.zeros(shape, jnp.float32)}

    def score_candidates(self, cand: Candidates, x):
        ls = x.layer.state
        running = ls["slot_score"] + x.mass_cache  # [B, H, N, T]: every slot's total after this pass
        ev = x.evicted(running[..., None], x.mass_chunk[..., None])[..., 0]  # [B, C*T, H]
        score = jnp.concatenate([ls["mem_score"] + x.mass_cand[..., : cand.num_mem], jnp.moveaxis(ev, 1, 2)], -1)
        # the frames written now start with what their own chunk gave them
        slot_score = running.at[:, :, x.written].set(x.mass_chunk, mode="drop")
        return score, {"slot_score": slot_score}


@dataclasses.dataclass(frozen=True, eq=False)
class SnapKV(TokenMemory):
    name = "snapkv"
    uses_mass = True
    kernel_size: int = 5
    pooling: str = "avg"

    def geometry(self, base, num_frames=None):
        if self.pooling not in ("avg", "max") or self.kernel_size < 1:
            raise ValueError(f"{self.name}: pooling must be 'avg' or 'max' and kernel_size >= 1")
        return super().geometry(base, num_frames)

    def importance(self, cand: Candidates, x):
        return pool1d(jnp.where(cand.valid, x.mass_cand, 0.0), self.kernel_size, self.pooling)

    def score_candidates(self, cand: Candidates, x):
        return self.importance(cand, x), {}


@dataclasses.dataclass(frozen=True, eq=False)
class RKV(SnapKV):
    name = "rkv"
    kernel_size: int = 7
    pooling: str = "max"
    mix_lambda: float = 0.1

    def geometry(self, base, num_frames=None):
        if not 0 <= self.mix_lambda <= 1:
            raise ValueError(f"{self.name}: mix_lambda must be in [0, 1]")
        return super().geometry(base, num_frames)

    def redundancy(self, cand: Candidates):
        return masked_softmax(mean_cosine_to_others(cand.k, cand.valid), cand.valid)

    def score_candidates(self, cand: Candidates, x):
        imp = self.importance(cand, x)
        return self.mix_lambda * imp - (1 - self.mix_lambda) * self.redundancy(cand), {}
