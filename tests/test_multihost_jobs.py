"""Batch jobs and the multi-process flags without a cluster: file names, the manifest, what a rerun skips, bad
flags as one error line, the local launcher naming a failed process."""

from __future__ import annotations

import json
import sys
import time

import pytest

from fkv_jax import jobs as J
from fkv_jax.cli.generate import main as generate_main


def test_names_fresh_and_resume(tmp_path):
    (tmp_path / "000_a-red-circle_seed0.mp4").write_bytes(b"old")
    fresh = J.plan(["a red circle", "A red circle"], [0, 1], tmp_path)
    assert [v.path.name for v in fresh] == [
        "000_a-red-circle_seed0-2.mp4",  # never overwrites
        "000_a-red-circle_seed1.mp4",
        "001_a-red-circle_seed0.mp4",
        "001_a-red-circle_seed1.mp4",
    ]
    resume = J.plan(["a red circle", "A red circle"], [0, 1], tmp_path, resume=True)
    assert resume[0].path.name == "000_a-red-circle_seed0.mp4"  # found again by a rerun
    assert [(v.index, v.prompt, v.seed) for v in resume][-1] == (3, "A red circle", 1)


def test_manifest_decides_what_is_done(tmp_path):
    videos = J.plan(["a", "b", "c"], [0], tmp_path, resume=True)
    for v in videos[:2]:
        v.path.write_bytes(b"x" * 10)
    entries = [J.entry(v, tmp_path, policy=None, batch=0, process=0, seconds=1.0) for v in videos[:2]]
    J.write_manifest(tmp_path / "manifest.jsonl", entries)
    assert not list(tmp_path.glob(".manifest*"))  # the temp file is gone
    back = J.read_manifest(tmp_path / "manifest.jsonl")
    assert back == entries and back[0]["file"] == "000_a_seed0.mp4" and back[0]["bytes"] == 10
    assert [v.index for v in J.todo(videos, back, tmp_path)] == [2]
    videos[1].path.write_bytes(b"x" * 4)  # truncated since: not done
    (tmp_path / "manifest.jsonl").write_text("\n".join(json.dumps(e) for e in back))
    assert [v.index for v in J.todo(videos, back, tmp_path)] == [1, 2]
    other = J.plan(["a", "b", "c"], [7], tmp_path, resume=True)  # another seed: other files, nothing done
    assert len(J.todo(other, back, tmp_path)) == 3
    assert J.merge(back, [dict(back[0], seconds=2.0)])[0]["seconds"] == 2.0
    (tmp_path / "bad.jsonl").write_text('{"file": "a.mp4"}\nnot json\n')
    with pytest.raises(J.ManifestError, match="line 2"):
        J.read_manifest(tmp_path / "bad.jsonl")


def test_batches_are_fixed_and_padded():
    videos = J.plan(list("abcde"), [0], "out", resume=True)
    groups = J.batches(videos, 2)
    assert [len(g) for g in groups] == [2, 2, 1]
    assert [v.prompt for v in J.padded(groups[-1], 2)] == ["e", "e"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--coordinator", "localhost", "--num-processes", "2", "--process-id", "0"], "must be HOST:PORT"),
        (["--coordinator", "127.0.0.1:9", "--num-processes", "2"], "go together"),
        (["--coordinator", "127.0.0.1:9", "--num-processes", "2", "--process-id", "2"], "--process-id must be in"),
        (["--distributed", "--coordinator", "127.0.0.1:9", "--num-processes", "2", "--process-id", "0"], "drop it"),
        (["--local-processes", "0"], "--local-processes must be >= 1"),
        (["--local-processes", "2", "--distributed"], "starts the processes itself"),
        (["--peer-timeout", "0"], "--peer-timeout must be >= 1"),
        (["--model-preset", "tiny", "--resume"], "batch jobs write mp4s"),
        (["--batch-size", "0"], "--batch-size must be >= 1"),
    ],
)
def test_bad_multiprocess_flags_are_one_line(tmp_path, capsys, argv, message):
    assert generate_main([*argv, "--output-dir", str(tmp_path / "o"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "o").exists()


def test_bad_manifest_is_an_error_before_any_work(tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "manifest.jsonl").write_text("{broken\n")
    assert generate_main(["--resume", "--frames", "3", "--output-dir", str(out), "--no-progress"]) == 2
    assert "manifest.jsonl line 1 is not JSON" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["manifest.jsonl"]


@pytest.mark.subprocess
def test_local_launcher_names_the_failed_process_and_stops_the_others(capsys):
    from fkv_jax.distributed import launch_local

    child = (
        "import sys, time\n"
        "i = int(sys.argv[sys.argv.index('--process-id') + 1])\n"
        "time.sleep(0.3) if i == 1 else time.sleep(60)\n"
        "sys.exit(3)\n"
    )
    t0 = time.monotonic()
    assert launch_local([sys.executable, "-c", child], 2) == 3
    assert time.monotonic() - t0 < 30  # process 0 (sleeping 60 s) was stopped
    err = capsys.readouterr().err
    assert "error: process 1 of 2" in err and "exit code 3" in err and "stopping the others" in err
