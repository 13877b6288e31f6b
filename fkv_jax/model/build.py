"""Building models: random init, abstract (allocation-free) init, parameter counting."""

from __future__ import annotations

import math

import jax
import numpy as np
import jax.numpy as jnp
from flax import nnx

from fkv_jax.config import ModelConfig, model_preset
from fkv_jax.model.transformer import CausalWanModel


def init_model(cfg: ModelConfig, seed: int = 0, dtype=jnp.float32) -> CausalWanModel:
    """A randomly initialised model (used for the embedded default and for tests).

    Weights are drawn on the host with numpy (compiling JAX's initialisers costs seconds on CPU): kernels
    ~ N(0, 1/fan_in), biases 0, norm scales 1, modulation tables ~ N(0, 1/dim) as in Wan.
    """
    graphdef, state = nnx.split(abstract_model(cfg, dtype))
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = str(path[-1].key) if hasattr(path[-1], "key") else str(path[-1])
        if name == "kernel":
            a = rng.standard_normal(leaf.shape) / math.sqrt(leaf.shape[-2])
        elif name == "modulation":
            a = rng.standard_normal(leaf.shape) / math.sqrt(cfg.dim)
        elif name == "scale":
            a = np.ones(leaf.shape)
        elif name == "bias":
            a = np.zeros(leaf.shape)
        else:
            raise ValueError(f"no initialiser for parameter {jax.tree_util.keystr(path)}")
        return jnp.asarray(a, leaf.dtype)

    pure = jax.tree_util.tree_map_with_path(draw, nnx.to_pure_dict(state))
    nnx.replace_by_pure_dict(state, pure)
    return nnx.merge(graphdef, state)


def abstract_model(cfg: ModelConfig, dtype=jnp.float32) -> CausalWanModel:
    """The model with ``jax.ShapeDtypeStruct`` leaves: shapes and dtypes only, nothing allocated."""
    return nnx.eval_shape(lambda: CausalWanModel(cfg, rngs=nnx.Rngs(0), dtype=dtype))


COMPUTE_DTYPES = ("float32", "bfloat16")


def model_dtype(graphdef: nnx.GraphDef) -> str:
    """The compute dtype a model was built with, read from its graph definition (static, no params needed).

    Every layer of :class:`CausalWanModel` computes in the dtype it was built with (``abstract_model(cfg,
    dtype)``), so the first layer's ``dtype`` attribute is the model's.
    """
    for name, attr in graphdef.attributes:
        if name == "dtype" and hasattr(attr, "value"):
            return jnp.dtype(attr.value).name
    return "float32"


def cast_model(cfg: ModelConfig, model: CausalWanModel, dtype) -> CausalWanModel:
    """The same weights in another compute dtype (a new model; float32 accumulation stays where it is)."""
    dtype = jnp.dtype(dtype)
    state = nnx.state(model, nnx.Param)
    pure = jax.tree.map(lambda a: jnp.asarray(a, dtype), nnx.to_pure_dict(state))
    graphdef, new_state = nnx.split(abstract_model(cfg, dtype), nnx.Param)
    nnx.replace_by_pure_dict(new_state, pure)
    return nnx.merge(graphdef, new_state)


def count_params(cfg: ModelConfig | str) -> int:
    """Number of parameters of a model config or preset name, from an abstract build (allocates nothing).

    >>> count_params("wan2.1-t2v-1.3b")
    1418996800
    """
    if isinstance(cfg, str):
        cfg = model_preset(cfg)
    params = nnx.state(abstract_model(cfg), nnx.Param)
    return sum(math.prod(x.shape) for x in jax.tree.leaves(params))
