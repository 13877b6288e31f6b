"""``fkv serve`` (alias ``python -m fkv_jax.serve``): watch videos being made in the browser, switch prompts live."""

from __future__ import annotations

import argparse
import socket
import sys
from pathlib import Path

from fkv_jax.cli import Parser, UsageError, run_cli

DESCRIPTION = """\
Serve a web page that generates videos chunk by chunk while you watch.

The page has a prompt box, seed, sampler preset, KV policy (with its options) and attention backend; Start,
Stop and "Switch prompt now" (a LongLive KV re-cache at the next chunk boundary, without a restart). Frames
appear as each chunk is made, played at a selectable FPS with a buffer meter; live meters show the generated
FPS (denoise and end to end), chunk latency, resident KV bytes and keys read per query (the saving of the
chosen policy), with a per-head heat map for policies that select per head. The finished video downloads as
an mp4.

Model: the embedded toy-world model by default (24x24 frames of moving sprites, its words: a, and, with,
pillar, red, green, blue, yellow, magenta, cyan, circle, square, triangle, cross); --model-dir DIR for a
text-to-video folder built by `fkv convert --wan-dir ... --generator ... --output DIR` (UMT5 + transformer +
VAE), optionally with --checkpoint DIR replacing its transformer.

The model is loaded once; each distinct (preset, policy, options, backend, frames) compiles its chunk step on
first use (--warmup compiles the default settings at start). Streams with the same settings run together in
one batch of --max-batch rows; the others wait in a queue whose position the page shows. See docs/serve.md."""

EPILOG = """\
examples:
  fkv serve                                  # http://127.0.0.1:8000, the toy model
  fkv serve --warmup --max-batch 8 --port 8080
  fkv serve --model-dir models/self_forcing --frames 21 --max-frames 42

It listens on 127.0.0.1 (this machine only) unless --host is given, e.g. --host 0.0.0.0; there is no
authentication, so expose it only on networks you trust.

exit codes: 2 bad input (one 'error: ...' line before anything is loaded), 130 stopped with Ctrl-C."""


