"""Sessions and the batch scheduler of ``fkv serve``: one worker thread runs the model, one batch at a time.

Rules (docs/serve.md):

* Streams wait in one FIFO queue. When the worker is free it takes the oldest stream and, after a short gather
  window (``gather_s``) for late arrivals, every other queued stream with the same :class:`Settings`, up to the
  fixed batch size; they run as one batch, padded to that size (so each settings compile exactly one chunk
  step). Other streams keep their place; every queued stream is told its position when it changes.
* The rows of a batch run in lockstep, chunk by chunk. Between two chunks the worker applies what the clients
  asked for meanwhile: a prompt switch (a LongLive KV re-cache of the switched rows), a stop or a disconnect
  (the row is dropped; when no row is left the batch ends early and its cache is freed).
* Memory is bounded: one batch of fixed size is resident, the queue holds at most ``max_queue`` streams, the
  engine keeps at most ``max_samplers`` compiled samplers, and at most ``keep_videos`` finished mp4 files.

The worker talks to a client only through ``stream.send(message)``, a thread-safe callable the web layer gives.
"""

from __future__ import annotations

import base64
import collections
import dataclasses
import io
import logging
import shutil
import tempfile
import threading
import time
import uuid
import weakref
from collections.abc import Callable
from pathlib import Path

import numpy as np

from fkv_jax.sampling.stream import kv_bytes
from fkv_jax.serve.meters import full_keys, keys_per_head
from fkv_jax.serve.protocol import EngineLike, Request, RequestError

log = logging.getLogger("fkv_jax.serve")


@dataclasses.dataclass(eq=False)
class Stream:
    """One client's video: its request and what the client asked for since the last chunk."""

    request: Request
    send: Callable[[dict], None]
    id: str = dataclasses.field(default_factory=lambda: uuid.uuid4().hex[:16])
    arrived: float = dataclasses.field(default_factory=time.monotonic)
    status: str = "new"  # new -> queued -> running -> done | stopped | cancelled | failed
    stop_requested: bool = False  # a stop: end at the next chunk boundary, keep the video so far
    disconnected: bool = False  # the client went away: end at the next chunk boundary, keep nothing
    pending_prompt: str | None = None  # a switch to apply before the next chunk

    @property
    def settings(self):
        return self.request.settings

    @property
    def finished(self) -> bool:
        return self.status in ("done", "stopped", "cancelled", "failed")


def encode_frame(frame: np.ndarray) -> str:
    """uint8 [H, W, 3] -> a data URL: PNG for small frames (the toy model's 24x24), JPEG for large ones."""
    from PIL import Image

    img = Image.fromarray(frame)
    buf = io.BytesIO()
    small = frame.shape[0] * frame.shape[1] <= 128 * 128
    img.save(buf, format="PNG" if small else "JPEG", quality=85)
    return f"data:image/{'png' if small else 'jpeg'};base64," + base64.b64encode(buf.getvalue()).decode("ascii")


