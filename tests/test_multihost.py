"""Multi-process generation with real processes on loopback: each process forces its own CPU devices and joins
JAX's distributed runtime (gloo collectives) through :mod:`fkv_jax.distributed`.

* the sharded multi-process rollout equals the single-process one on the shared tiny fixture, with prompts over
  ``data`` and heads over ``model`` across processes (2 and 4 processes);
* a 2-process toy job: killing one process mid-run makes the other exit non-zero naming it, within the bound;
  a rerun with ``--resume`` (the local launcher) completes only the missing videos; one manifest lists all 8.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from helpers import CHECKPOINT_PT

pytestmark = pytest.mark.subprocess

ROOT = Path(__file__).resolve().parents[1]
FRAMES, BATCH = 6, 4

ROLLOUT = """
import dataclasses
import sys
from pathlib import Path

import numpy as np

from fkv_jax.distributed import ClusterSpec, gather_rows, session

coordinator, n, i, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])
with session(ClusterSpec(coordinator, n, i, peer_timeout=20)) as rt:
    from flax import nnx

    import fkv_jax
    from fkv_jax.model.build import abstract_model
    from fkv_jax.parallel import ShardedSampler, make_mesh

    cfg = dataclasses.replace(fkv_jax.model_preset("tiny"), num_layers=2)
    graphdef, params = nnx.split(abstract_model(cfg), nnx.Param)
    with np.load(out / "inputs.npz") as z:  # the fixture's weights and the inputs, from the test process
        arrays = dict(z)
    nested = {{}}
    for key, value in arrays.items():
        if key.startswith("param/"):
            *parents, leaf = key.split("/")[1:]
            d = nested
            for p in parents:
                d = d.setdefault(int(p) if p.isdigit() else p, {{}})
            d[int(leaf) if leaf.isdigit() else leaf] = value
    nnx.replace_by_pure_dict(params, nested)
    for spec in sys.argv[5:]:
        s = ShardedSampler(graphdef, cfg, fkv_jax.sampler_preset("self_forcing"), mesh=make_mesh(spec),
                           batch={b}, latent_hw=cfg.latent_hw, num_frames={f})
        lat = fkv_jax.rollout(s, s.shard_params(params), [arrays["context"]], arrays["noise"]).latents
        local = np.isfinite(lat).all(axis=(1, 2, 3, 4))  # the rows this process holds
        full = gather_rows(lat, s.shardings.chunk)
        tag = spec.replace("=", "").replace(",", "_")
        if rt.is_main:
            np.save(out / (tag + ".npy"), full)
        np.save(out / f"rows_{{tag}}_{{i}}.npy", local)
