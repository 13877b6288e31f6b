"""A procedural world of coloured sprites: the toy testbed's ground truth.

Sprites (shape x colour) move at constant velocity in a small RGB view (default 32x32):

* **top / bottom walls bounce** (a sprite always stays inside the view vertically);
* **left / right edges are open**: the horizontal axis is a ring of ``size + gap`` pixels, so a sprite that
  leaves through the right edge travels through a hidden ``gap`` and re-enters from the left a few frames
  later (and vice versa). While it is in the gap it is not drawn at all;
* sprites **occlude each other by draw order** (sprite 0 is drawn first, i.e. furthest back);
* an optional grey **pillar** (a full-height vertical bar) is drawn over every sprite: a sprite passing
  behind it is hidden.

So a good video model needs recent frames (velocity) and distant ones (which sprite went into the gap or
behind the pillar and when it comes back). Everything is deterministic from a seed; rendering is
anti-aliased by supersampling so that sub-pixel motion is visible.

Frames are float32 ``[T, 3, H, W]`` in ``[-1, 1]`` (the model's pixel space). Ground truth per frame:
sprite centres, identities (shape, colour), visible fraction (after occlusion and clipping by the view).
Prompts name the sprites back to front: ``"a red circle and a blue square with a pillar"``.
"""

from __future__ import annotations

import dataclasses

import numpy as np

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
COLOURS: dict[str, tuple[float, float, float]] = {  # RGB in [0, 1]
    "red": (0.95, 0.15, 0.15),
    "green": (0.15, 0.85, 0.20),
    "blue": (0.20, 0.35, 1.00),
    "yellow": (0.95, 0.90, 0.15),
    "magenta": (0.90, 0.20, 0.90),
    "cyan": (0.15, 0.90, 0.90),
}
COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)
BACKGROUND = (0.0, 0.0, 0.0)
PILLAR_COLOUR = (0.5, 0.5, 0.5)


@dataclasses.dataclass(frozen=True)
class WorldConfig:
    size: int = 32  # view height = width (pixels)
    gap: int = 16  # hidden pixels between the right and the left edge (horizontal ring = size + gap)
    radius: float = 4.0  # sprite half-extent (pixels)
    min_sprites: int = 1
    max_sprites: int = 3
    speed_x: tuple[float, float] = (0.8, 2.0)  # |vx| range, pixels per frame
    speed_y: tuple[float, float] = (0.3, 1.5)  # |vy| range
    pillar_prob: float = 0.3
    pillar_width: int = 6
    supersample: int = 4  # sub-samples per pixel side for anti-aliasing

    @property
    def ring(self) -> int:
        return self.size + self.gap

    @classmethod
    def for_size(cls, size: int) -> "WorldConfig":
        """The default world scaled to a ``size`` x ``size`` view: gap, sprite radius, speeds and pillar width scale
        with ``size / 32``, so every duration in frames (crossing the view, hiding in the gap) stays the same.
        ``for_size(32)`` is the default world."""
        if size == cls.size:
            return cls()
        if size < 8:
            raise ValueError(f"world size {size}: need at least 8 pixels")
        s = size / cls.size
        base = cls()
        return cls(
            size=size,
            gap=int(round(base.gap * s)),
            radius=base.radius * s,
            speed_x=(base.speed_x[0] * s, base.speed_x[1] * s),
            speed_y=(base.speed_y[0] * s, base.speed_y[1] * s),
            pillar_width=max(2, int(round(base.pillar_width * s))),
        )


def world_for(latent_hw) -> WorldConfig:
    """The world a toy model of frame size ``latent_hw`` (square) draws: :meth:`WorldConfig.for_size`."""
    h, w = (int(v) for v in latent_hw)
    if h != w:
        raise ValueError(f"toy-world frames are square; got frame size {h}x{w}")
    return WorldConfig.for_size(h)


@dataclasses.dataclass(frozen=True)
class Sprite:
    shape: str
    colour: str
    x: float  # centre, horizontal ring coordinate in [0, size + gap) (view columns are [0, size))
    y: float  # centre, in [radius, size - radius]
    vx: float
    vy: float


@dataclasses.dataclass(frozen=True)
class Scene:
    sprites: tuple[Sprite, ...]  # back to front
    pillar: tuple[int, int] | None = None  # [x0, x1) columns covered by the pillar, or None

    @property
    def prompt(self) -> str:
        return prompt_of(self)