class Scheduler:
    """The queue and the worker thread (see the module docstring)."""

    def __init__(
        self,
        engine: EngineLike,
        *,
        max_queue: int = 16,
        gather_s: float = 0.25,
        keep_videos: int = 32,
        video_dir: Path | None = None,
    ):
        self.engine, self.max_queue, self.gather_s, self.keep_videos = engine, max_queue, gather_s, keep_videos
        self._own_dir = video_dir is None
        self.video_dir = Path(tempfile.mkdtemp(prefix="fkv-serve-")) if video_dir is None else Path(video_dir)
        self._cv = threading.Condition()
        self._queue: collections.deque[Stream] = collections.deque()
        self._running: list[Stream] = []
        self._videos: collections.OrderedDict[str, Path] = collections.OrderedDict()
        self._thread: threading.Thread | None = None
        self._stop = False
        self._streams: weakref.WeakSet[Stream] = weakref.WeakSet()  # every stream still referenced anywhere
        self.latencies: collections.deque[float] = collections.deque(maxlen=4096)  # seconds per chunk
        self.chunks_done = 0

    # ---- lifecycle ---------------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="fkv-serve-worker", daemon=True)
        self._thread.start()

    def close(self) -> None:
        with self._cv:
            self._stop = True
            for s in self._queue:
                s.disconnected = True
            for s in self._running:
                s.disconnected = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=60)
        if self._own_dir:
            shutil.rmtree(self.video_dir, ignore_errors=True)

    # ---- client requests (any thread) --------------------------------------------------------------------
    def submit(self, stream: Stream) -> None:
        with self._cv:
            if len(self._queue) >= self.max_queue:
                raise RequestError(f"the server is busy: {len(self._queue)} streams are waiting; try again later")
            stream.status = "queued"
            self._streams.add(stream)
            self._queue.append(stream)
            self._announce_positions()
            self._cv.notify_all()

    def switch(self, stream: Stream, prompt: str) -> None:
        """Switch ``stream``'s prompt at its next chunk boundary (a queued stream just starts with it)."""
        with self._cv:
            if stream.status == "queued":
                stream.request = dataclasses.replace(stream.request, prompt=prompt)
                stream.send({"type": "switched", "frame": 0, "recache": False, "note": "not started yet"})
            elif stream.status == "running":
                stream.pending_prompt = prompt
            else:
                raise RequestError("no stream is running: start one first")

    def stop(self, stream: Stream, *, disconnected: bool = False) -> None:
        """Stop at the next chunk boundary (a queued stream leaves the queue now)."""
        with self._cv:
            if disconnected:
                stream.disconnected = True
            else:
                stream.stop_requested = True
            if stream.status == "queued":
                self._queue.remove(stream)
                stream.status = "cancelled" if disconnected else "stopped"
                if not disconnected:
                    stream.send({"type": "stopped", "frames": 0, "video": None})
                self._announce_positions()
            self._cv.notify_all()

    def video_path(self, name: str) -> Path | None:
        with self._cv:
            return self._videos.get(name)

    def stats(self) -> dict:
        """Counters for the page and the load test: what is queued / running / alive, chunk latency."""
        import gc

        import jax

        gc.collect()
        with self._cv:
            lat = sorted(self.latencies)
            return {
                "queued": len(self._queue),
                "running": sum(not (s.disconnected or s.stop_requested) for s in self._running),
                "batch_rows": len(self._running),
                "samplers": self.engine.num_streamers(),
                "videos": len(self._videos),
                "live_streams": len(self._streams),
                "live_arrays": len(jax.live_arrays()),
                "chunks": self.chunks_done,
                "p50_chunk_ms": 1e3 * lat[len(lat) // 2] if lat else None,
                "p95_chunk_ms": 1e3 * lat[min(len(lat) - 1, int(0.95 * len(lat)))] if lat else None,
            }

    def _announce_positions(self) -> None:  # under the lock
        running = len(self._running)
        for i, s in enumerate(self._queue):
            s.send({"type": "queued", "position": i + 1, "running": running})

    # ---- the worker --------------------------------------------------------------------------------------
    def _next_batch(self) -> list[Stream] | None:
        """Wait for work; the oldest stream plus the queued streams with its settings (after the gather window)."""
        with self._cv:
            while not self._queue and not self._stop:
                self._cv.wait()
            if self._stop:
                return None
            head = self._queue[0]
            wait = head.arrived + self.gather_s - time.monotonic()
            if wait > 0:
                self._cv.wait(wait)
            if self._stop or not self._queue:
                return None if self._stop else []
            head = self._queue[0]
            rows = [s for s in self._queue if s.settings == head.settings][: self.engine.cfg.max_batch]
            for s in rows:
                self._queue.remove(s)
                s.status = "running"
            self._running = rows
            self._announce_positions()
            return rows

    def _loop(self) -> None:
        while True:
            rows = self._next_batch()
            if rows is None:
                return
            if not rows:
                continue
            try:
                self._run_batch(rows)
            except Exception as e:  # noqa: BLE001 - the server keeps serving; the client gets one line
                log.exception("batch failed")
                for s in rows:
                    if not s.finished:
                        s.status = "failed"
                        s.send({"type": "error", "message": f"generation failed: {type(e).__name__}: {e}"})
            finally:
                with self._cv:
                    self._running = []
                    self._announce_positions()
                del rows  # nothing of a finished batch outlives it (its streams belong to their connections)

    def _run_batch(self, rows: list[Stream]) -> None:
        eng = self.engine
        settings = rows[0].settings
        streamer = eng.streamer(settings)
        sampler = streamer.sampler
        b, c, n = streamer.batch, streamer.frames_per_block, streamer.num_steps
        cfg = eng.model_cfg
        frames_total = settings.frames
        compiling = sampler.trace_count == 0
        pad = rows + [rows[0]] * (b - len(rows))  # fixed batch: padding rows repeat row 0 (their output is dropped)
        for i, s in enumerate(rows):
            s.send(
                {
                    "type": "started",
                    "row": i,
                    "batch": len(rows),
                    "batch_size": b,
                    "frames": frames_total,
                    "compiling": compiling,
                    "recache": streamer.can_recache,
                }
            )
        prompts = [s.request.prompt for s in pad]
        t_start = time.perf_counter()
        st = streamer.begin(eng.params, eng.context(prompts))
        shape = (cfg.in_dim, *eng.latent_hw)
        noise = np.concatenate(  # one draw per stream from its own seed: a video does not depend on its batch
            [np.random.default_rng(s.request.seed).standard_normal((1, frames_total, *shape), np.float32) for s in pad]
        )
        decode = eng.decoder()
        videos: list[list[np.ndarray]] = [[] for _ in rows]
        tpf = sampler.geom.tokens_per_frame
        done = [0] * len(rows)
        for blk in range(frames_total // c):
            with self._cv:
                live = [not (s.stop_requested or s.disconnected) for s in rows]
                switch = {i: s.pending_prompt for i, s in enumerate(rows) if s.pending_prompt is not None and live[i]}
                for s in rows:
                    s.pending_prompt = None
            if not any(live):
                break
            start = blk * c
            if switch:
                t0 = time.perf_counter()
                new_prompts = [switch.get(i, p) for i, p in enumerate(prompts)]
                mask = np.array([i in switch for i in range(b)])
                st, recached = streamer.switch(eng.params, st, eng.context(new_prompts), mask)
                prompts = new_prompts
                dt = time.perf_counter() - t0
                for i in switch:
                    rows[i].request = dataclasses.replace(rows[i].request, prompt=switch[i])
                    rows[i].send(
                        {
                            "type": "switched",
                            "frame": start,
                            "prompt": switch[i],
                            "recache": recached,
                            "ms": round(dt * 1e3, 1),
                            "note": "KV re-cache"
                            if recached
                            else (
                                "no KV re-cache: the re-cache needs the plain cache; only the text K/V changed"
                                if not streamer.can_recache
                                else "before the first chunk: nothing to re-cache"
                            ),
                        }
                    )
            visible = streamer.visible_frames(st) if sampler.policy.name != "key_meter" else None
            eps = np.concatenate(  # re-noise draws per row from (seed, chunk), like fkv generate --model-dir
                [
                    np.random.default_rng((s.request.seed, blk)).standard_normal((n - 1, 1, c, *shape), np.float32)
                    for s in pad
                ],
                axis=1,
            )
            t0 = time.perf_counter()
            out, st = streamer.step(eng.params, st, noise[:, start : start + c], eps)
            x0 = np.asarray(out.x0)  # waits for the step
            t_denoise = time.perf_counter() - t0
            pixels = decode(x0)  # uint8 [B, T, H, W, 3]
            full = (visible + c) * tpf if visible is not None else None
            full_ref = full_keys(sampler.sampler_cfg, tpf, start)
            heads = keys_per_head(out.select_aux, cfg.num_layers, cfg.num_heads, b)
            kvb = kv_bytes(st)
            for i, s in enumerate(rows):
                if not live[i]:
                    continue
                frames = [encode_frame(f) for f in pixels[i]]
                videos[i].append(pixels[i])
                done[i] += pixels.shape[1]
                latency = time.perf_counter() - t0
                if heads is not None:
                    keys, heat = float(heads[i].mean()), (heads[i] / full_ref).round(3).tolist()
                else:
                    keys, heat = float(full), None
                s.send(
                    {
                        "type": "chunk",
                        "index": blk,
                        "chunks": frames_total // c,
                        "start_frame": start,
                        "frames": frames,
                        "meters": {
                            "denoise_fps": round(c / t_denoise, 2),
                            "e2e_fps": round(done[i] / (time.perf_counter() - t_start), 2),
                            "chunk_ms": round(latency * 1e3, 1),
                            "kv_bytes": kvb // b,
                            "kv_bytes_batch": kvb,
                            "keys_per_query": round(keys, 1),
                            "full_keys_per_query": full_ref,
                            "saving": round(1 - keys / full_ref, 3),
                            "batch": len(rows),
                            "compiled": blk == 0 and compiling,
                        },
                        "heat": heat,
                    }
                )
            with self._cv:
                self.latencies.append(time.perf_counter() - t0)
                self.chunks_done += 1
        del st  # the cache and policy state of this batch go now
        for i, s in enumerate(rows):
            if s.disconnected:
                s.status = "cancelled"
                continue
            name = self._save_video(s, videos[i]) if videos[i] else None
            kind = "stopped" if s.stop_requested else "done"
            s.status = kind
            s.send({"type": kind, "frames": done[i], "video": f"/video/{name}" if name else None})

    def _save_video(self, s: Stream, chunks: list[np.ndarray]) -> str:
        from fkv_jax.video import write_video

        frames = np.concatenate(chunks)  # [T, H, W, 3] uint8
        k = self.engine.video_scale
        if k > 1:
            frames = frames.repeat(k, axis=1).repeat(k, axis=2)
        name = f"{s.id}.mp4"
        path = self.video_dir / name
        tmp = self.video_dir / f".{s.id}.partial.mp4"
        write_video(tmp, frames, fps=self.engine.cfg.fps)
        tmp.replace(path)
        with self._cv:
            self._videos[name] = path
            while len(self._videos) > self.keep_videos:
                _, old = self._videos.popitem(last=False)
                old.unlink(missing_ok=True)
        return name