"""


def _env(devices: int) -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    env.setdefault("FKV_JAX_CACHE_DIR", str(Path(__import__("tempfile").gettempdir()) / "fkv_jax_test_xla_cache"))
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _launch(argv_of, n: int, env: dict, cwd: Path, timeout: float = 240):
    """Start processes 0 .. n-1 (``argv_of(coordinator, i)``) and wait for all; returns their results."""
    from fkv_jax.distributed import free_port

    coordinator = f"127.0.0.1:{free_port()}"
    procs = [
        subprocess.Popen(
            argv_of(coordinator, i), env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for i in range(n)
    ]
    outs = [p.communicate(timeout=timeout) for p in procs]
    return [(p.returncode, o, e) for p, (o, e) in zip(procs, outs)]


@pytest.fixture(scope="module")
def reference():
    """The single-process rollout of the fixture (this process, one device), and the arrays the processes get."""
    from flax import nnx

    import fkv_jax
    from helpers import load_tiny

    cfg, graphdef, params = load_tiny(CHECKPOINT_PT, 2)
    rng = np.random.default_rng(0)
    context = rng.standard_normal((BATCH, cfg.text_len, cfg.text_dim)).astype(np.float32)
    noise = rng.standard_normal((BATCH, FRAMES, cfg.in_dim, *cfg.latent_hw)).astype(np.float32)
    s = fkv_jax.Sampler(
        graphdef, cfg, fkv_jax.sampler_preset("self_forcing"), batch=BATCH, latent_hw=cfg.latent_hw, num_frames=FRAMES
    )
    arrays = {"context": context, "noise": noise}

    def flatten(d, prefix):
        for k, v in d.items():
            if isinstance(v, dict):
                flatten(v, f"{prefix}/{k}")
            else:
                arrays[f"{prefix}/{k}"] = np.asarray(v)

    flatten(nnx.to_pure_dict(params), "param")  # children skip torch: the weights as plain arrays
    return fkv_jax.rollout(s, params, [context], noise).latents, arrays


@pytest.mark.parametrize(
    "processes, specs",
    [
        (2, ["model=2"]),  # heads over model across 2 processes (prompts over data: the toy job below)
        (4, ["data=2,model=2"]),  # both at once: each data row spans 2 processes' model shards
    ],
)
def test_multiprocess_rollout_equals_single_process(tmp_path, reference, processes, specs):
    reference, arrays = reference
    np.savez(tmp_path / "inputs.npz", **arrays)
    script = tmp_path / "rollout.py"
    script.write_text(ROLLOUT.format(b=BATCH, f=FRAMES))
    results = _launch(
        lambda c, i: [sys.executable, str(script), c, str(processes), str(i), str(tmp_path), *specs],
        processes,
        _env(1),
        tmp_path,
    )
    for i, (code, _, err) in enumerate(results):
        assert code == 0, f"process {i}: {err[-3000:]}"
    for spec in specs:
        tag = spec.replace("=", "").replace(",", "_")
        full = np.load(tmp_path / f"{tag}.npy")
        err = float(np.abs(full - reference).max())
        assert err <= 1e-5, (spec, err)
        # every row is held by someone; with data=D each process holds B/D rows (heads split: all rows)
        held = np.stack([np.load(tmp_path / f"rows_{tag}_{i}.npy") for i in range(processes)])
        assert held.any(axis=0).all()
        data = dict(kv.split("=") for kv in spec.split(",")).get("data", "1")
        assert (held.sum(axis=1) == BATCH // int(data)).all(), held


def _toy(out: Path, prompts: Path, *extra) -> list[str]:
    return [
        sys.executable,
        "-m",
        "fkv_jax.generate",
        "--prompts",
        str(prompts),
        "--frames",
        "6",
        "--batch-size",
        "2",
        "--output-dir",
        str(out),
        "--resume",
        "--no-progress",
        *extra,
    ]


PROMPTS = [
    "a red circle",
    "a blue square",
    "a green cross",
    "a yellow triangle",
    "a red square",
    "a cyan circle",
    "a magenta cross",
    "a blue circle",
]


def test_killed_process_stops_the_job_and_a_rerun_finishes_only_the_rest(tmp_path):
    from fkv_jax.distributed import free_port
    from fkv_jax.video import read_video

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    out, manifest = tmp_path / "videos", tmp_path / "videos" / "manifest.jsonl"
    env = _env(1)
    coordinator = f"127.0.0.1:{free_port()}"
    argv = _toy(out, prompts, "--peer-timeout", "5", "--coordinator", coordinator, "--num-processes", "2")
    procs = [
        subprocess.Popen(
            [*argv, "--process-id", str(i)], env=env, cwd=tmp_path, stderr=subprocess.PIPE, text=True, stdout=None
        )
        for i in range(2)
    ]
    try:
        deadline = time.monotonic() + 180
        while not (manifest.is_file() and manifest.read_text().count("\n") >= 2):  # the first batch is done
            assert time.monotonic() < deadline, "no batch finished"
            assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
            time.sleep(0.1)
        procs[1].kill()
        killed = time.monotonic()
        _, err = procs[0].communicate(timeout=60)
        took = time.monotonic() - killed
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert procs[0].returncode != 0 and took < 60, (procs[0].returncode, took)
    assert "error: process 1 of 2 stopped responding" in err, err[-2000:]
    first = [json.loads(x) for x in manifest.read_text().splitlines()]
    assert 2 <= len(first) < 8

    # the rerun (the local launcher, one command) makes only the missing videos; one manifest lists all 8
    r = subprocess.run(
        [*_toy(out, prompts), "--local-processes", "2"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resume: {len(first)} of 8 video(s) already complete" in r.stderr
    entries = [json.loads(x) for x in manifest.read_text().splitlines()]
    assert len(entries) == 8 and sorted(e["prompt"] for e in entries) == sorted(PROMPTS)
    by_file = {e["file"]: e for e in entries}
    for e in first:  # untouched: not generated again
        assert by_file[e["file"]] == e
    assert {e["process"] for e in entries} == {0, 1}
    for e in entries:
        assert set(e) >= {"prompt", "seed", "policy", "file", "seconds"}
        video, _ = read_video(out / e["file"])
        assert video.shape[0] == 6  # the toy model's latent frames are its video frames
        assert (out / e["file"]).stat().st_size == e["bytes"]
    assert sorted(p.name for p in out.glob("[0-9]*.mp4")) == sorted(by_file)  # nothing stray
