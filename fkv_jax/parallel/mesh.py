"""Device meshes from a ``--mesh`` string such as ``"data=2,model=4"``.

Axes: ``data`` splits the batch (prompts), ``model`` splits attention heads (and the FFN hidden axis). The
mesh uses ``AxisType.Auto`` axes: arrays are placed with ``NamedSharding`` and jit propagates shardings
(``jax.make_mesh`` would make Explicit axes in jax 0.10, where sharding is part of every type).
"""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

AXES = ("data", "model")


def parse_mesh_spec(spec: str, num_devices: int) -> dict[str, int]:
    """``"data=2,model=4"`` -> {"data": 2, "model": 4}. One size may be -1 (the rest of the devices); a
    missing axis has size 1; the sizes must multiply to ``num_devices``."""
    sizes = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, sep, value = part.partition("=")
        name = name.strip()
        if not sep or name not in AXES or name in sizes:
            raise ValueError(f"bad mesh spec {spec!r}: expected comma-separated AXIS=SIZE with AXIS in {AXES}")
        try:
            sizes[name] = int(value)
        except ValueError:
            raise ValueError(f"bad mesh spec {spec!r}: size of {name!r} is not an integer") from None
    if sum(v == -1 for v in sizes.values()) > 1 or any(v == 0 or v < -1 for v in sizes.values()):
        raise ValueError(f"bad mesh spec {spec!r}: sizes must be positive, at most one may be -1")
    known = math.prod(v for v in sizes.values() if v != -1)
    for name, value in sizes.items():
        if value == -1:
            if num_devices % known:
                raise ValueError(f"mesh {spec!r}: {num_devices} devices do not divide by {known}")
            sizes[name] = num_devices // known
    out = {name: sizes.get(name, 1) for name in AXES}
    if math.prod(out.values()) != num_devices:
        raise ValueError(
            f"mesh {spec!r} has {math.prod(out.values())} devices, but {num_devices} are available "
            f"({jax.default_backend()}); sizes must multiply to the device count"
        )
    return out


def make_mesh(spec: str = "data=1,model=-1", devices=None) -> Mesh:
    """A ``(data, model)`` mesh with Auto axes over ``devices`` (default: all devices, every host)."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = parse_mesh_spec(spec, len(devices))
    grid = np.asarray(devices, dtype=object).reshape(sizes["data"], sizes["model"])
    return Mesh(grid, AXES, axis_types=(AxisType.Auto, AxisType.Auto))
