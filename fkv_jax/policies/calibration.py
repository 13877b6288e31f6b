"""Offline head profilers: Forcing-KV's static/dynamic classification and head importance by masking.

Both run the real sampler (one compiled chunk step) through small wrapper policies:

* :class:`AttentionMassProbe` reads the full cache and reports, per layer, head and key frame, the softmax
  attention mass of the chunk's queries (two blockwise passes: log-sum-exp, then mass per frame; no
  [queries x keys] matrix). :func:`classify_heads` turns the masses into a :class:`HeadTable` with
  Forcing-KV's rule ``mass(last_k key frames) / mass(key frames [skip_first_k:]) >= threshold -> static``.
* :class:`HeadGate` multiplies each head's attention output by a gate kept in the policy state, so one
  compiled step serves every single-head ablation; :func:`head_importance` scores each head by a
  pluggable loss between the masked and the unmasked rollout (default: relative L2 deviation).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from fkv_jax.policies.base import Call, Policy
from fkv_jax.policies.dense import Full
from fkv_jax.policies.heads import HeadTable

_NEG = -1e30


def frame_attention_mass(q, k_chunk, cache_k, visible, slot_frame, start_frame, max_frames: int):
    """Softmax mass of every query on every key frame, summed over queries.

    q, k_chunk: [B, C*T, H, D]; cache_k: [B, H, N, T, D] (as cached); visible: bool[N]. Returns float32 [H, max_frames]
    indexed by absolute frame (history slots by their ``slot_frame``, the chunk's own frames after them),
    summed over the batch and the queries.
    """
    b, sq, h, d = q.shape
    n, t = cache_k.shape[2], cache_k.shape[3]
    c = sq // t
    qs = q.astype(jnp.float32) / math.sqrt(d)
    kc = jnp.moveaxis(k_chunk.astype(jnp.float32).reshape(b, c, t, h, d), 3, 1)  # [B, H, C, T, D]

    def logits(kf):  # kf [B, H, T, D] -> [B, H, Sq, T]
        return jnp.einsum("bqhd,bhkd->bhqk", qs, kf)

    # pass 1: log-sum-exp over every key a query sees
    def lse_step(i, acc):
        kf = cache_k[:, :, i].astype(jnp.float32)
        s = jnp.where(visible[i], logits(kf), _NEG)
        return jnp.logaddexp(acc, jax.nn.logsumexp(s, axis=-1))

    acc = jax.nn.logsumexp(logits(kc.reshape(b, h, sq, d)), axis=-1)  # [B, H, Sq]
    lse = jax.lax.fori_loop(0, n, lse_step, acc)

    # pass 2: mass per key frame
    def mass(kf):
        return jnp.exp(logits(kf) - lse[..., None]).sum(axis=(0, 2, 3))  # [H]

    out = jnp.zeros((h, max_frames), jnp.float32)

    def hist_step(i, out):
        m = jnp.where(visible[i], mass(cache_k[:, :, i].astype(jnp.float32)), 0.0)
        f = jnp.clip(slot_frame[i], 0, max_frames - 1)
        return out.at[:, f].add(jnp.where(visible[i], m, 0.0))

    out = jax.lax.fori_loop(0, n, hist_step, out)
    for j in range(c):
        out = out.at[:, jnp.clip(start_frame + j, 0, max_frames - 1)].add(mass(kc[:, :, j]))
    return out


@dataclasses.dataclass(frozen=True, eq=False)
class AttentionMassProbe(Full):
    """Full cache; reports per-(layer, head, key frame) attention mass of every call as select aux."""

    name = "attention_mass_probe"
    max_frames: int = 64

    def select(self, call: Call):
        sel, _ = super().select(call)
        mass = frame_attention_mass(
            call.q, call.k_chunk, call.cache_k, call.visible, call.slot_frame, call.start_frame, self.max_frames
        )
        return sel, mass


def forcing_kv_score(mass: np.ndarray, end_frame: int, last_k: int = 4, skip_first_k: int = 3) -> np.ndarray:
    """mass(last ``last_k`` key frames) / mass(key frames [skip_first_k:]) for keys of frames < end_frame.

    mass: [..., H, frames]. Returns [..., H].
    """
    m = mass[..., :end_frame]
    return m[..., -last_k:].sum(-1) / np.maximum(m[..., skip_first_k:].sum(-1), 1e-30)


def classify_heads(scores: np.ndarray, threshold: float = 0.8, profile: str = "", description: str = "") -> HeadTable:
    """scores [L, H] -> HeadTable (static where score >= threshold)."""
    return HeadTable(np.asarray(scores) < threshold, profile=profile, description=description)


def profile_static_dynamic(
    make_sampler: Callable[[Policy], "object"],
    params,
    runs: list[tuple[np.ndarray, np.ndarray]],
    *,
    threshold: float = 0.8,
    last_k: int = 4,
    skip_first_k: int = 3,
    min_frame: int | None = None,
    steps: list[int] | None = None,
    seed: int = 0,
    progress: bool = True,
) -> tuple[HeadTable, np.ndarray]:
    """Forcing-KV head classification from attention mass on calibration runs.

    Args:
      make_sampler: policy -> a Sampler for the calibration geometry (global cache).
      runs: (context [B, L, text_dim], noise [B, F, C, H, W]) calibration inputs.
      min_frame: only chunks starting at or after this frame are scored (default: skip_first_k + last_k,
        so the ratio has history to compare with).
      steps: which calls of a chunk to use (0..n-1 denoising, n = clean pass); default all.
    Returns:
      the head table and the per-head scores [L, H] (mass ratio averaged over chunks, calls and runs).
    """
    frames = max(int(noise.shape[1]) for _, noise in runs)
    sampler = make_sampler(AttentionMassProbe(max_frames=frames))
    c = sampler.sampler_cfg.frames_per_block
    min_frame = skip_first_k + last_k if min_frame is None else min_frame
    total, count = None, 0
    for ri, (ctx, noise) in enumerate(tqdm(runs, desc="calibration runs", disable=None if progress else True)):
        chunks = []
        sampler.generate(
            params,
            ctx,
            noise,
            seed=seed + ri,
            progress=False,
            on_chunk=lambda blk, r: chunks.append((blk, np.asarray(r.select_aux))),
        )
        for blk, mass in chunks:  # mass [calls, L, H, frames]
            start = blk * c
            if start < min_frame:
                continue
            use = mass if steps is None else mass[steps]
            s = forcing_kv_score(use, start + c, last_k, skip_first_k).mean(0)  # [L, H]
            total = s if total is None else total + s
            count += 1
    if count == 0:
        raise ValueError(f"no chunk starts at frame >= {min_frame}: generate more frames for calibration")
    scores = total / count
    desc = (
        f"fkv_jax profile: static when mass of the last {last_k} key frames / mass over key frames "
        f"[{skip_first_k}:] >= {threshold}; {len(runs)} run(s), chunks from frame {min_frame}"
    )
    return classify_heads(
        scores, threshold, profile=f"fkv_jax_last{last_k}_skip{skip_first_k}_thr{threshold}", description=desc
    ), scores


@dataclasses.dataclass(frozen=True, eq=False)
class HeadGate(Policy):
    """Wraps a policy; multiplies head outputs by ``state["head_gate"][layer]`` (1 = on, 0 = masked)."""

    inner: Policy = dataclasses.field(default_factory=Full)
    name = "head_gate"

    def geometry(self, base, num_frames=None):
        return self.inner.geometry(base, num_frames)

    def init_state(self, geom):
        return {**self.inner.init_state(geom), "head_gate": jnp.ones((geom.num_layers, geom.num_heads), jnp.float32)}

    def on_chunk_start(self, state, cache, start_frame):
        return self.inner.on_chunk_start(state, cache, start_frame)

    def select(self, call):
        return self.inner.select(call)

    def on_write(self, call):
        return self.inner.on_write(call)

    def post_attention(self, call, out):
        gate = call.state["head_gate"][call.layer]  # [H]
        return self.inner.post_attention(call, out) * gate[None, None, :, None].astype(out.dtype)

    @property
    def needs_clean_queries(self):  # type: ignore[override]
        return self.inner.needs_clean_queries


def relative_l2(masked: np.ndarray, ref: np.ndarray) -> float:
    """Default ablation loss: ||masked - ref|| / ||ref||."""
    return float(np.linalg.norm(masked - ref) / max(np.linalg.norm(ref), 1e-30))


def head_importance(
    make_sampler: Callable[[Policy], "object"],
    params,
    runs: list[tuple[np.ndarray, np.ndarray]],
    *,
    loss: Callable[[np.ndarray, np.ndarray], float] = relative_l2,
    inner: Policy | None = None,
    seed: int = 0,
    progress: bool = True,
) -> np.ndarray:
    """Per-head importance [L, H]: mean over runs of ``loss(rollout with head masked, unmasked rollout)``.

    Every rollout uses the same noise and re-noise draws (``seed``), so the score isolates the head.
    """
    sampler = make_sampler(HeadGate(inner if inner is not None else Full()))
    geom = sampler.geom
    base_state = sampler.init_state()
    L, H = geom.num_layers, geom.num_heads
    scores = np.zeros((L, H))
    bar = tqdm(total=len(runs) * (L * H + 1), desc="head ablations", disable=None if progress else True)
    for ri, (ctx, noise) in enumerate(runs):
        ref = sampler.generate(
            params, ctx, noise, seed=seed + ri, progress=False, state=jax.tree.map(jnp.array, base_state)
        )
        bar.update(1)
        for layer in range(L):
            for head in range(H):
                st = jax.tree.map(jnp.array, base_state)
                st["head_gate"] = st["head_gate"].at[layer, head].set(0.0)
                masked = sampler.generate(params, ctx, noise, seed=seed + ri, progress=False, state=st)
                scores[layer, head] += loss(masked, ref)
                bar.update(1)
    bar.close()
    return scores / len(runs)
