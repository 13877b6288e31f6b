"""Writing (and reading back) mp4 files: H.264, yuv420p, 16 fps by default, through ``imageio-ffmpeg``.

Frames are appended as they are decoded, so a long generation shows up on disk chunk by chunk. The writer
is closed in a ``finally`` (or by its context manager) on every exit path, and ffmpeg runs in its own
process group (Ctrl-C reaches Python only): an interrupted or crashed run still finishes the file, which
then holds every frame written so far and plays normally. Should the Python process die without
closing it (kill -9), ffmpeg sees the end of its input and finalizes the file by itself.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path

import numpy as np

DEFAULT_FPS = 16  # Wan2.1 / Self Forcing / LongLive videos
DEFAULT_CRF = 18


class VideoError(RuntimeError):
    """The mp4 cannot be written (no ffmpeg, unwritable folder, ffmpeg failure)."""


def to_uint8(frames) -> np.ndarray:
    """Float frames in [-1, 1] (the VAE's range) -> uint8 RGB; uint8 input passes through."""
    frames = np.asarray(frames)
    if frames.dtype == np.uint8:
        return frames
    return np.round((np.clip(frames.astype(np.float32), -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)


def check_output_folder(folder: str | Path) -> Path:
    """Create ``folder`` if needed and make sure files can be written there; :class:`VideoError` otherwise."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise VideoError(f"cannot create output folder {folder}: {e.strerror or e}") from None
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        raise VideoError(f"output folder {folder} is not writable")
    return folder


def save_npy_atomic(path: str | Path, arr) -> Path:
    """Write ``arr`` as ``.npy`` through a temporary file in the same folder: ``path`` is either absent, its old
    content, or the whole new array (never half written)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, np.asarray(arr))
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def _ffmpeg():
    try:
        import imageio_ffmpeg
    except ImportError:
        raise VideoError("writing mp4 needs the `imageio-ffmpeg` package (pip install imageio-ffmpeg)") from None
    return imageio_ffmpeg


class VideoWriter:
    """Append frames ``[T, H, W, 3]`` (float in [-1, 1] or uint8) to an mp4; the size is fixed by the first batch.

    ffmpeg (the binary imageio-ffmpeg ships) is started at the first batch in a process group of its own, so
    Ctrl-C reaches only Python, whose ``finally`` then closes the pipe and lets ffmpeg finish the file. Use as
    a context manager, or call :meth:`close` in a ``finally``.
    """

    def __init__(self, path: str | Path, fps: float = DEFAULT_FPS, crf: int = DEFAULT_CRF):
        self.path, self.fps, self.crf = Path(path), fps, crf
        self.frames_written = 0
        self.size: tuple[int, int] | None = None  # (W, H)
        self._proc = None
        self._exe = _ffmpeg().get_ffmpeg_exe()  # fail early if the package / binary is missing

    def _start(self, w: int, h: int) -> None:
        cmd = [
            self._exe,
            "-y",
            "-loglevel",
            "error",
            "-f",
            "rawvideo",
            "-vcodec",
            "rawvideo",
            "-pix_fmt",
            "rgb24",
            "-s",
            f"{w}x{h}",
            "-r",
            f"{self.fps:g}",
            "-i",
            "-",
            "-an",
            "-vcodec",
            "libx264",
            "-pix_fmt",
            "yuv420p",
            "-crf",
            str(self.crf),
            "-movflags",
            "+faststart",
            str(self.path),
        ]
        self._log = tempfile.TemporaryFile()
        # process_group=0: no Ctrl-C for ffmpeg, and no Python code between fork and exec (JAX is multithreaded)
        self._proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=self._log, process_group=0
        )

    def write(self, frames) -> None:
        frames = to_uint8(frames)
        if frames.ndim == 3:
            frames = frames[None]
        if frames.ndim != 4 or frames.shape[-1] != 3:
            raise ValueError(f"frames must be [T, H, W, 3], got {frames.shape}")
        h, w = frames.shape[1:3]
        if self._proc is None:
            if h % 2 or w % 2:
                raise VideoError(f"yuv420p needs an even frame size, got {w}x{h}")
            self.size = (w, h)
            self._start(w, h)
        elif (w, h) != self.size:
            raise ValueError(f"frame size changed from {self.size[0]}x{self.size[1]} to {w}x{h}")
        try:
            self._proc.stdin.write(np.ascontiguousarray(frames).tobytes())
            self._proc.stdin.flush()
        except (BrokenPipeError, OSError):
            raise VideoError(f"ffmpeg stopped while writing {self.path}: {self._stderr()}") from None
        self.frames_written += len(frames)

    def _stderr(self) -> str:
        self._log.seek(0)
        return self._log.read().decode(errors="replace").strip()[-2000:] or f"exit code {self._proc.poll()}"

    def close(self) -> None:
        """Finish the file (safe to call twice; a writer that got no frame writes nothing)."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        try:
            proc.stdin.close()
        except OSError:
            pass
        code = proc.wait()
        if code != 0:
            self._proc = proc
            msg = self._stderr()
            self._proc = None
            self._log.close()
            raise VideoError(f"ffmpeg failed to write {self.path}: {msg}")
        self._log.close()

    def __enter__(self) -> "VideoWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def write_video(path: str | Path, frames, fps: float = DEFAULT_FPS) -> Path:
    """Write a whole video ``[T, H, W, 3]`` at once."""
    with VideoWriter(path, fps) as w:
        w.write(frames)
    return Path(path)


def read_video(path: str | Path) -> tuple[np.ndarray, dict]:
    """Read an mp4 back: ``(frames uint8 [T, H, W, 3], metadata)`` (metadata: ``size`` (W, H), ``fps``, ...)."""
    reader = _ffmpeg().read_frames(str(path))
    key, old = "IMAGEIO_FFMPEG_NO_PREVENT_SIGINT", os.environ.get("IMAGEIO_FFMPEG_NO_PREVENT_SIGINT")
    os.environ[key] = "1"  # no preexec_fn: no Python code between fork and exec (JAX is multithreaded)
    try:
        meta = next(reader)  # starts ffmpeg
    finally:
        if old is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = old
    w, h = meta["size"]
    frames = [np.frombuffer(f, np.uint8).reshape(h, w, 3) for f in reader]
    return (np.stack(frames) if frames else np.zeros((0, h, w, 3), np.uint8)), meta
