"""Pixel-level tools the shapes renderer draws with: bilinear upsampling, Gaussian blur, the
pixel window around a centre, and a colour that contrasts with its surroundings."""

from __future__ import annotations

import math

import numpy as np


def upsample(grid: np.ndarray, h: int, w: int) -> np.ndarray:
    """Bilinear upsampling of a (gh, gw, C) grid (gh, gw >= 2) to (h, w, C)."""
    gh, gw = grid.shape[:2]
    ys = np.linspace(0.0, gh - 1.0, h)
    xs = np.linspace(0.0, gw - 1.0, w)
    y0 = np.minimum(ys.astype(np.int64), gh - 2)
    x0 = np.minimum(xs.astype(np.int64), gw - 2)
    wy = (ys - y0).astype(np.float32)[:, None, None]
    wx = (xs - x0).astype(np.float32)[None, :, None]
    rows = grid[y0] * (1.0 - wy) + grid[y0 + 1] * wy  # (h, gw, C)
    return rows[:, x0] * (1.0 - wx) + rows[:, x0 + 1] * wx


def gaussian_blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of an (H, W, C) image, edges reflected."""
    radius = max(1, int(math.ceil(2.5 * sigma)))
    k = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2).astype(np.float32)
    k /= k.sum()
    h, w = img.shape[:2]
    p = np.pad(img, ((radius, radius), (0, 0), (0, 0)), mode="reflect")
    out = sum(k[i] * p[i : i + h] for i in range(len(k)))
    p = np.pad(out, ((0, 0), (radius, radius), (0, 0)), mode="reflect")
    return sum(k[i] * p[:, i : i + w] for i in range(len(k)))


class Window:
    """Pixel grid around a centre: unclipped coordinates plus the slice that lies in the image."""

    def __init__(self, cx: float, cy: float, radius: float, h: int, w: int):
        x0, x1 = int(math.floor(cx - radius)), int(math.ceil(cx + radius)) + 1
        y0, y1 = int(math.floor(cy - radius)), int(math.ceil(cy + radius)) + 1
        self.dx = (np.arange(x0, x1, dtype=np.float32) + 0.5 - cx)[None, :]
        self.dy = (np.arange(y0, y1, dtype=np.float32) + 0.5 - cy)[:, None]
        cx0, cx1 = max(x0, 0), min(x1, w)
        cy0, cy1 = max(y0, 0), min(y1, h)
        self.empty = cx0 >= cx1 or cy0 >= cy1
        self.img = (slice(cy0, cy1), slice(cx0, cx1))  # region of the image
        self.loc = (slice(cy0 - y0, cy1 - y0), slice(cx0 - x0, cx1 - x0))  # same region, local
        self.origin = (cy0, cx0)

    def rotated(self, theta: float, su: float, sv: float) -> tuple[np.ndarray, np.ndarray]:
        c, s = math.cos(theta), math.sin(theta)
        u = (self.dx * c + self.dy * s) / su
        v = (-self.dx * s + self.dy * c) / sv
        return u, v


def contrasting_color(rng: np.random.Generator, ref: np.ndarray, min_dist: float = 90.0) -> np.ndarray:
    """A random RGB colour at least `min_dist` away from `ref`; else the farthest of 24 tries."""
    best, best_d = None, -1.0
    for _ in range(24):
        c = rng.uniform(0.0, 255.0, 3).astype(np.float32)
        d = float(np.linalg.norm(c - ref))
        if d >= min_dist:
            return c
        if d > best_d:
            best, best_d = c, d
    return best

