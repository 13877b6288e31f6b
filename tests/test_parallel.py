"""Multi-device execution on 8 simulated CPU devices (a subprocess: the device count is fixed at jax import).

The sharded rollout runs the attention backend under ``jax.shard_map`` (ShardedSampler always does), here the
default ``auto`` (``cpu_ffi`` when built, else ``xla``) over the Selection of the default full-cache policy; a
kernel under ``shard_map`` is checked at the attention level with ``pallas_tpu`` in interpret mode.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from jax.sharding import PartitionSpec as P

from fkv_jax.parallel import param_spec, parse_mesh_spec

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.subprocess

SCRIPT = """
import json
import dataclasses, jax, numpy as np
from flax import nnx
import fkv_jax
from fkv_jax.parallel import ShardedSampler, make_mesh

cfg = dataclasses.replace(fkv_jax.model_preset("tiny"), num_heads=4)  # head_dim 32; model=4 needs 4 heads
graphdef, params = nnx.split(fkv_jax.init_model(cfg, seed=0), nnx.Param)
sampler_cfg = fkv_jax.sampler_preset("self_forcing")  # global (full) cache
rng = np.random.default_rng(0)
b, f = 2, 6  # two chunks of 3 frames
context = rng.standard_normal((b, cfg.text_len, cfg.text_dim)).astype(np.float32)
noise = rng.standard_normal((b, f, cfg.in_dim, *cfg.latent_hw)).astype(np.float32)
kw = dict(batch=b, latent_hw=cfg.latent_hw, num_frames=f)
ref = fkv_jax.Sampler(graphdef, cfg, sampler_cfg, **kw).generate(params, context, noise, progress=False)
mesh = make_mesh("data=2,model=4")

def rel(x):
    return float(np.linalg.norm(x - ref) / np.linalg.norm(ref))

out = {"devices": len(jax.devices())}
s = ShardedSampler(graphdef, cfg, sampler_cfg, mesh=mesh, **kw)
res = fkv_jax.rollout(s, params, [context], noise)
out["rollout"] = {"rel": rel(res.latents), "traces": s.trace_count, "spec": str(res.cache["k"].sharding.spec)}

# a kernel under shard_map: batch on data, heads on model
from jax.sharding import NamedSharding
from fkv_jax.attention.reference import selection_attention
from fkv_jax.kernels.testing import random_problem, relative_error
from fkv_jax.parallel import sharded_attention
from fkv_jax.parallel.attention import CACHE
from fkv_jax.parallel.shardings import HEADS
args, sel = random_problem(rng, b=2, c=3, t=8, h=4, d=16, n=5, k=3, qf=3, m=6)
args = [jax.device_put(a, NamedSharding(mesh, spec)) for a, spec in zip(args, [HEADS] * 3 + [CACHE] * 2)]
kernel_out = jax.jit(sharded_attention(mesh, "pallas_tpu", interpret=True))(*args, sel)
out["kernel"] = {"rel": relative_error(kernel_out, jax.jit(selection_attention)(*args, sel)),
                 "spec": str(kernel_out.sharding.spec)}

# the donated cache keeps its sharding from chunk to chunk
p = s.shard_params(params)
ctx_kv = s.context_kv(p, context)
cache, state = s.init_cache(), s.init_state()
specs, donated = [str(cache["k"].sharding.spec)], []
n = s.schedule.num_steps
for blk in range(2):
    x = noise[:, 3 * blk:3 * blk + 3]
    eps = rng.standard_normal((n - 1, *x.shape)).astype(np.float32)
    res, new_cache, state = s.chunk_step(p, cache, state, ctx_kv, x, eps, np.int32(3 * blk))
    donated.append(cache["k"].is_deleted())
    cache = new_cache
    specs.append(str(cache["k"].sharding.spec))
out["chunks"] = {"specs": specs, "donated": donated, "ctx_spec": str(ctx_kv[0].sharding.spec),
                 "param_spec": str(p["blocks"]["self_attn"]["q"]["kernel"].sharding.spec),
                 "x0_spec": str(res.x0.sharding.spec)}
print(json.dumps(out))
"""

CACHE_SPEC = str(P(None, "data", "model", None, None, None))  # [L, B, H, N, T, Dh]


@pytest.fixture(scope="module")
def run8():
    env = dict(
        os.environ,
        XLA_FLAGS="--xla_force_host_platform_device_count=8",
        JAX_PLATFORMS="cpu",
        PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    )
    r = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_sharded_rollout_equals_single_device(run8):
    assert run8["devices"] == 8
    res = run8["rollout"]
    assert res["rel"] <= 1e-5
    assert res["traces"] == 1  # one compiled step for every chunk
    assert res["spec"] == CACHE_SPEC


def test_kernel_under_shard_map_equals_reference(run8):
    assert run8["kernel"]["rel"] <= 1e-5
    assert run8["kernel"]["spec"] == str(P("data", None, "model", None))


def test_donated_cache_keeps_its_sharding(run8):
    chunks = run8["chunks"]
    assert chunks["specs"] == [CACHE_SPEC] * 3
    assert chunks["donated"] == [True, True]
    assert chunks["ctx_spec"] == str(P(None, "data", None, "model", None))
    assert chunks["param_spec"] == str(P(None, None, "model"))
    assert chunks["x0_spec"] == str(P("data", None, None, None, None))


def test_mesh_spec_parser():
    assert parse_mesh_spec("data=2,model=4", 8) == {"data": 2, "model": 4}
    assert parse_mesh_spec("model=-1", 8) == {"data": 1, "model": 8}
    assert parse_mesh_spec("data=-1, model=2", 8) == {"data": 4, "model": 2}
    for bad in ("data=3,model=4", "heads=2", "data=2,data=4", "data=x", "data=-1,model=-1", "data=0"):
        with pytest.raises(ValueError):
            parse_mesh_spec(bad, 8)


def test_param_specs():
    assert param_spec(("blocks", "self_attn", "q", "kernel"), 3) == P(None, None, "model")
    assert param_spec(("blocks", "cross_attn", "v", "bias"), 2) == P(None, "model")
    assert param_spec(("blocks", "self_attn", "norm_k", "scale"), 2) == P(None, "model")
    assert param_spec(("blocks", "cross_attn", "o", "kernel"), 3) == P(None, "model", None)
    assert param_spec(("blocks", "cross_attn", "o", "bias"), 2) == P()
    assert param_spec(("blocks", "ffn", "fc1", "kernel"), 3) == P(None, None, "model")
    assert param_spec(("blocks", "ffn", "fc2", "kernel"), 3) == P(None, "model", None)
    assert param_spec(("blocks", "ffn", "fc2", "bias"), 2) == P()
    assert param_spec(("blocks", "modulation"), 3) == P()
    assert param_spec(("head", "head", "kernel"), 2) == P()
    assert param_spec(("patch_embedding", "kernel"), 2) == P()
