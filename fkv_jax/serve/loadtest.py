"""A bounded load test of a running ``fkv serve``: N concurrent WebSocket clients, some leaving mid-stream.

    python -m fkv_jax.serve.loadtest --url http://127.0.0.1:8000 --clients 8 --disconnect 2 --leave-queued 1

Every client starts a toy-model stream (its own seed); the first ``--disconnect`` clients close their socket
right after their first chunk, the last ``--leave-queued`` ones as soon as they are told they wait in the
queue. It reports whether every remaining client got its whole video (all frames, and
an mp4 with that many frames), the p50 / p95 chunk latency the server measured for the chunks it sent (step +
decode + encode, per chunk), the p95 gap between chunk arrivals at a client, and the server's counters
(``/api/stats``) before and after.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import sys
import time
import urllib.request

import numpy as np


@dataclasses.dataclass
class ClientResult:
    index: int
    left_early: bool
    frames: int = 0
    chunks: int = 0
    done: bool = False
    video: str | None = None
    chunk_ms: list = dataclasses.field(default_factory=list)
    gaps_ms: list = dataclasses.field(default_factory=list)
    queue_positions: list = dataclasses.field(default_factory=list)
    errors: list = dataclasses.field(default_factory=list)


async def one_client(
    ws_url: str, index: int, prompt: str, frames: int, leave_after: int | None, timeout: float
) -> ClientResult:
    """``leave_after``: close the socket after that many chunks (0: when first told it is queued), or stay."""
    import websockets

    res = ClientResult(index, leave_after is not None)
    async with websockets.connect(ws_url, max_size=None) as ws:
        await ws.send(json.dumps({"type": "start", "prompt": prompt, "seed": index, "frames": frames}))
        last = None
        deadline = time.monotonic() + timeout
        while True:
            m = json.loads(await asyncio.wait_for(ws.recv(), max(0.1, deadline - time.monotonic())))
            if m["type"] == "queued":
                res.queue_positions.append(m["position"])
                if leave_after == 0:
                    return res  # gone while waiting
            elif m["type"] == "chunk":
                now = time.perf_counter()
                if last is not None:
                    res.gaps_ms.append(1e3 * (now - last))
                last = now
                res.chunks += 1
                res.frames += len(m["frames"])
                res.chunk_ms.append(m["meters"]["chunk_ms"])
                if leave_after is not None and res.chunks >= leave_after:
                    return res  # the socket closes without a word: a disconnect mid-stream
            elif m["type"] in ("done", "stopped"):
                res.done, res.video = m["type"] == "done", m["video"]
                return res
            elif m["type"] == "error":
                res.errors.append(m["message"])
                return res


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as r:
        return json.loads(r.read())


def mp4_frames(url: str, tmp_dir) -> int:
    """Download an mp4 and count its frames."""
    from pathlib import Path

    from fkv_jax.video import read_video

    path = Path(tmp_dir) / url.rsplit("/", 1)[-1]
    with urllib.request.urlopen(url, timeout=30) as r:
        path.write_bytes(r.read())
    return read_video(path)[0].shape[0]


def percentile(values, q: float) -> float | None:
    return float(np.percentile(values, q)) if len(values) else None


async def run_load(
    base: str,
    clients: int = 8,
    disconnect: int = 2,
    frames: int = 9,
    leave_queued: int = 1,
    prompt: str = "a red circle and a blue square",
    timeout: float = 300,
) -> dict:
    """Run the clients concurrently; a report dict (see the module docstring)."""
    ws_url = base.replace("http://", "ws://").replace("https://", "wss://").rstrip("/") + "/ws"
    t0 = time.perf_counter()

    def leave(i: int) -> int | None:
        return 1 if i < disconnect else 0 if i >= clients - leave_queued else None

    results = await asyncio.gather(*[one_client(ws_url, i, prompt, frames, leave(i), timeout) for i in range(clients)])
    wall = time.perf_counter() - t0
    stay = [r for r in results if not r.left_early]
    chunk_ms = [x for r in results for x in r.chunk_ms]
    gaps = [x for r in stay for x in r.gaps_ms]
    return {
        "clients": clients,
        "left_early": clients - len(stay),
        "complete": sum(r.done and r.frames == frames for r in stay),
        "wall_s": round(wall, 2),
        "chunks": len(chunk_ms),
        "p50_chunk_ms": percentile(chunk_ms, 50),
        "p95_chunk_ms": percentile(chunk_ms, 95),
        "p95_gap_ms": percentile(gaps, 95),
        "max_queue_position": max((p for r in results for p in r.queue_positions), default=0),
        "errors": [e for r in results for e in r.errors],
        "results": results,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m fkv_jax.serve.loadtest",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the server (default http://127.0.0.1:8000)")
    p.add_argument("--clients", type=int, default=8, help="concurrent clients (default 8)")
    p.add_argument("--disconnect", type=int, default=2, help="clients that leave after their first chunk (2)")
    p.add_argument("--leave-queued", type=int, default=1, help="clients that leave while queued (1)")
    p.add_argument("--frames", type=int, default=9, help="latent frames per video (default 9: 3 toy chunks)")
    p.add_argument("--prompt", default="a red circle and a blue square")
    args = p.parse_args(argv)
    if args.clients < 1 or min(args.disconnect, args.leave_queued) < 0 or args.frames < 1:
        print("error: need --clients >= 1, --disconnect and --leave-queued >= 0, --frames >= 1", file=sys.stderr)
        return 2
    if args.disconnect + args.leave_queued > args.clients:
        print("error: --disconnect + --leave-queued is more than --clients", file=sys.stderr)
        return 2
    try:
        before = get_json(args.url.rstrip("/") + "/api/stats")
    except OSError as e:
        print(f"error: no fkv serve at --url {args.url}: {e}", file=sys.stderr)
        return 2
    rep = asyncio.run(run_load(args.url, args.clients, args.disconnect, args.frames, args.leave_queued, args.prompt))
    after = get_json(args.url.rstrip("/") + "/api/stats")
    stay = args.clients - args.disconnect - args.leave_queued
    print(
        f"{args.clients} clients ({args.disconnect} left after one chunk, {args.leave_queued} while queued): "
        f"{rep['complete']}/{stay} got their whole "
        f"video; {rep['chunks']} chunks in {rep['wall_s']} s; chunk latency p50 {rep['p50_chunk_ms']:.0f} ms, "
        f"p95 {rep['p95_chunk_ms']:.0f} ms (server-measured: step + decode + encode); p95 gap between chunks at a "
        f"client {rep['p95_gap_ms'] or 0:.0f} ms; deepest queue position {rep['max_queue_position']}"
    )
    print(f"server RSS {before['rss_bytes'] / 2**20:.0f} MiB before, {after['rss_bytes'] / 2**20:.0f} MiB after")
    if rep["errors"]:
        print("errors: " + "; ".join(rep["errors"]))
    return 0 if rep["complete"] == stay and not rep["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
