"""mp4 writing: H.264 / yuv420p / 16 fps, frames appended batch by batch, a valid file after an interruption."""

from __future__ import annotations

import numpy as np
import pytest

from fkv_jax.video import VideoError, VideoWriter, check_output_folder, read_video, to_uint8, write_video


def frames(t, h=32, w=48, seed=0):
    x = np.linspace(-1, 1, w)[None, None, :, None] * np.ones((t, h, 1, 3))
    return (x + 0.1 * np.random.default_rng(seed).standard_normal((t, h, w, 3))).astype(np.float32)


def test_written_in_batches_reads_back(tmp_path):
    path = tmp_path / "v.mp4"
    with VideoWriter(path) as w:
        w.write(frames(1))
        w.write(frames(4, seed=1))
        w.write(frames(4, seed=2))
    got, meta = read_video(path)
    assert got.shape == (9, 32, 48, 3) and got.dtype == np.uint8
    assert meta["fps"] == 16 and meta["codec"] == "h264" and meta["pix_fmt"].startswith("yuv420p")
    # a left-to-right ramp survives compression
    assert np.abs(got.mean(axis=(0, 1, 3)) - to_uint8(frames(1)).mean(axis=(0, 1, 3))).mean() < 6


def test_interrupted_writer_leaves_a_playable_file(tmp_path):
    path = tmp_path / "v.mp4"
    with pytest.raises(KeyboardInterrupt):
        with VideoWriter(path, fps=8) as w:
            w.write(frames(5))
            w.write(frames(4))
            raise KeyboardInterrupt
    got, meta = read_video(path)
    assert got.shape[0] == 9 and meta["fps"] == 8


def test_bad_input(tmp_path):
    with pytest.raises(VideoError, match="even frame size"):
        VideoWriter(tmp_path / "odd.mp4").write(frames(1, h=33))
    w = VideoWriter(tmp_path / "a.mp4")
    w.write(frames(1))
    with pytest.raises(ValueError, match="frame size changed"):
        w.write(frames(1, w=64))
    w.close()
    (tmp_path / "file").write_text("x")
    with pytest.raises(VideoError, match="cannot create output folder"):
        check_output_folder(tmp_path / "file" / "sub")
    assert to_uint8(np.array([-2.0, -1.0, 0.0, 1.0])).tolist() == [0, 0, 128, 255]
    assert write_video(tmp_path / "b.mp4", frames(2)).is_file()
