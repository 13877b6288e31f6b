"""Policies that read whole frames by position only: full cache, sliding window, sink + window."""

from __future__ import annotations

import dataclasses

from fkv_jax.policies.base import Policy
from fkv_jax.policies.retain import window_geometry


@dataclasses.dataclass(frozen=True, eq=False)
class Full(Policy):
    """Global attention: every generated frame is kept (upstream ``local_attn_size = -1``)."""

    name = "full"
    supports_relative_rope = True
    capacity_frames: int | None = None  # default: the video length

    def geometry(self, base, num_frames=None):
        return window_geometry(base, -1, 0, self.capacity_frames or num_frames or base.capacity_frames)


@dataclasses.dataclass(frozen=True, eq=False)
class Window(Policy):
    """Sliding window of ``local_attn_size`` frames (counting the current chunk), no sink."""

    name = "window"
    supports_relative_rope = True
    local_attn_size: int = 12

    def geometry(self, base, num_frames=None):
        return window_geometry(base, self.local_attn_size, 0, None)


@dataclasses.dataclass(frozen=True, eq=False)
class SinkWindow(Policy):
    """StreamingLLM / LongLive frame sink: the first ``sink_size`` frames forever plus a window of
    ``local_attn_size`` frames counted the upstream way (sink and current chunk included)."""

    name = "sink_window"
    supports_relative_rope = True
    local_attn_size: int = 12
    sink_size: int = 3

    def geometry(self, base, num_frames=None):
        return window_geometry(base, self.local_attn_size, self.sink_size, None)
