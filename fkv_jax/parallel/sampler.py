"""``ShardedSampler``: the AR rollout of :class:`fkv_jax.sampling.rollout.Sampler` on a device mesh.

Same chunk step, same numbers; what changes is where arrays live. Params are placed with
:func:`~fkv_jax.parallel.shardings.param_shardings`, the cache is created sharded (batch on ``data``, heads
on ``model``), and the chunk step is jitted with explicit in/out shardings, so the donated cache comes
back with the sharding it went in with, chunk after chunk. Inside, jit propagates the shardings (Auto mesh
axes): attention runs on each device's own heads, XLA adds the collectives after the head- and
hidden-sharded projections.
"""

from __future__ import annotations

import functools

import jax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from fkv_jax.cache.kv_cache import init_cache
from fkv_jax.parallel.attention import sharded
from fkv_jax.parallel.shardings import (
    CONTEXT_KV,
    batch_sharding,
    cache_shardings,
    check_divisible,
    param_shardings,
)
from fkv_jax.model.build import model_dtype
from fkv_jax.sampling.rollout import ChunkOutput, Sampler, _named_attention


class ShardedSampler(Sampler):
    """A :class:`~fkv_jax.sampling.rollout.Sampler` whose arrays are sharded over ``mesh`` (see the module doc).

    Build it like a Sampler plus ``mesh=`` (e.g. ``fkv_jax.parallel.make_mesh("data=2,model=4")``);
    :meth:`generate` accepts unsharded params and places them (:meth:`shard_params` does it once up front).
    """

    def __init__(self, graphdef, model_cfg, sampler_cfg, *, mesh: Mesh, batch: int, attention_backend: str = "xla",
                 attention_kwargs: dict | None = None, **kwargs):
        """
        Args:
          mesh: a ``(data, model)`` mesh (:func:`~fkv_jax.parallel.mesh.make_mesh`).
          batch: videos per call; the ``data`` axis must divide it (``model`` must divide the heads).
          attention_backend: a key of ``fkv_jax.attention.BACKENDS``; it runs under ``jax.shard_map`` on
            each device's batch rows and heads (:func:`~fkv_jax.parallel.attention.sharded`).
          attention_kwargs: extra keyword arguments of the backend (e.g. ``interpret=`` for a kernel on CPU).
          kwargs: the other :class:`~fkv_jax.sampling.rollout.Sampler` arguments.
        """
        check_divisible(model_cfg, mesh, batch)
        dtype = model_dtype(graphdef)
        gh, gw = model_cfg.grid_hw(tuple(kwargs["latent_hw"]))
        fn = _named_attention(attention_backend, dtype, kwargs.get("cache_dtype") or dtype, model_cfg.head_dim,
                              gh * gw)  # resolved and checked for this model
        if attention_kwargs:
            fn = functools.partial(fn, **attention_kwargs)
        super().__init__(graphdef, model_cfg, sampler_cfg, batch=batch, attention=sharded(mesh, fn), **kwargs)
        self.mesh = mesh
        self.cache_sharding = cache_shardings(mesh)
        rep = NamedSharding(mesh, P())
        ctx = NamedSharding(mesh, CONTEXT_KV)
        chunk = batch_sharding(mesh, 5)  # [B, C, Cin, H, W]
        steps = batch_sharding(mesh, 6, batch_axis=1)  # [n, B, C, Cin, H, W]
        traj = steps if self.trajectories else None
        outputs = ChunkOutput(x0=chunk, flows=traj, x0s=traj, select_aux=rep, write_aux=rep)
        # The Sampler's own (trace-counting) step, re-jitted with shardings. Params keep their placement;
        # the policy state is replicated, so it comes back as it went in and the step compiles once.
        self.chunk_step = jax.jit(self.chunk_step.__wrapped__, donate_argnums=(1, 2),
                                  in_shardings=(None, self.cache_sharding, rep, (ctx, ctx), chunk, steps, rep),
                                  out_shardings=(outputs, self.cache_sharding, rep))
        self._context_kv = jax.jit(self._context_kv.__wrapped__, out_shardings=(ctx, ctx))
        self._init_cache = jax.jit(lambda: init_cache(self.geom, self.cache_dtype), out_shardings=self.cache_sharding)

    def shard_params(self, params):
        """Place params on the mesh (a no-op for params already placed this way)."""
        return jax.device_put(params, param_shardings(params, self.mesh))

    def init_cache(self):
        """An empty cache, allocated sharded."""
        return self._init_cache()

    def init_state(self):
        """The policy's initial state, replicated over the mesh (as the chunk step returns it)."""
        return jax.device_put(super().init_state(), NamedSharding(self.mesh, P()))

    def generate(self, params, context, noise, **kwargs):
        """:meth:`Sampler.generate` with params placed on the mesh first."""
        return super().generate(self.shard_params(params), context, noise, **kwargs)
