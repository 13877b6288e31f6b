"""The web layer of ``fkv serve``: one page, one WebSocket per client, mp4 downloads.

Client -> server (JSON text messages on ``/ws``)::

    {"type": "start", "prompt": ..., "seed": 0, "preset": "toy", "policy": "", "policy_opts": "k=v,...",
     "backend": "auto", "frames": 24}
    {"type": "switch", "prompt": ...}          # at the next chunk boundary, LongLive KV re-cache
    {"type": "stop"}

Server -> client: ``queued`` (position), ``started``, ``chunk`` (frames as data URLs, meters, head heat map),
``switched``, ``done`` / ``stopped`` (the mp4's URL), ``error`` (one line; the connection stays usable).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
from importlib import resources

from fastapi import FastAPI, WebSocket, WebSocketDisconnect
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse

from fkv_jax.serve.protocol import EngineLike, RequestError
from fkv_jax.serve.scheduler import Scheduler, Stream

log = logging.getLogger("fkv_jax.serve")
_VIDEO_NAME = re.compile(r"^[0-9a-f]{16}\.mp4$")
MAX_MESSAGE_BYTES = 64 * 1024


def page_html() -> str:
    return resources.files("fkv_jax.serve").joinpath("static/index.html").read_text(encoding="utf-8")


def rss_bytes() -> int:
    import psutil

    return psutil.Process(os.getpid()).memory_info().rss


def create_app(engine: EngineLike, scheduler: Scheduler):
    """The FastAPI app; the scheduler's worker starts and stops with the app."""

    @contextlib.asynccontextmanager
    async def lifespan(app):
        scheduler.start()
        try:
            yield
        finally:
            scheduler.close()

    app = FastAPI(title="fkv serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    page = page_html()

    @app.get("/", response_class=HTMLResponse)
    async def index():
        return page

    @app.get("/api/config")
    async def config():
        return engine.defaults()

    @app.get("/api/stats")
    async def stats():
        return {**scheduler.stats(), "rss_bytes": rss_bytes()}

    @app.get("/video/{name}")
    async def video(name: str):
        path = scheduler.video_path(name) if _VIDEO_NAME.match(name) else None
        if path is None or not path.is_file():
            return JSONResponse({"error": f"no video {name!r} (finished videos are kept for a while)"}, 404)
        return FileResponse(path, media_type="video/mp4", filename=f"fkv_{name}")

    @app.websocket("/ws")
    async def ws(websocket: WebSocket):
        await websocket.accept()
        loop = asyncio.get_running_loop()
        outbox: asyncio.Queue = asyncio.Queue()

        def send(msg: dict) -> None:  # from any thread; a message to a closed server is dropped
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(outbox.put_nowait, msg)

        async def sender():
            while True:
                msg = await outbox.get()
                await websocket.send_text(json.dumps(msg))

        task = asyncio.create_task(sender())
        stream: Stream | None = None
        try:
            while True:
                text = await websocket.receive_text()
                try:
                    if len(text) > MAX_MESSAGE_BYTES:
                        raise RequestError(f"message too large ({len(text)} bytes)")
                    try:
                        msg = json.loads(text)
                    except ValueError:
                        raise RequestError("bad message: not JSON") from None
                    kind = msg.get("type") if isinstance(msg, dict) else None
                    if kind == "start":
                        if stream is not None and not stream.finished:
                            raise RequestError("a stream is already running: stop it first")
                        request = engine.validate(msg)
                        stream = Stream(request=request, send=send)
                        scheduler.submit(stream)
                    elif kind == "switch":
                        if stream is None or stream.finished:
                            raise RequestError("no stream is running: start one first")
                        scheduler.switch(stream, engine.check_prompt(msg.get("prompt")))
                    elif kind == "stop":
                        if stream is not None and not stream.finished:
                            scheduler.stop(stream)
                    else:
                        raise RequestError(f"unknown message type {kind!r}")
                except RequestError as e:
                    send({"type": "error", "message": str(e)})
                except Exception as e:  # noqa: BLE001 - never a traceback to the client
                    log.exception("request failed")
                    send({"type": "error", "message": f"internal error: {type(e).__name__}"})
        except WebSocketDisconnect:
            pass
        finally:
            if stream is not None and not stream.finished:
                scheduler.stop(stream, disconnected=True)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    return app