@dataclasses.dataclass(frozen=True)
class Episode:
    """A rendered video and its ground truth (N sprites, T frames)."""

    frames: np.ndarray  # float32 [T, 3, H, W] in [-1, 1]
    positions: np.ndarray  # float32 [T, N, 2] (x, y) centres in view pixels; x in [-gap/2, size + gap/2)
    visible_frac: np.ndarray  # float32 [T, N] drawn (unoccluded, in-view) area / full sprite area
    shape_ids: np.ndarray  # int32 [N] index into SHAPES
    colour_ids: np.ndarray  # int32 [N] index into COLOUR_NAMES
    scene: Scene
    prompt: str

    @property
    def visible(self) -> np.ndarray:
        """bool [T, N]: at least 2% of the sprite is drawn."""
        return self.visible_frac > 0.02


def prompt_of(scene: Scene) -> str:
    names = [f"a {s.colour} {s.shape}" for s in scene.sprites]
    text = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    if scene.pillar is not None:
        text += " with a pillar"
    return text


# ---- shapes ------------------------------------------------------------------------------------------


def shape_mask(shape: str, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    """bool: is the offset (dx, dy) from the centre inside the shape of half-extent r (y points down)."""
    if shape == "circle":
        return dx * dx + dy * dy <= (1.05 * r) ** 2
    if shape == "square":
        return (np.abs(dx) <= 0.9 * r) & (np.abs(dy) <= 0.9 * r)
    if shape == "triangle":  # apex up
        h = (dy + r) / (2 * r)  # 0 at the apex, 1 at the base
        return (dy >= -r) & (dy <= r) & (np.abs(dx) <= 1.05 * r * h)
    if shape == "cross":
        a = 0.4 * r
        return ((np.abs(dx) <= a) & (np.abs(dy) <= r)) | ((np.abs(dy) <= a) & (np.abs(dx) <= r))
    raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")


def subsample_mask(shape: str, cx: float, cy: float, cfg: WorldConfig) -> np.ndarray:
    """bool [size*ss, size*ss]: which sub-samples (ss = cfg.supersample per pixel side) the sprite covers."""
    n, ss = cfg.size, cfg.supersample
    sub = (np.arange(n * ss, dtype=np.float64) + 0.5) / ss  # sub-sample centres in pixel units
    return shape_mask(shape, sub[None, :] - cx, sub[:, None] - cy, cfg.radius)


def _down(m: np.ndarray, cfg: WorldConfig) -> np.ndarray:
    n, ss = cfg.size, cfg.supersample
    return m.reshape(*m.shape[:-2], n, ss, n, ss).mean(axis=(-3, -1), dtype=np.float32)


def coverage(shape: str, cx: float, cy: float, cfg: WorldConfig) -> np.ndarray:
    """float32 [size, size]: fraction of each pixel covered by the sprite centred at view (cx, cy)."""
    return _down(subsample_mask(shape, cx, cy, cfg), cfg)


def full_area(shape: str, cfg: WorldConfig) -> float:
    """Area of the sprite in pixels (as rendered away from the edges)."""
    c = cfg.size / 2
    return float(coverage(shape, c, c, cfg).sum())


# ---- dynamics ----------------------------------------------------------------------------------------


def step_state(x: float, y: float, vx: float, vy: float, cfg: WorldConfig) -> tuple[float, float, float, float]:
    """One frame of motion: wrap horizontally on the ring, reflect vertically off the walls."""
    x = (x + vx) % cfg.ring
    lo, hi = cfg.radius, cfg.size - cfg.radius
    y = y + vy
    while y < lo or y > hi:  # exact reflection (speeds are far below the wall distance)
        if y < lo:
            y, vy = 2 * lo - y, -vy
        if y > hi:
            y, vy = 2 * hi - y, -vy
    return x, y, vx, vy


def view_x(x: float, cfg: WorldConfig) -> float:
    """Ring coordinate -> view coordinate in [-gap/2, size + gap/2)."""
    return x if x < cfg.size + cfg.gap / 2 else x - cfg.ring


# ---- sampling and rendering ------------------------------------------------------------------------------


def sample_scene(
    rng: np.random.Generator,
    cfg: WorldConfig = WorldConfig(),
    num_sprites: int | None = None,
    pillar: bool | None = None,
) -> Scene:
    """A random scene: distinct colours, any shapes, positions anywhere on the ring (possibly hidden)."""
    n = int(rng.integers(cfg.min_sprites, cfg.max_sprites + 1)) if num_sprites is None else num_sprites
    if not 1 <= n <= len(COLOUR_NAMES):
        raise ValueError(f"num_sprites must be in [1, {len(COLOUR_NAMES)}], got {n}")
    colours = rng.choice(len(COLOUR_NAMES), size=n, replace=False)
    sprites = []
    for i in range(n):
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        # Mostly start in view so the first frames show the scene; a quarter start in the gap.
        if rng.random() < 0.75:
            x = float(rng.uniform(cfg.radius, cfg.size - cfg.radius))
        else:
            x = float(rng.uniform(cfg.size, cfg.ring))
        y = float(rng.uniform(cfg.radius, cfg.size - cfg.radius))
        vx = float(rng.uniform(*cfg.speed_x) * rng.choice([-1, 1]))
        vy = float(rng.uniform(*cfg.speed_y) * rng.choice([-1, 1]))
        sprites.append(Sprite(shape, COLOUR_NAMES[int(colours[i])], x, y, vx, vy))
    use_pillar = (rng.random() < cfg.pillar_prob) if pillar is None else pillar
    pil = None
    if use_pillar:
        x0 = int(rng.integers(cfg.radius * 2, cfg.size - cfg.radius * 2 - cfg.pillar_width + 1))
        pil = (x0, x0 + cfg.pillar_width)
    return Scene(tuple(sprites), pil)


def simulate(scene: Scene, num_frames: int, cfg: WorldConfig = WorldConfig()) -> Episode:
    """Render ``num_frames`` frames of a scene (frame 0 shows the scene's initial state).

    Drawing and occlusion are resolved per sub-sample (``cfg.supersample`` per pixel side) and averaged to
    pixels, so edges are anti-aliased and the visible fractions are exact at sub-sample resolution.
    """
    n, size, ss = len(scene.sprites), cfg.size, cfg.supersample
    frames = np.empty((num_frames, 3, size, size), np.float32)
    pos = np.empty((num_frames, n, 2), np.float32)
    vis = np.zeros((num_frames, n), np.float32)
    areas = [full_area(s.shape, cfg) * ss * ss for s in scene.sprites]  # in sub-samples
    state = [(s.x, s.y, s.vx, s.vy) for s in scene.sprites]
    palette = np.asarray([BACKGROUND, PILLAR_COLOUR, *(COLOURS[s.colour] for s in scene.sprites)], np.float32)
    pillar = np.zeros((size * ss, size * ss), bool)
    if scene.pillar is not None:
        pillar[:, scene.pillar[0] * ss : scene.pillar[1] * ss] = True
    for t in range(num_frames):
        owner = np.zeros((size * ss, size * ss), np.int32)  # palette index of each sub-sample
        for i, s in enumerate(scene.sprites):
            x, y, _, _ = state[i]
            vx_ = view_x(x, cfg)
            pos[t, i] = (vx_, y)
            # the sprite can straddle the seam of the ring: draw every copy that overlaps the view
            for cx in (vx_, vx_ - cfg.ring, vx_ + cfg.ring):
                if -cfg.radius - 1 < cx < size + cfg.radius + 1:
                    owner[subsample_mask(s.shape, cx, y, cfg)] = 2 + i  # later sprites overwrite earlier ones
        owner[pillar] = 1
        for i in range(n):
            vis[t, i] = np.count_nonzero(owner == 2 + i) / areas[i]
        rgb = palette[owner]  # [size*ss, size*ss, 3]
        frames[t] = np.moveaxis(_down(np.moveaxis(rgb, -1, 0), cfg), 0, 0) * 2 - 1
        state = [step_state(*st, cfg) for st in state]
    return Episode(
        frames=frames,
        positions=pos,
        visible_frac=np.clip(vis, 0, 1),
        shape_ids=np.asarray([SHAPES.index(s.shape) for s in scene.sprites], np.int32),
        colour_ids=np.asarray([COLOUR_NAMES.index(s.colour) for s in scene.sprites], np.int32),
        scene=scene,
        prompt=prompt_of(scene),
    )


def make_episode(seed: int, num_frames: int, cfg: WorldConfig = WorldConfig(), **scene_kw) -> Episode:
    """Deterministic episode from a seed (``scene_kw`` goes to :func:`sample_scene`)."""
    return simulate(sample_scene(np.random.default_rng(seed), cfg, **scene_kw), num_frames, cfg)


def make_batch(
    rng: np.random.Generator, batch: int, num_frames: int, cfg: WorldConfig = WorldConfig()
) -> tuple[np.ndarray, list[str]]:
    """``batch`` random episodes: frames float32 [B, T, 3, H, W] and their prompts."""
    eps = [simulate(sample_scene(rng, cfg), num_frames, cfg) for _ in range(batch)]
    return np.stack([e.frames for e in eps]), [e.prompt for e in eps]


# ---- the memory family: episodes where history decides ----------------------------------------------------


def hidden_runs(visible: np.ndarray) -> list[tuple[int, int, int]]:
    """Runs of frames in which a sprite is hidden: ``(sprite, first frame, length)`` from bool [T, N]."""
    runs = []
    for n in range(visible.shape[1]):
        t = 0
        while t < visible.shape[0]:
            if not visible[t, n]:
                s = t
                while t < visible.shape[0] and not visible[t, n]:
                    t += 1
                runs.append((n, s, t - s))
            t += 1
    return runs


def memory_scene(rng: np.random.Generator, cfg: WorldConfig, *, enter_at: float, speed: float) -> Scene:
    """Two sprites, no pillar; the front one (index 1) is fully in view, moves slowly and horizontally towards
    the nearer edge and is fully in the gap from about frame ``enter_at`` on. It stays hidden for
    ``(gap - 2 * radius) / speed`` frames (10 at the world's slowest speed 0.8), then comes back from the
    other side with the same shape, colour and velocity. The other sprite is an ordinary random one."""
    base = sample_scene(rng, cfg, num_sprites=2, pillar=False)
    s = base.sprites[1]
    direction = float(rng.choice([-1, 1]))
    # centre x at which the sprite has just left the view entirely (its whole extent in the gap)
    gone = cfg.size + cfg.radius if direction > 0 else -cfg.radius
    x = (gone - direction * speed * enter_at) % cfg.ring
    target = Sprite(s.shape, s.colour, x, s.y, direction * speed, s.vy)
    return Scene((base.sprites[0], target), None)


def make_memory_episode(
    seed: int,
    num_frames: int,
    *,
    context_frames: int = 3,
    min_hidden: int = 8,
    cfg: WorldConfig = WorldConfig(),
) -> Episode:
    """An episode of the memory family: after ``context_frames`` true frames, the front sprite (sprite 1) is
    seen in view, hides in the wrap-around gap for at least ``min_hidden`` consecutive frames and comes back
    fully visible before the end. A policy that keeps fewer than ``min_hidden`` recent frames has no frame
    that shows the sprite when it reappears: only history tells its identity and its velocity.

    Deterministic from the seed (rejection sampling over ``(seed, attempt)``)."""
    longest = (cfg.gap - 2 * cfg.radius) / cfg.speed_x[0]
    if min_hidden > longest - 1:
        raise ValueError(
            f"min_hidden={min_hidden}: a sprite hides at most about {longest:.0f} frames in this world "
            f"(gap {cfg.gap} px, sprite {2 * cfg.radius:.0f} px, slowest speed {cfg.speed_x[0]} px/frame)"
        )
    top = min(cfg.speed_x[1], (cfg.gap - 2 * cfg.radius) / (min_hidden + 1))
    # true context, then the sprite leaves the view (2r / speed frames), hides ((gap - 2r) / speed), comes
    # fully back (2r / speed) and is seen for a frame before the end
    need = int(np.ceil(context_frames + 4 + (cfg.gap + 2 * cfg.radius) / top))
    if num_frames < need:
        raise ValueError(
            f"num_frames={num_frames}: the memory family needs at least {need} frames "
            f"({context_frames} context frames, min_hidden {min_hidden})"
        )
    for attempt in range(1000):
        rng = np.random.default_rng((seed, attempt))
        slowest = max(cfg.speed_x[0], (cfg.gap + 2 * cfg.radius) / (num_frames - context_frames - 4))
        speed = float(rng.uniform(slowest, top))
        earliest = context_frames + 1 + 2 * cfg.radius / speed
        latest = num_frames - 2 - cfg.gap / speed
        if latest < earliest:
            continue
        enter = float(rng.uniform(earliest, latest))
        ep = simulate(memory_scene(rng, cfg, enter_at=enter, speed=speed), num_frames, cfg)
        full = ep.visible_frac >= 0.9
        for n, start, length in hidden_runs(ep.visible):
            if n != 1 or length < min_hidden or start < context_frames + 1 or start + length >= num_frames:
                continue
            seen_before = full[:start, n].any()
            back = full[start + length :, n].any()
            if seen_before and back:
                return ep
    raise RuntimeError(f"no memory episode found for seed {seed} ({num_frames} frames, min_hidden {min_hidden})")
