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
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from fkv_jax.parallel.attention import sharded
from fkv_jax.parallel.shardings import (
    CONTEXT_KV,
    batch_sharding,
    cache_shardings,
    check_divisible,
    param_shardings,
)
from fkv_jax.model.build import model_dtype
from fkv_jax.sampling.rollout import Sampler, StepShardings, _named_attention


def step_shardings(mesh: Mesh) -> StepShardings:
    """The chunk step's shardings on a ``(data, model)`` mesh: batch on ``data``, heads on ``model``."""
    rep = NamedSharding(mesh, P())
    return StepShardings(
        cache=cache_shardings(mesh),
        state=rep,
        context=NamedSharding(mesh, CONTEXT_KV),
        chunk=batch_sharding(mesh, 5),
        steps=batch_sharding(mesh, 6, batch_axis=1),
        replicated=rep,
    )


class ShardedSampler(Sampler):
    """A :class:`~fkv_jax.sampling.rollout.Sampler` whose arrays are sharded over ``mesh`` (see the module doc).

    Build it like a Sampler plus ``mesh=`` (e.g. ``fkv_jax.parallel.make_mesh("data=2,model=4")``);
    :meth:`generate` accepts unsharded params and places them (:meth:`shard_params` does it once up front).
    """

    def __init__(
        self,
        graphdef,
        model_cfg,
        sampler_cfg,
        *,
        mesh: Mesh,
        batch: int,
        attention_backend: str = "auto",
        attention_kwargs: dict | None = None,
        **kwargs,
    ):
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
        fn = _named_attention(
            attention_backend, dtype, kwargs.get("cache_dtype") or dtype, model_cfg.head_dim, gh * gw
        )  # resolved and checked for this model
        if attention_kwargs:
            fn = functools.partial(fn, **attention_kwargs)
        super().__init__(
            graphdef,
            model_cfg,
            sampler_cfg,
            batch=batch,
            attention=sharded(mesh, fn),
            shardings=step_shardings(mesh),
            **kwargs,
        )
        self.mesh = mesh
        self.cache_sharding = self.shardings.cache

    def shard_params(self, params):
        """Place params on the mesh (a no-op for params already placed this way).

        On several processes every process holds the whole params (each loaded them) and contributes its own
        devices' shards from its host copy: no array moves between hosts."""
        shardings = param_shardings(params, self.mesh)
        if jax.process_count() == 1:
            return jax.device_put(params, shardings)

        def place(x, sharding):
            if isinstance(x, jax.Array) and x.sharding == sharding:
                return x
            host = np.asarray(x)
            return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])

        return jax.tree.map(place, params, shardings)

    def generate(self, params, context, noise, **kwargs):
        """:meth:`Sampler.generate` with params placed on the mesh first."""
        return super().generate(self.shard_params(params), context, noise, **kwargs)
