"""Seeded numpy image generators of the zoo's procedural evaluation tasks.

Everything renders on a pixel grid with signed-distance style masks, vectorised over the batch, so
thousands of images take well under a second. Images are uint8 [N, S, S, 3]; labels int64 [N].
"""

from __future__ import annotations

import numpy as np

SHAPE_NAMES = ("circle", "square", "triangle", "cross", "ring", "diamond")
STRIPE_ANGLES = (0, 30, 60, 90, 120, 150)
COLOUR_NAMES = ("red", "yellow", "green", "cyan", "blue", "magenta")
POSITION_NAMES = tuple(f"{row}-{col}" for row in ("top", "middle", "bottom") for col in ("left", "centre", "right"))


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates in [-1, 1], each [1, S, S] (y, x)."""
    axis = (np.arange(size, dtype=np.float32) + 0.5) / size * 2.0 - 1.0
    y, x = np.meshgrid(axis, axis, indexing="ij")
    return y[None], x[None]


def _contrasting_colours(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Foreground and background RGB colours in [0, 1], [N, 3] each, at least 0.35 apart in mean
    brightness so the object never vanishes into the background."""
    background = rng.uniform(0.0, 1.0, (n, 3)).astype(np.float32)
    shift = rng.uniform(0.35, 0.65, (n, 1)).astype(np.float32)
    direction = np.where(background.mean(1, keepdims=True) > 0.5, -1.0, 1.0).astype(np.float32)
    tint = rng.uniform(-0.25, 0.25, (n, 3)).astype(np.float32)
    foreground = np.clip(background + direction * shift + tint, 0.0, 1.0)
    return foreground, background


def _compose(mask: np.ndarray, foreground: np.ndarray, background: np.ndarray, noise: np.ndarray) -> np.ndarray:
    """mask [N, S, S] in [0, 1], colours [N, 3], noise [N, S, S, 3] → uint8 [N, S, S, 3]."""
    alpha = mask[..., None]
    image = alpha * foreground[:, None, None, :] + (1.0 - alpha) * background[:, None, None, :] + noise
    return np.clip(image * 255.0 + 0.5, 0, 255).astype(np.uint8)


def _noise(rng: np.random.Generator, n: int, size: int, scale: float) -> np.ndarray:
    return rng.normal(0.0, scale, (n, size, size, 3)).astype(np.float32)


