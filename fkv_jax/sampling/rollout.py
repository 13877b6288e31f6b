"""The autoregressive rollout: one jitted call per chunk, a host loop over chunks.

Per chunk (Self Forcing's ``CausalInferencePipeline`` semantics, expressed functionally)::

    x = noise chunk
    for step i (timesteps t_0 > ... > t_{n-1}):
        flow = model(x, t_i, history)              # reads the cache, attends to its own K/V too
        x0 = x - sigma_i * flow
        x = (1 - sigma_{i+1}) * x0 + sigma_{i+1} * eps_i     (not after the last step)
    model(x0, t = 0, history) -> clean K/V  ->  cache = write(cache, K/V)

All of that is one compiled function of (params, cache, text K/V, noise, re-noise draws, start frame); the
cache argument is donated, and the same executable serves every chunk of every video of this geometry.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Float
from tqdm.auto import tqdm

from fkv_jax.attention.backends import auto_attention, resolve_backend
from fkv_jax.cache.kv_cache import CacheGeometry, init_cache, visible_slots, write
from fkv_jax.config import ModelConfig, SamplerConfig
from fkv_jax.distributed import host_local
from fkv_jax.model.build import model_dtype
from fkv_jax.model.embeddings import timestep_sinusoid_np
from fkv_jax.model.rope import make_rope_tables, rotate_temporal
from fkv_jax.policies.base import Call, Policy, WriteCall
from fkv_jax.sampling.noise import renoise_draws
from fkv_jax.sampling.scheduler import Schedule, make_schedule


@dataclasses.dataclass(frozen=True)
class ChunkOutput:
    x0: Float[Array, "B C Cin H W"]  # the chunk's final latents
    # with Sampler(trajectories=True), else None: [n + 1, B, C, Cin, H, W] flow of every model call (for
    # prediction="x0" the flow it implies; the last entry is the raw output of the clean pass) and its x0
    flows: Float[Array, "n1 B C Cin H W"] | None = None
    x0s: Float[Array, "n1 B C Cin H W"] | None = None
    select_aux: Any = None  # the policy's select() aux, stacked [n + 1 calls, L, ...]
    write_aux: Any = None  # the policy's on_write() aux


@dataclasses.dataclass(frozen=True)
class StepShardings:
    """Where the chunk step's arrays live (``jax.sharding.Sharding`` values), for a Sampler on a device mesh
    (:class:`fkv_jax.parallel.ShardedSampler` builds one from a mesh)."""

    cache: Any  # a pytree of shardings with the structure of the cache dict
    state: Any  # the policy state (one sharding for every leaf)
    context: Any  # each text K/V [L, B, Lt, H, Dh]
    chunk: Any  # [B, C, Cin, H, W] noise chunk and x0
    steps: Any  # [n, B, C, Cin, H, W] re-noise draws and trajectories
    replicated: Any  # scalars and aux


class Sampler:
    """Compiled AR sampler for one (model config, sampler config, batch, latent size, cache geometry).

    Build once, then call :meth:`generate` for any number of videos: the chunk step compiles on the first
    chunk and is reused for every chunk after it.
    """

    def __init__(
        self,
        graphdef: nnx.GraphDef,
        model_cfg: ModelConfig,
        sampler_cfg: SamplerConfig,
        *,
        batch: int,
        latent_hw: tuple[int, int],
        num_frames: int | None = None,
        cache_frames: int | None = None,
        cache_dtype=None,
        max_traces: int | None = None,
        policy: Policy | None = None,
        attention_backend: str = "auto",
        attention: Callable | None = None,
        rope_mode: str = "absolute",
        trajectories: bool = False,
        shardings: StepShardings | None = None,
    ):
        """
        Args:
          num_frames: video length in latent frames; sets the capacity of a global cache by default.
          cache_dtype: dtype of the KV cache and of the policies' K/V memories (default: the model's compute
            dtype, i.e. the dtype its graphdef was built with: a bfloat16 model gets a bfloat16 cache).
          cache_frames: capacity of a global cache (local_attn_size = -1), default ``num_frames``.
          policy: the KV selection policy (default: plain cache, i.e. every frame the window allows).
          attention: the attention function ``fn(q, k_chunk, v_chunk, k_cache, v_cache, selection) -> out`` (a
            value: a kernel, a wrapped or a sharded one); when None, ``attention_backend`` names one, resolved
            and checked here for this model's dtypes and sizes (``auto``: per call, at trace time).
          rope_mode: ``absolute`` (upstream: keys cached after RoPE at their absolute frame, at most
            ``rope_max_frames`` frames) or ``window_relative`` (LongLive's infinite variant: keys cached
            un-rotated, re-rotated at every call by their rank in the window, queries at the window's end;
            a rolling video can then go on indefinitely).
          trajectories: also return every model call's flow and x0 in :class:`ChunkOutput` (diagnostics and
            parity tests); off by default, so a chunk returns only its final latents and the policy's aux.
          shardings: place the step's inputs and outputs (a mesh); default: the first device.
          max_traces: if set, the chunk step is wrapped in ``chex.assert_max_traces(n=max_traces)`` (chex counts
            traces per definition site, so call ``chex.clear_trace_counter()`` before building another one).
            ``trace_count`` always tells how often the step was traced.
        """
        self.model_cfg, self.sampler_cfg = model_cfg, sampler_cfg
        self.dtype = model_dtype(graphdef)  # compute dtype of the model (activations, q/k/v, text context)
        cache_dtype = jnp.dtype(self.dtype if cache_dtype is None else cache_dtype)
        self.batch, self.latent_hw = batch, tuple(latent_hw)
        c = sampler_cfg.frames_per_block
        sized = cache_frames is not None or num_frames is not None
        if cache_frames is None:
            cache_frames = num_frames if num_frames is not None else c  # a placeholder until a policy decides
        gh, gw = model_cfg.grid_hw(self.latent_hw)
        base = CacheGeometry.from_upstream(
            local_attn_size=sampler_cfg.local_attn_size,
            sink_size=sampler_cfg.sink_size,
            frames_per_block=c,
            num_layers=model_cfg.num_layers,
            batch=batch,
            tokens_per_frame=gh * gw,
            num_heads=model_cfg.num_heads,
            head_dim=model_cfg.head_dim,
            capacity_frames=cache_frames,
            grid_hw=(gh, gw),
        )
        self.policy = policy if policy is not None else Policy()
        # the policy decides the slots; the cache dtype is the Sampler's (policies read it from geom.dtype)
        self.geom = dataclasses.replace(self.policy.geometry(base, num_frames), dtype=jnp.dtype(cache_dtype).name)
        if self.geom.global_attn and not sized:
            raise ValueError("a global cache needs num_frames or cache_frames to size it")
        if rope_mode not in ("absolute", "window_relative"):
            raise ValueError(f"rope_mode must be 'absolute' or 'window_relative', got {rope_mode!r}")
        if rope_mode == "window_relative" and self.geom.global_attn:
            raise ValueError("window-relative RoPE needs a rolling cache (local_attn_size != -1)")
        if rope_mode == "window_relative" and policy is not None and not self.policy.supports_relative_rope:
            raise ValueError(f"policy {self.policy.name} assumes absolute RoPE; use rope_mode='absolute'")
        self.rope_mode = rope_mode

        self.trajectories = trajectories
        self.cache_dtype = cache_dtype.name
        self.attention = (
            attention
            if attention is not None
            else _named_attention(attention_backend, self.dtype, self.cache_dtype, model_cfg.head_dim, gh * gw)
        )
        self.schedule: Schedule = make_schedule(sampler_cfg)
        self.rope = make_rope_tables(model_cfg.head_dim, (gh, gw), model_cfg.rope_max_frames)
        t_sin = timestep_sinusoid_np(self.schedule.timesteps, model_cfg.freq_dim)  # [n + 1, freq_dim]
        self._graphdef = graphdef
        step, prefill = _make_chunk_step(
            graphdef,
            self.geom,
            self.schedule,
            self.rope,
            t_sin,
            self.policy,
            self.attention,
            rope_mode == "window_relative",
            sampler_cfg.solver,
            sampler_cfg.prediction,
            trajectories,
        )
        self.prefill_step = jax.jit(prefill, donate_argnums=(1, 2))
        self.trace_count = 0

        def counted(*args):
            self.trace_count += 1
            return step(*args)

        if max_traces is not None:
            counted = chex.assert_max_traces(counted, n=max_traces)
        self.shardings = sh = shardings
        context_kv = lambda params, ctx: nnx.merge(graphdef, params).context_kv(ctx)  # noqa: E731
        if sh is None:
            self.chunk_step = jax.jit(counted, donate_argnums=(1, 2))
            self._context_kv = jax.jit(context_kv)
        else:
            # params keep their placement; the policy state comes back as it went in, so one executable
            traj = sh.steps if trajectories else None
            outputs = ChunkOutput(x0=sh.chunk, flows=traj, x0s=traj, select_aux=sh.replicated, write_aux=sh.replicated)
            self.chunk_step = jax.jit(
                counted,
                donate_argnums=(1, 2),
                in_shardings=(None, sh.cache, sh.state, (sh.context, sh.context), sh.chunk, sh.steps, sh.replicated),
                out_shardings=(outputs, sh.cache, sh.state),
            )
            self._context_kv = jax.jit(context_kv, out_shardings=(sh.context, sh.context))
            # the cache allocated in place, sharded (one jitted allocator, built once)
            self._init_sharded_cache = jax.jit(lambda: init_cache(self.geom, self.cache_dtype), out_shardings=sh.cache)

    # ---- pieces ---------------------------------------------------------------------------------------
    def init_cache(self):
        """An empty cache, committed to the default device (so the first chunk compiles the same executable as
        every later one, whose cache comes back committed from the step)."""
        if self.shardings is not None:
            return self._init_sharded_cache()
        return jax.device_put(init_cache(self.geom, self.cache_dtype), jax.devices()[0])

    def init_state(self):
        """The policy's initial state (fixed shapes), committed like the cache."""
        where = jax.devices()[0] if self.shardings is None else self.shardings.state
        return jax.device_put(self.policy.init_state(self.geom), where)

    def context_kv(self, params, context: jax.Array):
        """Text K/V of every layer [L, B, Lt, H, Dh] in the compute dtype, computed once per prompt batch."""
        context = jnp.asarray(context, self.dtype)
        if context.ndim != 3 or context.shape[0] != self.batch or context.shape[2] != self.model_cfg.text_dim:
            raise ValueError(
                f"text context must have shape [B={self.batch}, L<={self.model_cfg.text_len}, "
                f"text_dim={self.model_cfg.text_dim}], got {tuple(context.shape)}"
            )
        if context.shape[1] > self.model_cfg.text_len:
            raise ValueError(
                f"text context has {context.shape[1]} tokens, more than text_len={self.model_cfg.text_len}"
            )
        return self._context_kv(params, context)

    def check_length(self, num_frames: int) -> None:
        c = self.sampler_cfg.frames_per_block
        if num_frames < 1 or num_frames % c:
            raise ValueError(f"num_frames={num_frames} must be a positive multiple of frames_per_block={c}")
        if self.geom.global_attn and num_frames > self.geom.capacity_frames:
            raise ValueError(
                f"a global KV cache (local_attn_size=-1) of {self.geom.capacity_frames} frames cannot hold "
                f"{num_frames} frames; raise the cache capacity or use a rolling window (local_attn_size=N)"
            )
        if self.rope_mode == "absolute" and num_frames > self.model_cfg.rope_max_frames:
            raise ValueError(
                f"{num_frames} latent frames exceed the absolute RoPE table of {self.model_cfg.rope_max_frames} "
                f"frames; use a rolling window with window-relative RoPE (--rope-mode window_relative)"
            )

    # ---- the rollout ----------------------------------------------------------------------------------
    def generate(self, params, context: jax.Array, noise: jax.Array, **kwargs) -> np.ndarray:
        """Latents [B, F, C, H, W] (float32 numpy) of one prompt: ``rollout(self, params, [context], noise,
        **kwargs).latents``. Use :func:`rollout` for the final cache and policy state."""
        kwargs.setdefault("progress", True)
        return rollout(self, params, [context], noise, **kwargs).latents


