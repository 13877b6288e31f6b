"""``python -m fkv_jax.bench.attention``: clean exit without an accelerator, CPU smoke mode, chip table."""

import pytest
import jax.numpy as jnp
import numpy as np

from fkv_jax.bench import attention as bench

pytestmark = pytest.mark.kernels


def test_without_accelerator_says_so_and_exits_zero(capsys):
    assert bench.main([]) == 0
    out = capsys.readouterr().out
    assert "needs an accelerator" in out and "Nothing was measured" in out


def test_cpu_smoke_runs_xla_and_dense(capsys):
    assert bench.main(["--cpu-smoke"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.split()[:1] in (["1"], ["3"])]
    assert sorted({(r[0], r[2]) for r in rows}) == [("1", "dense"), ("1", "xla"), ("3", "dense"), ("3", "xla")]
    assert all(float(r[-1]) <= 1e-5 for r in rows)  # dense over the gathered keys = the reference


def test_chip_table():
    assert bench.chip_limits("NVIDIA H100 80GB HBM3") == (989.4, 3.35)
    assert bench.chip_limits("NVIDIA H100 PCIe") == (756.0, 2.0)
    assert bench.chip_limits("NVIDIA H200") == (989.4, 4.8)
    assert bench.chip_limits("TPU v5 lite") == (197.0, 0.819)
    assert bench.chip_limits("cpu") is None


def test_work_counts_every_key_once():
    args, sel = bench.make_inputs(np.random.default_rng(0), b=1, c=3, t=10, h=2, d=8, n=5, k=2, qf=3, dtype=jnp.float32)
    flops, nbytes = bench.work(args, sel)
    keys = 3 * 10 + 2 * 10
    assert flops == 4 * 2 * 30 * keys * 8
    assert nbytes == (2 * 30 * 2 * 8 + 2 * 3 * keys * 2 * 8) * 4


def test_attention_share_stamps_every_call_and_splits_each_block(capsys):
    """``bench.attention_share`` on the tiny preset: every attention call of a block is stamped (layers x
    (steps + clean pass)), the stamped wrapper returns what the backend returns, and attention is a part
    of each block's time."""
    from fkv_jax.attention.reference import selection_attention
    from fkv_jax.bench import attention_share

    stamps = []
    args, sel = bench.make_inputs(np.random.default_rng(1), b=1, c=3, t=10, h=2, d=8, n=5, k=2, qf=1, dtype=jnp.float32)
    out = attention_share.stamped(selection_attention, stamps)(*args, sel)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(selection_attention(*args, sel)))
    assert len(stamps) == 2 and stamps[0] <= stamps[1]

    assert (
        attention_share.main(["--model", "tiny", "--frames", "6", "--rounds", "1", "--attention-backend", "xla"]) == 0
    )
    text = capsys.readouterr().out
    assert "backend xla -> xla; 10 attention calls per block" in text  # 2 layers x (4 steps + clean pass)
    rows = [line.split() for line in text.splitlines() if line.strip()[:1].isdigit()]
    assert [r[0] for r in rows] == ["1", "2"]
    for r in rows:
        total, attn, rest = float(r[2]), float(r[3]), float(r[6])
        assert 0 < attn < total and rest > 0