def shapes(n: int, size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Six filled shapes (``SHAPE_NAMES``), random size, small rotation, position jitter and colours."""
    labels = rng.integers(0, len(SHAPE_NAMES), n)
    y, x = _grid(size)
    radius = rng.uniform(0.45, 0.8, (n, 1, 1)).astype(np.float32)
    centre = rng.uniform(-0.15, 0.15, (n, 2, 1, 1)).astype(np.float32)
    # Small rotations only: a square turned by 45 degrees would be the diamond.
    angle = rng.uniform(-0.3, 0.3, (n, 1, 1)).astype(np.float32)
    dy, dx = y - centre[:, 0], x - centre[:, 1]
    u = (np.cos(angle) * dx + np.sin(angle) * dy) / radius
    v = (-np.sin(angle) * dx + np.cos(angle) * dy) / radius
    r = np.sqrt(u**2 + v**2)
    triangle = (v < 0.5) & (np.sqrt(3.0) * u - v < 1.0) & (-np.sqrt(3.0) * u - v < 1.0)
    masks = np.stack(
        [
            r < 1.0,
            (np.abs(u) < 0.8) & (np.abs(v) < 0.8),
            triangle,
            ((np.abs(u) < 0.3) & (np.abs(v) < 1.0)) | ((np.abs(v) < 0.3) & (np.abs(u) < 1.0)),
            (r < 1.0) & (r > 0.6),
            np.abs(u) + np.abs(v) < 1.0,
        ]
    ).astype(np.float32)
    mask = masks[labels, np.arange(n)]
    foreground, background = _contrasting_colours(rng, n)
    return _compose(mask, foreground, background, _noise(rng, n, size, 0.06)), labels.astype(np.int64)


def stripes(n: int, size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Sinusoidal gratings at six orientations (``STRIPE_ANGLES``), random period, phase and colours."""
    labels = rng.integers(0, len(STRIPE_ANGLES), n)
    y, x = _grid(size)
    theta = np.deg2rad(np.asarray(STRIPE_ANGLES, dtype=np.float32))[labels][:, None, None]
    theta = theta + rng.normal(0.0, 0.05, (n, 1, 1)).astype(np.float32)
    frequency = rng.uniform(2.0, 5.0, (n, 1, 1)).astype(np.float32)
    phase = rng.uniform(0.0, 2 * np.pi, (n, 1, 1)).astype(np.float32)
    wave = np.sin(np.pi * frequency * (np.cos(theta) * x + np.sin(theta) * y) + phase)
    mask = 0.5 + 0.5 * wave
    foreground, background = _contrasting_colours(rng, n)
    return _compose(mask, foreground, background, _noise(rng, n, size, 0.08)), labels.astype(np.int64)


def positions(n: int, size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Where a small square sits in a 3 × 3 grid of cells (``POSITION_NAMES``), among faint clutter."""
    labels = rng.integers(0, len(POSITION_NAMES), n)
    y, x = _grid(size)
    cell = 2.0 / 3.0
    centre_y = -1.0 + cell * (labels // 3 + 0.5) + rng.uniform(-0.12, 0.12, n)
    centre_x = -1.0 + cell * (labels % 3 + 0.5) + rng.uniform(-0.12, 0.12, n)
    half = rng.uniform(0.12, 0.2, (n, 1, 1)).astype(np.float32)
    mask = (np.abs(y - centre_y[:, None, None]) < half) & (np.abs(x - centre_x[:, None, None]) < half)
    clutter = rng.uniform(0.0, 0.25, (n, size // 4, size // 4)).repeat(4, 1).repeat(4, 2)
    foreground, background = _contrasting_colours(rng, n)
    image_mask = np.maximum(mask.astype(np.float32), clutter.astype(np.float32))
    return _compose(image_mask, foreground, background, _noise(rng, n, size, 0.06)), labels.astype(np.int64)


def colours(n: int, size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """The hue of a soft blob (``COLOUR_NAMES``, six hues 60° apart, jittered in hue, saturation and value)
    on a grey, noisy background."""
    labels = rng.integers(0, len(COLOUR_NAMES), n)
    hue = (labels / len(COLOUR_NAMES) + rng.uniform(-0.04, 0.04, n)) % 1.0
    saturation, value = rng.uniform(0.6, 1.0, n), rng.uniform(0.6, 1.0, n)
    # HSV → RGB, vectorised: each channel is value · (1 − saturation · clip(...)) of a hue ramp.
    channel = (np.array([0.0, 2.0, 4.0]) / 6.0)[None, :]
    ramp = np.clip(np.abs(((hue[:, None] + 1.0 - channel) % 1.0) * 6.0 - 3.0) - 1.0, 0.0, 1.0)
    foreground = (value[:, None] * (1.0 - saturation[:, None] * (1.0 - ramp))).astype(np.float32)
    background = np.repeat(rng.uniform(0.2, 0.8, (n, 1)), 3, axis=1).astype(np.float32)
    y, x = _grid(size)
    centre = rng.uniform(-0.4, 0.4, (2, n, 1, 1))
    radius = rng.uniform(0.3, 0.6, (n, 1, 1))
    mask = np.clip((radius - np.hypot(y - centre[0], x - centre[1])) * size / 4.0, 0.0, 1.0).astype(np.float32)
    return _compose(mask, foreground, background, _noise(rng, n, size, 0.05)), labels.astype(np.int64)