@dataclasses.dataclass(frozen=True)
class Rollout:
    """What a rollout returns: the latents, and the cache and policy state after its last chunk."""

    latents: np.ndarray  # [B, F, C, H, W] float32
    cache: dict  # the cache after the last write
    state: Any  # the policy state after the last chunk


def rollout(
    sampler: Sampler,
    params,
    contexts: Sequence[jax.Array],
    noise: jax.Array,
    *,
    switch_frames: Sequence[int] = (),
    global_sink: bool = True,
    renoise: Callable[[int], np.ndarray] | np.ndarray | None = None,
    seed: int = 0,
    progress: bool = False,
    on_chunk: Callable[[int, ChunkOutput], None] | None = None,
    on_switch: Callable[[int, int, dict], None] | None = None,
    state=None,
    initial_latents: jax.Array | None = None,
    graphdef=None,
) -> Rollout:
    """The AR rollout: one ``sampler.chunk_step`` per chunk, with LongLive prompt switches (a KV re-cache at
    each switch) and video extension. The one host loop of the project.

    Args:
      contexts: one text embedding ``[B, Lt, text_dim]`` per prompt segment; each segment's cross-attention
        K/V is computed once, when the segment starts.
      noise: ``[B, F, C, H, W]`` initial noise (Self Forcing layout).
      switch_frames: latent frame of each prompt switch (``len(contexts) - 1`` of them).
      global_sink, graphdef: of the re-cache (:class:`~fkv_jax.sampling.recache.PromptSwitcher`, which uses
        the sampler's attention).
      renoise: ``[num_blocks, n - 1, B, C_blk, C, H, W]`` draws (a recorded run), or ``fn(block) -> [n - 1, B,
        C_blk, C, H, W]``; default :func:`~fkv_jax.sampling.noise.renoise_draws` of ``seed``.
      on_chunk: ``on_chunk(block, ChunkOutput)`` after each chunk (streaming consumers, tests).
      on_switch: ``on_switch(start_frame, segment, cache)`` right after each re-cache (tests, logging).
      state: initial policy state (default ``sampler.init_state()``), e.g. with a head gate for ablations.
      initial_latents: [B, F0, C, H, W] clean frames to continue from (video extension, upstream's
        ``initial_latent``): they are pushed through the model at t = 0 chunk by chunk to fill the cache and
        copied to the output; generation starts at frame F0 (a multiple of frames_per_block).
    """
    from fkv_jax.sampling.recache import PromptSchedule, PromptSwitcher

    noise = np.asarray(noise, np.float32)
    b, f = noise.shape[:2]
    c, n = sampler.sampler_cfg.frames_per_block, sampler.schedule.num_steps
    expect = (sampler.batch, f, sampler.model_cfg.in_dim, *sampler.latent_hw)
    if tuple(noise.shape) != expect:
        raise ValueError(f"noise must have shape [B, F, C, H, W] = {expect}, got {tuple(noise.shape)}")
    sampler.check_length(f)
    sched = PromptSchedule(tuple(str(i) for i in range(len(contexts))), tuple(switch_frames))
    sched.check_length(f)
    nblk = f // c
    chunk_shape = (b, c, *noise.shape[2:])
    if renoise is not None and not callable(renoise):
        renoise = np.asarray(renoise, np.float32)
        want = (nblk, n - 1, *chunk_shape)
        if tuple(renoise.shape) != want:
            raise ValueError(
                f"renoise must have shape [num_blocks, steps-1, B, C_blk, C, H, W] = {want}, got {tuple(renoise.shape)}"
            )
    switcher = PromptSwitcher(sampler, graphdef, global_sink=global_sink) if switch_frames else None
    seg = 0
    ctx_kv = sampler.context_kv(params, contexts[0])
    cache = sampler.init_cache()
    state = sampler.init_state() if state is None else state
    out = np.empty(noise.shape, np.float32)
    first = 0
    if initial_latents is not None:
        init = np.asarray(initial_latents, np.float32)
        if (
            init.ndim != 5
            or init.shape[0] != b
            or init.shape[2:] != noise.shape[2:]
            or init.shape[1] % c
            or init.shape[1] >= f
        ):
            raise ValueError(
                f"initial_latents must be [B={b}, F0, {noise.shape[2]}, {noise.shape[3]}, "
                f"{noise.shape[4]}] with F0 a multiple of {c} below {f}, got {tuple(init.shape)}"
            )
        first = init.shape[1] // c
        for blk in range(first):
            x0 = jnp.asarray(init[:, blk * c : (blk + 1) * c])
            cache, state = sampler.prefill_step(params, cache, state, ctx_kv, x0, jnp.int32(blk * c))
        out[:, : first * c] = init
    bar = tqdm(range(first, nblk), desc="chunks", unit="chunk", disable=None if progress else True, dynamic_ncols=True)
    t0 = time.perf_counter()
    for blk in bar:
        start = blk * c
        if (new := sched.segment_of_chunk(start)) != seg:
            seg = new
            ctx_kv = sampler.context_kv(params, contexts[seg])
            cache = switcher(params, cache, ctx_kv, out, start)
            if on_switch is not None:
                on_switch(start, seg, cache)
        if renoise is None:
            eps = renoise_draws(seed, blk, n, chunk_shape)
        else:
            eps = renoise(blk) if callable(renoise) else renoise[blk]
        res, cache, state = sampler.chunk_step(
            params,
            cache,
            state,
            ctx_kv,
            jnp.asarray(noise[:, start : start + c]),
            jnp.asarray(eps, jnp.float32),
            jnp.int32(start),
        )
        out[:, start : start + c] = host_local(res.x0)  # this process's rows (all of them on one process)
        if on_chunk is not None:
            on_chunk(blk, res)
        done = (blk + 1 - first) * c
        bar.set_postfix(frames=done, fps=f"{done / (time.perf_counter() - t0):.2f}")
    return Rollout(latents=out, cache=cache, state=state)


