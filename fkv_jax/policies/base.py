"""The policy protocol: how a KV selection policy plugs into the sampler.

A policy is a frozen dataclass of static hyper-parameters with four pure functions::

    geometry(base, num_frames)            -> CacheGeometry      what the physical cache keeps
    init_state(geom)                      -> state               {"layers": leaves with a leading [L] axis, ...}
                                                                 (K/V copies in geom.dtype, the cache's)
    on_chunk_start(state, cache, start)   -> state, cache        once per chunk, before its first call
    select(call)                          -> Selection, aux      every attention call, every layer
    post_attention(call, out)             -> out                 (optional) e.g. head gating for ablations
    on_write(call: WriteCall)             -> state, aux          after the clean pass, before the cache write

All of them run inside the sampler's one jitted chunk step. ``state["layers"]`` is scanned with the
model's layers, so ``select`` sees the slice of its own layer; every other key of ``state`` is shared.
``aux`` pytrees (scores, picked indices) are returned to the host for inspection and tests; return
``None`` when there is nothing to report. ``select`` gets a :class:`Call` bundle, ``on_write`` a
:class:`WriteCall`: the state, the pre-write cache, the chunk's clean K/V, and what the clean pass saw (its
select aux stacked over layers and, if the policy sets ``needs_clean_queries = True``, its rotated
queries), so a policy can fold attention mass or observation-window queries into its state.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from fkv_jax.attention.selection import Selection, from_slot_mask
from fkv_jax.cache.kv_cache import CacheGeometry, visible_slots

State = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Call:
    """Everything a policy may look at in one attention call of one layer."""

    layer: Int[Array, ""]  # layer index
    step: Int[Array, ""]  # call index in the chunk: 0..n-1 denoising steps, n = the clean pass
    num_steps: int  # n (static)
    start_frame: Int[Array, ""]  # absolute index of the chunk's first frame
    q: Float[Array, "B CT H Dh"]  # rotated queries of this call
    k_chunk: Float[Array, "B CT H Dh"]  # rotated keys of the chunk
    v_chunk: Float[Array, "B CT H Dh"]
    cache_k: Float[Array, "B H N T Dh"]  # this layer's cache slots (heads-first, as stored)
    cache_v: Float[Array, "B H N T Dh"]
    slot_frame: Int[Array, " N"]
    visible: Bool[Array, " N"]  # slots the upstream window rule allows
    layer_state: Any  # this layer's slice of state["layers"]
    state: State  # the whole state (shared entries)
    geom: CacheGeometry

    @property
    def is_clean_pass(self) -> jax.Array:
        return self.step == self.num_steps


@dataclasses.dataclass(frozen=True)
class WriteCall:
    """Everything a policy may look at when a chunk's clean K/V is about to be written (once per chunk)."""

    state: State  # the policy state
    cache: dict  # the cache before the write ([L, B, H, N, T, Dh] K/V)
    k_new: Float[Array, "L B H C T Dh"]  # the chunk's clean keys (rotated), heads-first as cached
    v_new: Float[Array, "L B H C T Dh"]
    start_frame: Int[Array, ""]  # the chunk's first frame
    clean_select: Any = None  # the clean pass's select() aux, stacked over layers
    clean_q: Float[Array, "L B CT H Dh"] | None = None  # its rotated queries (needs_clean_queries only)


jax.tree_util.register_dataclass(
    WriteCall,
    data_fields=["state", "cache", "k_new", "v_new", "start_frame", "clean_select", "clean_q"],
    meta_fields=[],
)


def value_key(x) -> Any:
    """A hashable stand-in for a static configuration value: arrays by (shape, dtype, bytes), dataclasses by
    their fields, containers element-wise. Two configurations with equal values get equal keys."""
    if isinstance(x, (np.ndarray, jax.Array)):
        a = np.asarray(x)
        return ("array", a.shape, a.dtype.str, a.tobytes())
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return (type(x).__qualname__, tuple((f.name, value_key(getattr(x, f.name))) for f in dataclasses.fields(x)))
    if isinstance(x, (list, tuple)):
        return tuple(value_key(v) for v in x)
    if isinstance(x, dict):
        return tuple(sorted((k, value_key(v)) for k, v in x.items()))
    return x


class ValueHashed:
    """Equality and hash by value (:func:`value_key`) for frozen dataclasses that may hold arrays.

    The one convention for policy configurations: declare them ``@dataclasses.dataclass(frozen=True,
    eq=False)`` (so the dataclass keeps these methods). Equal configurations then share compiled steps
    (they are static arguments of jit), whatever arrays (head tables, importance) they hold.
    """

    def __eq__(self, other):
        return type(self) is type(other) and value_key(self) == value_key(other)

    def __hash__(self):
        return hash(value_key(self))


class Policy(ValueHashed):
    """Base class with the behaviour of a plain cache: read every visible slot, keep no state.

    Subclasses are ``@dataclasses.dataclass(frozen=True, eq=False)``: hashed and compared by value.
    """

    name: str = "policy"
    needs_clean_queries: bool = False  # hand the clean pass's queries of every layer to on_write
    # Whether the policy works with window-relative RoPE (cache keys un-rotated, re-rotated per call). Policies
    # that keep keys outside the cache or score cached keys in on_write assume absolute RoPE.
    supports_relative_rope: bool = False

    def geometry(self, base: CacheGeometry, num_frames: int | None = None) -> CacheGeometry:
        """The cache this policy needs, given the one the sampler config describes (and the video length)."""
        return base

    def init_state(self, geom: CacheGeometry) -> State:
        return {"layers": jnp.zeros((geom.num_layers,), jnp.int32)}

    def on_chunk_start(self, state: State, cache: dict, start_frame: jax.Array) -> tuple[State, dict]:
        return state, cache

    def select(self, call: Call) -> tuple[Selection, Any]:
        return dense_selection(call, call.visible), None

    def on_write(self, call: WriteCall) -> tuple[State, Any]:
        return call.state, None

    def post_attention(self, call: Call, out: jax.Array) -> jax.Array:
        """Last look at the attention output [B, C*T, H, Dh] of a call (e.g. gate heads off); identity here."""
        return out


def dense_selection(call: Call, slots: jax.Array) -> Selection:
    """Every (query, head) reads the same slots: ``slots`` is bool[N]."""
    b, _, h, _ = call.q.shape
    return from_slot_mask(slots[None, None, None, :], b, h)


def upstream_visible(geom: CacheGeometry, cache: dict, start_frame: jax.Array) -> jax.Array:
    return visible_slots(geom, cache, start_frame)
