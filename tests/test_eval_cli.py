"""The evaluation CLI end to end on a tiny setting (a toy-architecture model with untrained weights)."""

import pytest
import json

from fkv_jax.eval.__main__ import main

pytestmark = pytest.mark.slow


def test_eval_cli_tiny(random_toy_weights, tmp_path, capsys):
    out = tmp_path / "eval"
    vb = tmp_path / "vbench"
    assert (
        main(
            [
                "--weights",
                str(random_toy_weights),
                "--frames",
                "9",
                "--episodes",
                "1",
                "--policies",
                "sink_window",
                "--output-dir",
                str(out),
                "--vbench-dir",
                str(vb),
            ]
        )
        == 0
    )
    report = json.loads((out / "eval.json").read_text())
    assert set(report["policies"]) == {"full", "sink_window"}
    row = report["policies"]["sink_window"]
    for key in (
        "denoise_fps",
        "e2e_fps",
        "kv_mib",
        "psnr_vs_full",
        "ssim_vs_full",
        "position_error_px",
        "colour_shown",
        "identity_after_occlusion",
        "chunk_discontinuity",
        "worst_gt_degradation",
    ):
        assert key in row
    assert report["policies"]["full"]["speedup"] == 1.0
    md = (out / "eval.md").read_text()
    assert "| sink_window |" in md and "Peak RSS of the whole run" in md and row["peak_rss_mib"] > 0
    assert (out / "frontier.png").is_file() or (out / "PLOTS_SKIPPED.txt").is_file()
    stdout = capsys.readouterr().out
    assert f"to {out}/: " in stdout and "eval.json" in stdout and "eval.md" in stdout  # says where it wrote
    assert "columns: denoise FPS = " in stdout and "pos err px = " in stdout  # a legend for the table
    videos = sorted(p.name for p in (vb / "sink_window").iterdir())
    assert len(videos) == 1 and videos[0].endswith("-0.mp4")


def test_eval_cli_bad_lengths(random_toy_weights, tmp_path, capsys):
    assert (
        main(
            [
                "--weights",
                str(random_toy_weights),
                "--frames",
                "10",
                "--policies",
                "sink_window",
                "--output-dir",
                str(tmp_path),
                "--no-plots",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "multiples of 3" in err and err.startswith("error: ")


def test_toy_samples_bench_runs(random_toy_weights, capsys):
    from fkv_jax.bench.toy_samples import main as bench_main

    assert (
        bench_main(
            [
                "--weights",
                str(random_toy_weights),
                "--episodes",
                "2",
                "--frames",
                "6",
                "--samplers",
                "default",
                "renoise8",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    real = next(ln for ln in out.splitlines() if ln.startswith("| real episodes"))
    assert float(real.split("|")[2]) > 0.3  # the simulator's own frames show their prompted colours
    assert "shape (blobs)" in out and real.count("|") == 8
    assert "| model, sampler default |" in out and "| model, sampler renoise8 |" in out


def test_eval_cli_memory_family(random_toy_weights, tmp_path, capsys):
    """The memory family with a short window: the report carries the reappearance and tracking metrics with
    bootstrap intervals, and the window length reaches the policy (its resident KV is smaller)."""
    out = tmp_path / "mem"
    args = ["--weights", str(random_toy_weights), "--family", "memory", "--policies", "window", "--window", "3"]
    args += ["--frames", "24", "--context-frames", "3", "--min-hidden", "4", "--episodes", "2"]
    args += ["--output-dir", str(out), "--no-plots"]
    assert main(args) == 0
    report = json.loads((out / "eval.json").read_text())
    assert report["family"] == "memory" and report["min_hidden"] == 4 and report["window"] == 3
    rows = report["policies"]
    assert rows["window"]["kv_mib"] < rows["full"]["kv_mib"] / 4  # 3 of 24 frames
    for key in ("reappear_identity", "reappear_position_px", "track_24_px"):
        assert key in rows["full"] and key in rows["full"]["ci95"]
    md = (out / "eval.md").read_text()
    assert "95 % bootstrap CI over 2 episode(s)" in md and "hidden >= 4 frames; `window` keeps 3 frames" in md


def test_eval_cli_memory_family_too_short(random_toy_weights, tmp_path, capsys):
    """A length that cannot hold a memory episode with that --min-hidden: one error line naming both."""
    args = ["--weights", str(random_toy_weights), "--family", "memory", "--frames", "24", "--min-hidden", "8"]
    assert main(args + ["--policies", "window", "--output-dir", str(tmp_path / "o"), "--no-plots"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "min_hidden 8" in err and "\n" not in err


def test_eval_cli_window_needs_the_window_policy(random_toy_weights, tmp_path, capsys):
    args = ["--weights", str(random_toy_weights), "--window", "6", "--policies", "sink_window"]
    assert main(args + ["--output-dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --window") and not (tmp_path / "o").exists()
