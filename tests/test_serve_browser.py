"""``fkv serve`` as a real server process: a headless Chromium (the OS package, driven by playwright) uses the
page, and a bounded load test runs 8 concurrent WebSocket clients on loopback.

The server runs the toy model with its default (16-step) sampler and is started once for the module, with
--warmup, so the chunk step compiles once. Videos are 3-4 chunks (9-12 frames) to keep the module near 30 s.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from fkv_jax.toyworld.weights import load_config

pytestmark = pytest.mark.subprocess

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def server():
    """``python -m fkv_jax.serve --port 0 --warmup``; yields its base URL, stops it after the module."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.setdefault("FKV_JAX_CACHE_DIR", str(Path(tempfile.gettempdir()) / "fkv_jax_test_xla_cache"))
    cmd = [sys.executable, "-m", "fkv_jax.serve", "--port", "0", "--warmup", "--frames", "9", "--gather-ms", "400"]
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    lines: list[str] = []
    found = threading.Event()

    def read():
        for line in proc.stderr:
            lines.append(line)
            if "open http://" in line:
                found.set()

    threading.Thread(target=read, daemon=True).start()
    try:
        if not found.wait(180):
            pytest.fail("the server did not start:\n" + "".join(lines[-20:]))
        url = re.search(r"open (http://\S+/)", "".join(lines)).group(1)
        yield url.rstrip("/")
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert "Traceback" not in "".join(lines), "".join(lines[-40:])


def _stats(url: str) -> dict:
    from fkv_jax.serve.loadtest import get_json

    return get_json(url + "/api/stats")


def _text(page, sel: str) -> str:
    return page.inner_text(sel).strip()


def test_browser_stream_switch_meters_download(server, tmp_path):
    if CHROMIUM is None:
        pytest.skip("no chromium on this machine (apt-get install chromium; .ci/run installs it)")
    playwright = pytest.importorskip("playwright.sync_api", reason="playwright (the test extra) is not installed")
    from fkv_jax.video import read_video

    with playwright.sync_playwright() as p:
        ctx = p.chromium.launch_persistent_context(
            str(tmp_path / "profile"),
            executable_path=CHROMIUM,
            headless=True,
            args=CHROMIUM_ARGS,
            accept_downloads=True,
            viewport={"width": 1400, "height": 900},
        )
        try:
            page = ctx.new_page()
            page.goto(server + "/")
            page.wait_for_function("document.getElementById('preset').options.length > 0")
            assert page.input_value("#prompt") == "a red circle and a blue square"

            # bad input: one line in the page, the connection and the server carry on
            page.fill("#prompt", "a purple dog")
            page.click("#start")
            page.wait_for_function("document.getElementById('error').textContent.length > 0")
            err = _text(page, "#error")
            assert "outside the toy vocabulary" in err and "Traceback" not in err

            page.fill("#prompt", "a red circle and a blue square")
            page.fill("#frames", "12")
            page.fill("#fps", "12")
            page.click("#start")
            got3 = "Number(document.getElementById('frames_received').textContent) >= 3"
            page.wait_for_function(got3, timeout=90_000)
            assert _text(page, "#error") == ""
            first_latency = _text(page, "#m_chunk_ms")
            assert first_latency.endswith("ms") and _text(page, "#m_keys") != "–"
            assert float(_text(page, "#m_denoise_fps")) > 0 and "iB" in _text(page, "#m_kv")
            before = int(_text(page, "#frames_received"))

            page.fill("#switch_prompt", "a green cross")
            page.click("#switch")
            page.wait_for_function("document.getElementById('log').textContent.includes('prompt switched')")
            assert "KV re-cache" in _text(page, "#log")
            page.wait_for_function(
                f"Number(document.getElementById('frames_received').textContent) > {before}", timeout=60_000
            )
            page.screenshot(path=str(tmp_path / "serve_mid_stream.png"))
            page.wait_for_function("document.getElementById('download').style.display === ''", timeout=60_000)
            assert _text(page, "#frames_received") == "12"
            assert _text(page, "#m_chunks") == "4 / 4"
            assert int(_text(page, "#frames_shown")) >= 1  # the player draws at the playback FPS
            assert "finished: 12 frames" in _text(page, "#status")
            page.screenshot(path=str(tmp_path / "serve_done.png"), full_page=True)
            with page.expect_download() as dl:
                page.click("#download")
            mp4 = tmp_path / "video.mp4"
            dl.value.save_as(mp4)

            # stop mid-stream: the video so far is kept and offered
            page.fill("#frames", "24")
            page.click("#start")
            page.wait_for_function("Number(document.getElementById('frames_received').textContent) >= 3")
            page.click("#stop")
            page.wait_for_function("document.getElementById('status').textContent.startsWith('stopped')")
            stopped_at = int(_text(page, "#status").split()[1])
            assert 3 <= stopped_at < 24 and stopped_at % 3 == 0
            assert _text(page, "#download") == f"Download mp4 ({stopped_at} frames)"
        finally:
            ctx.close()
    frames, meta = read_video(mp4)
    h, w = load_config().latent_hw
    assert frames.shape == (12, 8 * h, 8 * w, 3)  # 12 frames of the toy model, upscaled x8
    assert (tmp_path / "serve_mid_stream.png").stat().st_size > 10_000