def build_parser(prog: str = "fkv serve") -> Parser:
    p = Parser(prog=prog, description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("network")
    g.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    g.add_argument("--port", type=int, default=8000, help="TCP port (default 8000; 0 picks a free one)")
    g = p.add_argument_group("model")
    g.add_argument("--model-dir", type=Path, help="text-to-video model folder (default: the embedded toy model)")
    g.add_argument("--checkpoint", type=Path, help="converted transformer replacing the --model-dir one")
    g.add_argument("--toy-weights", type=Path, help="toy-world weights you exported (default: the shipped ones)")
    g.add_argument(
        "--decoder",
        help="decoder of --model-dir latents: wan (the Wan2.1 VAE; default) or taehv (the tiny preview decoder, "
        "tens of times faster; DIR/taehv/ from `fkv convert --taehv taew2_1.pth --output DIR`). "
        "The toy model draws pixels and takes neither.",
    )
    g = p.add_argument_group("serving")
    g.add_argument("--max-batch", type=int, default=4, help="rows of the one compiled batch (default 4)")
    g.add_argument("--frames", type=int, help="default video length in latent frames (default 24 toy, 21 others)")
    g.add_argument("--max-frames", type=int, help="longest video a client may ask for (default 96 toy, 42 others)")
    g.add_argument("--max-queue", type=int, default=16, help="streams that may wait (default 16; more are refused)")
    g.add_argument("--max-samplers", type=int, default=4, help="compiled settings kept (LRU; default 4)")
    g.add_argument("--keep-videos", type=int, default=32, help="finished mp4s kept for download (default 32)")
    g.add_argument("--fps", type=float, help="playback and mp4 frame rate (default 8 toy, 16 others)")
    g.add_argument("--gather-ms", type=float, default=250, help="wait this long for more streams to batch (250)")
    g.add_argument("--warmup", action="store_true", help="compile the default settings before serving")
    g.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"], help="uvicorn's")
    return p


def check_args(args):
    """Every cheap check, before anything is loaded; returns the ServeConfig."""
    from fkv_jax.serve.protocol import DECODERS, ServeConfig

    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port must be in 0..65535, got {args.port}")
    for flag, value, low in (
        ("--max-batch", args.max_batch, 1),
        ("--max-queue", args.max_queue, 0),
        ("--max-samplers", args.max_samplers, 1),
        ("--keep-videos", args.keep_videos, 1),
        ("--frames", args.frames, 1),
        ("--max-frames", args.max_frames, 1),
    ):
        if value is not None and value < low:
            raise UsageError(f"{flag} must be >= {low}, got {value}")
    if args.fps is not None and not 0 < args.fps <= 120:
        raise UsageError(f"--fps must be in (0, 120], got {args.fps:g}")
    if args.gather_ms < 0:
        raise UsageError(f"--gather-ms must be >= 0, got {args.gather_ms:g}")
    if args.decoder is not None:
        if args.decoder not in DECODERS:
            raise UsageError(f"--decoder {args.decoder!r}: one of {', '.join(DECODERS)}")
        if args.model_dir is None:
            raise UsageError("--decoder applies to --model-dir latents; the toy model draws pixels itself")
        if args.decoder == "taehv" and not (args.model_dir / "taehv").is_dir():
            raise UsageError(
                f"--decoder taehv: {args.model_dir}/taehv not found; add it with "
                f"`fkv convert --taehv taew2_1.pth --output {args.model_dir}`"
            )
    if args.checkpoint is not None:
        if args.model_dir is None:
            raise UsageError(
                "--checkpoint needs --model-dir: the page turns prompts into pixels, which takes the folder's text "
                "encoder and VAE (the checkpoint replaces its transformer)"
            )
        if not args.checkpoint.is_dir():
            raise UsageError(f"--checkpoint directory not found: {args.checkpoint}")
    if args.toy_weights is not None:
        if args.model_dir is not None:
            raise UsageError("--toy-weights selects the toy-world model; it cannot go with --model-dir")
        if not args.toy_weights.is_dir():
            raise UsageError(f"--toy-weights {args.toy_weights} is not a directory")
    toy = args.model_dir is None
    frames = args.frames if args.frames is not None else (24 if toy else 21)
    max_frames = args.max_frames if args.max_frames is not None else max(frames, 96 if toy else 42)
    if frames > max_frames:
        raise UsageError(f"--frames {frames} is more than --max-frames {max_frames}")
    return ServeConfig(
        model_dir=args.model_dir,
        checkpoint=args.checkpoint,
        toy_weights=args.toy_weights,
        decoder=args.decoder or "wan",
        max_batch=args.max_batch,
        max_frames=max_frames,
        default_frames=frames,
        max_samplers=args.max_samplers,
        fps=args.fps if args.fps is not None else (8.0 if toy else 16.0),
    )


def _bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound now (a taken port is an error line before any loading)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise UsageError(f"--host {host!r}: {e.strerror or e}") from None
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as e:
        sock.close()
        raise UsageError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.listen(128)
    return sock


def run(args) -> None:
    cfg = check_args(args)
    from fkv_jax.cli.serve_engine import Engine

    engine = Engine(cfg)  # reads config files only; a bad folder is an error line here
    sock = _bind(args.host, args.port)
    import uvicorn

    from fkv_jax.cli import common as C
    from fkv_jax.serve.app import create_app
    from fkv_jax.serve.scheduler import Scheduler

    C.enable_compilation_cache()
    what = engine.load()
    if args.warmup:
        _warmup(engine)
    scheduler = Scheduler(engine, max_queue=args.max_queue, gather_s=args.gather_ms / 1e3, keep_videos=args.keep_videos)
    app = create_app(engine, scheduler)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    print(f"fkv serve: {what}; open http://{shown}:{port}/  (Ctrl-C stops)", file=sys.stderr, flush=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level=args.log_level, ws_max_size=1 << 20))
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()


def _warmup(engine) -> None:
    """Compile the default settings' chunk step (and text / decode paths) with one padded chunk."""
    import time

    import numpy as np

    t0 = time.perf_counter()
    req = engine.validate({"prompt": engine.defaults()["prompt"] or "warm up", "seed": 0})
    streamer = engine.streamer(req.settings)
    c, n, b = streamer.frames_per_block, streamer.num_steps, streamer.batch
    st = streamer.begin(engine.params, engine.context([req.prompt] * b))
    shape = (b, c, engine.model_cfg.in_dim, *engine.latent_hw)
    out, st = streamer.step(engine.params, st, np.zeros(shape, np.float32), np.zeros((n - 1, *shape), np.float32))
    engine.decoder()(np.asarray(out.x0))
    print(f"fkv serve: warm-up compiled the default settings in {time.perf_counter() - t0:.1f} s", file=sys.stderr)


def main(argv=None, prog: str = "fkv serve") -> int:
    return run_cli(lambda: build_parser(prog), run, argv)
