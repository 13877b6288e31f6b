"""Multi-device execution on a ``(data, model)`` mesh: batch on ``data``, heads on ``model``.

    mesh = make_mesh("data=2,model=4")                  # Auto axes; also the value of a --mesh flag
    sampler = ShardedSampler(graphdef, cfg, sampler_cfg, mesh=mesh, batch=2, latent_hw=..., num_frames=...)
    latents = sampler.generate(params, context, noise)  # same numbers as Sampler, sharded

Several processes (hosts): join the runtime first on every process (:func:`fkv_jax.distributed.session`, or
``jax.distributed.initialize()``), then build the same mesh over ``jax.devices()`` (every process's devices);
see docs/cluster.md.
"""

from fkv_jax.parallel.attention import sharded, sharded_attention
from fkv_jax.parallel.mesh import make_mesh, parse_mesh_spec
from fkv_jax.parallel.sampler import ShardedSampler
from fkv_jax.parallel.shardings import cache_shardings, param_shardings, param_spec

__all__ = [
    "ShardedSampler",
    "cache_shardings",
    "make_mesh",
    "param_shardings",
    "param_spec",
    "parse_mesh_spec",
    "sharded",
    "sharded_attention",
]