def test_protocol_errors_keep_the_connection(server):
    """Malformed or out-of-order messages get one error line each; the same socket then streams normally."""
    import json

    import websockets

    async def talk():
        async with websockets.connect(server.replace("http", "ws") + "/ws", max_size=None) as ws:
            replies = []
            for text in ("not json", json.dumps({"type": "dance"}), json.dumps({"type": "switch", "prompt": "a"})):
                await ws.send(text)
                replies.append(json.loads(await ws.recv()))
            await ws.send(json.dumps({"type": "start", "prompt": "a red circle", "frames": 3}))
            while (m := json.loads(await ws.recv()))["type"] not in ("done", "error"):
                pass
            return replies, m

    replies, last = asyncio.run(talk())
    assert [r["type"] for r in replies] == ["error"] * 3
    assert "not JSON" in replies[0]["message"] and "unknown message type 'dance'" in replies[1]["message"]
    assert "no stream is running" in replies[2]["message"]
    assert last["type"] == "done" and last["frames"] == 3


def test_load_eight_clients_some_leaving(server, tmp_path):
    """8 concurrent clients; 2 close their socket after their first chunk and 1 while it waits in the queue: every
    other client gets its whole video (all 9 frames, an mp4 of 9 frames), nothing stays alive, RSS comes back.

    RSS: the baseline is taken after a first identical round (compiled code, allocator arenas and the thread
    pool are then in place); after a second round RSS must stay within 48 MiB of it. A leaked batch (KV cache,
    state, frames: ~5 MiB here) per round would show in ``live_arrays`` / ``live_streams`` exactly; the RSS
    bound catches larger leaks without failing on the allocator's noise (a few MiB between rounds measured)."""
    from fkv_jax.serve.loadtest import mp4_frames, run_load

    reports = []
    for _ in range(2):
        rep = asyncio.run(run_load(server, clients=8, disconnect=2, leave_queued=1, frames=9, timeout=120))
        deadline = time.monotonic() + 10
        while (st := _stats(server))["batch_rows"] or st["queued"]:  # the last batch notices its leavers
            assert time.monotonic() < deadline, st
            time.sleep(0.1)
        reports.append((rep, _stats(server)))
    (rep1, base), (rep2, after) = reports
    for rep in (rep1, rep2):
        assert rep["errors"] == [] and rep["left_early"] == 3  # 2 mid-stream, 1 while queued
        assert rep["complete"] == 5, [(r.index, r.frames, r.done) for r in rep["results"]]
        assert rep["max_queue_position"] >= 2  # more clients than one batch: some waited, and were told
    for r in rep2["results"]:
        if not r.left_early:
            assert mp4_frames(server + r.video, tmp_path) == 9
    assert after["live_streams"] == 0 and after["queued"] == 0 and after["batch_rows"] == 0
    assert after["live_arrays"] == base["live_arrays"]  # no device buffer outlives its batch
    grow = (after["rss_bytes"] - base["rss_bytes"]) / 2**20
    print(
        "\nload: 8 clients (2 leave after 1 chunk, 1 while queued), 9 frames each: "
        f"p50 chunk {rep2['p50_chunk_ms']:.0f} ms, "
        f"p95 chunk {rep2['p95_chunk_ms']:.0f} ms, p95 gap {rep2['p95_gap_ms']:.0f} ms, wall {rep2['wall_s']} s; "
        f"RSS {base['rss_bytes'] / 2**20:.0f} -> {after['rss_bytes'] / 2**20:.0f} MiB ({grow:+.1f})"
    )
    assert grow < 48, f"server RSS grew by {grow:.1f} MiB over a second round"
    assert rep2["p95_chunk_ms"] is not None and rep2["p95_chunk_ms"] > 0
