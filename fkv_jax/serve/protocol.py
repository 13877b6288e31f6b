"""What the web layer and the scheduler of ``fkv serve`` exchange with the model side: requests, settings,
server options and the one error type shown to users.

The model side itself (loading, validating a request, building samplers) is
:class:`fkv_jax.cli.serve_engine.Engine`: it uses the command line's shared checks, so it lives with the CLI;
:mod:`fkv_jax.serve.scheduler` and :mod:`fkv_jax.serve.app` only call the methods listed in :class:`EngineLike`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Protocol

import numpy as np

MAX_PROMPT_CHARS = 500
BACKEND_CHOICES = ("auto", "xla", "cpu_ffi", "pallas_tpu", "mosaic_gpu", "triton")
DECODERS = ("wan", "taehv")  # decoders of --model-dir latents; the toy model draws pixels itself


class RequestError(ValueError):
    """A bad request from the page: one line, shown to the user; the server carries on."""


@dataclasses.dataclass(frozen=True)
class Settings:
    """What must match for streams to share a batch (one compiled sampler)."""

    preset: str
    policy: str  # "" = the plain cache
    policy_opts: tuple[str, ...]  # KEY=VALUE pairs
    backend: str
    frames: int  # latent frames of the video

    @property
    def compiled(self) -> "Settings":
        """The settings that pick the compiled sampler: every length shares one (sized for --max-frames)."""
        return dataclasses.replace(self, frames=0)


@dataclasses.dataclass(frozen=True)
class Request:
    """One validated stream request."""

    prompt: str
    seed: int
    settings: Settings


@dataclasses.dataclass(frozen=True)
class ServeConfig:
    """Server options (validated by the CLI before the engine is built)."""

    model_dir: Path | None = None
    checkpoint: Path | None = None
    toy_weights: Path | None = None
    decoder: str = "wan"
    max_batch: int = 4
    max_frames: int = 96
    default_frames: int = 24
    max_samplers: int = 4
    fps: float = 8.0


class EngineLike(Protocol):
    """What the scheduler and the web layer use of an engine."""

    cfg: ServeConfig
    params: Any
    model_cfg: Any

    @property
    def latent_hw(self) -> tuple[int, int]: ...

    @property
    def video_scale(self) -> int: ...

    def defaults(self) -> dict: ...

    def validate(self, msg: Any) -> Request: ...

    def check_prompt(self, prompt: Any) -> str: ...

    def streamer(self, settings: Settings): ...

    def num_streamers(self) -> int: ...

    def context(self, prompts: list[str]) -> np.ndarray: ...

    def decoder(self): ...
