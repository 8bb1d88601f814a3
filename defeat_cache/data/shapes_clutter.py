"""Unannotated clutter of the shapes dataset: multi-scale noise backgrounds (sometimes with faint
waves), irregular blobs, open arcs and line segments."""

from __future__ import annotations

import math

import numpy as np

from .shapes_canvas import Window, upsample

def background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A float32 (h, w, 3) background: a base colour plus low- and mid-frequency noise, sometimes a wave."""
    base = rng.uniform(30.0, 225.0, 3).astype(np.float32)
    g = int(rng.integers(2, 6))
    low = upsample(rng.normal(0.0, rng.uniform(15.0, 55.0), (g, g, 3)).astype(np.float32), h, w)
    gm = int(rng.integers(10, 28))
    mid_gray = rng.normal(0.0, rng.uniform(4.0, 20.0), (gm, gm, 1)).astype(np.float32)
    mid = upsample(mid_gray, h, w)
    bg = base + low + mid
    if rng.random() < 0.3:
        period = rng.uniform(12.0, 60.0)
        ang = rng.uniform(0.0, math.pi)
        x = np.arange(w, dtype=np.float32)[None, :]
        y = np.arange(h, dtype=np.float32)[:, None]
        wave = np.sin(2 * math.pi * (x * math.cos(ang) + y * math.sin(ang)) / period + rng.uniform(0, 6.3))
        bg = bg + wave[..., None] * rng.uniform(-14.0, 14.0, 3).astype(np.float32)
    return np.clip(bg, 0.0, 255.0).astype(np.float32)


def draw_blob(rng: np.random.Generator, img: np.ndarray) -> None:
    """Paints one blob of random size and colour, with a smooth lumpy outline, into `img`."""
    h, w = img.shape[:2]
    r = math.exp(rng.uniform(math.log(4.0), math.log(40.0)))
    cx, cy = rng.uniform(0, w), rng.uniform(0, h)
    win = Window(cx, cy, 1.8 * r + 1, h, w)
    if win.empty:
        return
    phi = np.arctan2(win.dy, win.dx)
    rad = np.sqrt(win.dx ** 2 + win.dy ** 2)
    bound = np.ones_like(phi)
    for k in range(2, 5):  # smooth, lumpy outline: irregular, but neither star- nor cross-like
        bound = bound + rng.uniform(0.04, 0.16) * np.cos(k * phi + rng.uniform(0, 6.3))
    mask = (rad <= r * bound)[win.loc]
    color = rng.uniform(0.0, 255.0, 3).astype(np.float32)
    img[win.img][mask] = color


def _draw_segment(img: np.ndarray, p0: np.ndarray, p1: np.ndarray, width: float, color: np.ndarray) -> None:
    h, w = img.shape[:2]
    c = (p0 + p1) / 2.0
    win = Window(float(c[0]), float(c[1]), float(np.linalg.norm(p1 - p0)) / 2.0 + width + 1, h, w)
    if win.empty:
        return
    d = p1 - p0
    L2 = max(float(d @ d), 1e-6)
    px, py = win.dx + c[0] - p0[0], win.dy + c[1] - p0[1]
    t = np.clip((px * d[0] + py * d[1]) / L2, 0.0, 1.0)
    dist2 = (px - t * d[0]) ** 2 + (py - t * d[1]) ** 2
    mask = (dist2 <= (width / 2.0) ** 2)[win.loc]
    img[win.img][mask] = color


def draw_line(rng: np.random.Generator, img: np.ndarray, max_width: float = 2.5) -> None:
    """Paints one segment of random position, direction, length, width and colour into `img`."""
    h, w = img.shape[:2]
    p0 = np.array([rng.uniform(0, w), rng.uniform(0, h)])
    ang = rng.uniform(0.0, 2.0 * math.pi)
    length = rng.uniform(10.0, 0.8 * max(h, w))
    p1 = p0 + length * np.array([math.cos(ang), math.sin(ang)])
    _draw_segment(img, p0, p1, rng.uniform(1.0, max_width), rng.uniform(0.0, 255.0, 3).astype(np.float32))


def draw_arc(rng: np.random.Generator, img: np.ndarray) -> None:
    """An open ring sector (never more than 200 degrees), a hard negative for the ring class."""
    h, w = img.shape[:2]
    r = math.exp(rng.uniform(math.log(5.0), math.log(40.0)))
    cx, cy = rng.uniform(0, w), rng.uniform(0, h)
    win = Window(cx, cy, r + 1, h, w)
    if win.empty:
        return
    t = rng.uniform(0.15, 0.4)
    rad = np.sqrt(win.dx ** 2 + win.dy ** 2) / r
    phi = np.mod(np.arctan2(win.dy, win.dx) - rng.uniform(0, 2 * math.pi), 2 * math.pi)
    mask = ((rad <= 1.0) & (rad >= 1.0 - t) & (phi <= math.radians(rng.uniform(60, 200))))[win.loc]
    img[win.img][mask] = rng.uniform(0.0, 255.0, 3).astype(np.float32)