def reads_stacked_cache(fn: Callable) -> bool:
    """Whether an attention function takes the layer-stacked cache ``[L, B, H, N, T, Dh]`` plus ``layer=`` (it
    says so with a ``reads_stacked_cache = True`` attribute, also through ``functools.partial``)."""
    while fn is not None:
        if getattr(fn, "reads_stacked_cache", False):
            return True
        fn = getattr(fn, "func", None)
    return False


def _named_attention(name: str, dtype, cache_dtype, head_dim: int, tokens_per_frame: int) -> Callable:
    """The attention function a backend name stands for, checked for this model (one BackendError line
    otherwise). ``auto`` chooses per call, at trace time, from the call's own shapes."""
    if name == "auto":
        return auto_attention
    return resolve_backend(
        name, dtype=dtype, cache_dtype=cache_dtype, head_dim=head_dim, tokens_per_frame=tokens_per_frame
    )[1]


def _make_chunk_step(
    graphdef,
    geom: CacheGeometry,
    schedule: Schedule,
    rope,
    t_sin_table: np.ndarray,
    policy: Policy,
    attention: Callable,
    relative: bool = False,
    solver: str = "renoise",
    prediction: str = "flow",
    trajectories: bool = False,
):
    """The jitted bodies: ``chunk_step`` (denoise + clean pass + write) and ``prefill_step`` (clean pass + write)."""
    n = schedule.num_steps
    sig = schedule.sigmas  # [n + 1]
    euler = solver == "euler"
    stacked = reads_stacked_cache(attention)
    if prediction == "x0" and (sig[:n] <= 0).any():
        raise ValueError(
            "prediction='x0' needs every denoising step at a noise level > 0 (the flow is (x_t - x0) / sigma)"
        )

    def flow_and_x0(out, xt, s):
        """(flow, x0) from the model output at noise level s > 0."""
        if prediction == "x0":
            return (xt - out) / s, out
        return out, xt - s * out

    # after step i, re-noise with sigma_{i+1}; after the last step nothing (sigma 0 keeps x0 exactly)
    re_sig = np.concatenate([schedule.renoise_sigmas, np.zeros(1, np.float32)]).astype(np.float32)

    def begin(params, cache, state, ctx_kv, start_frame, b, c):
        """Per-chunk setup; returns the updated (state, cache) and ``call_model(x, step, clean) -> flow, k, v, aux``."""
        model = nnx.merge(graphdef, params)
        state, cache = policy.on_chunk_start(state, cache, start_frame)
        visible = visible_slots(geom, cache, start_frame)  # [N]
        if relative:
            # queries sit right after the window's history; a cached frame sits at its rank in the window
            frame_pos = jnp.minimum(start_frame, geom.num_slots) + jnp.arange(c, dtype=jnp.int32)
            order = jnp.where(visible, cache["slot_frame"], jnp.iinfo(jnp.int32).max)
            slot_pos = jnp.argsort(jnp.argsort(order)).astype(jnp.int32)  # rank of each slot by frame
            read_k = rotate_temporal(cache["k"], rope, slot_pos[None, None, None, :])
        else:
            frame_pos = start_frame + jnp.arange(c, dtype=jnp.int32)
            read_k = cache["k"]
        tsin = jnp.asarray(t_sin_table)

        def make_attn_fn(step, clean: bool):
            """Self-attention of one model call (denoising step ``step`` or the clean pass), per layer.

            The cache is not scanned over layers: a per-layer slice handed to a kernel's custom call is a copy
            of that layer's cache (XLA materialises it). A backend that reads the stacked cache in place
            (``reads_stacked_cache``) gets the whole cache and the layer index; the others, and the policy's
            view, get ``cache[layer]``, which XLA fuses into its consumers where it can.
            """

            def attn_fn(layer, ls, q, k, v):
                ck = jax.lax.dynamic_index_in_dim(read_k, layer, 0, keepdims=False)  # [B, H, N, T, Dh]
                cv = jax.lax.dynamic_index_in_dim(cache["v"], layer, 0, keepdims=False)
                call = Call(
                    layer=layer,
                    step=step,
                    num_steps=n,
                    start_frame=start_frame,
                    q=q,
                    k_chunk=k,
                    v_chunk=v,
                    cache_k=ck,
                    cache_v=cv,
                    slot_frame=cache["slot_frame"],
                    visible=visible,
                    layer_state=ls,
                    state=state,
                    geom=geom,
                )
                sel, aux = policy.select(call)
                if clean:  # the clean pass may also hand its queries to on_write
                    aux = {"select": aux, "q": q if policy.needs_clean_queries else None}
                if stacked:
                    out = attention(q, k, v, read_k, cache["v"], sel, layer=layer)
                else:
                    out = attention(q, k, v, ck, cv, sel)
                out = policy.post_attention(call, out)
                return out, aux

            return attn_fn

        def call_model(xt, i, clean=False):
            ts = jnp.broadcast_to(tsin[i], (b, c, tsin.shape[-1]))
            flow, k_new, v_new, aux = model.forward(
                xt, ts, ctx_kv, rope, frame_pos, state["layers"], make_attn_fn(i, clean)
            )
            return flow, k_new, v_new, aux

        def clean_and_store(x0):
            """The clean pass (t = 0) on x0; its K/V is what the cache keeps."""
            flow_c, k_new, v_new, clean_aux = call_model(x0, jnp.int32(n), clean=True)
            new_state, write_aux = policy.on_write(
                WriteCall(
                    state=state,
                    cache=cache,
                    k_new=k_new,
                    v_new=v_new,
                    start_frame=start_frame,
                    clean_select=clean_aux["select"],
                    clean_q=clean_aux["q"],
                )
            )
            if relative:  # the cache holds un-rotated keys
                k_new = rotate_temporal(k_new, rope, -frame_pos[None, None, None, :])
            return flow_c, clean_aux, write(geom, cache, k_new, v_new, start_frame), new_state, write_aux

        return call_model, clean_and_store

    def chunk_step(params, cache, state, ctx_kv, x, eps, start_frame):
        """x: [B, C, Cin, H, W]; eps: [n - 1, B, C, Cin, H, W]; start_frame: int32[]."""
        b, c = x.shape[:2]
        call_model, clean_and_store = begin(params, cache, state, ctx_kv, start_frame, b, c)
        eps_pad = jnp.concatenate([eps, jnp.zeros((1, *x.shape), eps.dtype)], axis=0)  # [n, ...]

        def denoise(carry, inp):
            xt, _ = carry
            i, s, s_next, e = inp
            out, _, _, aux = call_model(xt, i)
            flow, x0 = flow_and_x0(out.astype(xt.dtype), xt, s)
            if euler:  # the noise the flow implies: x_{next} = x_t + (s_next - s) * flow
                e = xt + (1 - s) * flow
            return ((1 - s_next) * x0 + s_next * e, x0), ((flow, x0) if trajectories else None, aux)

        xs = (jnp.arange(n, dtype=jnp.int32), jnp.asarray(sig[:n]), jnp.asarray(re_sig), eps_pad)
        (_, x0), (traj, auxs) = jax.lax.scan(denoise, (x, x), xs)
        flow_c, clean_aux, new_cache, state, write_aux = clean_and_store(x0)
        flows = x0s = None
        if trajectories:  # every call's flow and x0; the clean pass's entry is its raw model output
            flows = jnp.concatenate([traj[0], flow_c[None]], axis=0)
            x0s = jnp.concatenate([traj[1], (flow_c if prediction == "x0" else x0 - sig[n] * flow_c)[None]], axis=0)
        select_aux = jax.tree.map(lambda a, b_: jnp.concatenate([a, b_[None]], axis=0), auxs, clean_aux["select"])
        out = ChunkOutput(x0=x0, flows=flows, x0s=x0s, select_aux=select_aux, write_aux=write_aux)
        return out, new_cache, state

    def prefill_step(params, cache, state, ctx_kv, x0, start_frame):
        """Only the clean pass over given clean frames x0 [B, C, Cin, H, W]: fills the cache (video extension)."""
        _, clean_and_store = begin(params, cache, state, ctx_kv, start_frame, *x0.shape[:2])
        _, _, new_cache, state, _ = clean_and_store(x0)
        return new_cache, state

    return chunk_step, prefill_step


jax.tree_util.register_dataclass(
    ChunkOutput, data_fields=["x0", "flows", "x0s", "select_aux", "write_aux"], meta_fields=[]
)
