"""The annotated object classes of the shapes dataset: their names, and how each one is drawn
(mask and colours) in its own rotated frame, where the nominal extent is [-1, 1]."""

from __future__ import annotations

import math

import numpy as np

from .shapes_canvas import Window, contrasting_color

#: Class names; COCO category id of ``CLASSES[k]`` is ``k + 1``.
CLASSES: tuple[str, ...] = (
    "circle",
    "ring",
    "square",
    "triangle",
    "cross",
    "star",
    "striped_rect",
    "checker",
)


def _star_mask(u: np.ndarray, v: np.ndarray, inner: float) -> np.ndarray:
    r = np.sqrt(u * u + v * v)
    sector = 2.0 * math.pi / 5.0
    phi = np.mod(np.arctan2(v, u) + math.pi / 2.0, sector)  # one point straight up
    psi = np.abs(phi - sector / 2.0)
    psi = sector / 2.0 - psi  # angle from the nearest outer vertex, in [0, pi/5]
    p1 = np.array([1.0, 0.0])
    p2 = np.array([inner * math.cos(sector / 2.0), inner * math.sin(sector / 2.0)])
    e = p2 - p1
    n = np.array([e[1], -e[0]])
    n /= np.linalg.norm(n)
    if n @ p1 < 0:
        n = -n
    d = float(n @ p1)
    denom = n[0] * np.cos(psi) + n[1] * np.sin(psi)
    return r * denom <= d


def object_pixels(rng: np.random.Generator, cls: str, win: Window, size: float,
                   bg_ref: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Returns (mask, colors) over the unclipped window for one object of class ``cls``."""
    theta = rng.uniform(0.0, 2.0 * math.pi)
    half = size / 2.0
    if cls in ("striped_rect", "checker", "ring", "star"):
        aniso = 1.0
    else:
        aniso = math.exp(rng.uniform(-0.13, 0.13))
    su, sv = half * aniso, half / aniso
    u, v = win.rotated(theta, su, sv)
    shape = np.broadcast_shapes(u.shape, v.shape)
    c1 = contrasting_color(rng, bg_ref)

    if cls == "circle":
        mask = u * u + v * v <= 1.0
    elif cls == "ring":
        t = min(0.7, max(rng.uniform(0.28, 0.5), 3.0 / size))
        r2 = u * u + v * v
        mask = (r2 <= 1.0) & (r2 >= (1.0 - t) ** 2)
    elif cls == "square":
        mask = np.maximum(np.abs(u), np.abs(v)) <= 0.9
    elif cls == "triangle":
        mask = np.ones(shape, dtype=bool)
        for k in range(3):
            a = -math.pi / 2.0 + 2.0 * math.pi * k / 3.0
            mask &= u * math.cos(a) + v * math.sin(a) <= 0.55
    elif cls == "cross":
        hw = rng.uniform(0.2, 0.34)
        au, av = np.abs(u), np.abs(v)
        mask = ((au <= hw) & (av <= 1.0)) | ((av <= hw) & (au <= 1.0))
    elif cls == "star":
        mask = _star_mask(u, v, rng.uniform(0.38, 0.5))
    elif cls == "striped_rect":
        b = rng.uniform(0.4, 0.68)
        mask = (np.abs(u) <= 1.0) & (np.abs(v) <= b)
        c2 = contrasting_color(rng, c1)
        period = rng.uniform(max(2.5, size / 12.0), max(3.0, size / 4.5))
        coord = (u * su if rng.random() < 0.5 else v * sv) / period + rng.uniform(0.0, 2.0)
        alt = np.floor(coord).astype(np.int64) % 2 == 1
        colors = np.where(alt[..., None], c2, c1)
        return np.broadcast_to(mask, shape), np.broadcast_to(colors, shape + (3,))
    elif cls == "checker":
        mask = np.maximum(np.abs(u), np.abs(v)) <= 0.9
        c2 = contrasting_color(rng, c1)
        n = int(rng.integers(3, 7))
        iu = np.floor((u + 0.9) / 1.8 * n).astype(np.int64)
        iv = np.floor((v + 0.9) / 1.8 * n).astype(np.int64)
        alt = (iu + iv) % 2 == 1
        colors = np.where(alt[..., None], c2, c1)
        return np.broadcast_to(mask, shape), np.broadcast_to(colors, shape + (3,))
    else:  # pragma: no cover
        raise ValueError(cls)

    # solid fill with mild linear shading
    g = rng.uniform(0.0, 0.18)
    a = rng.uniform(0.0, 2.0 * math.pi)
    shade = 1.0 + g * np.clip(u * math.cos(a) + v * math.sin(a), -1.0, 1.0)
    colors = c1 * shade[..., None]
    return np.broadcast_to(mask, shape), np.broadcast_to(colors, shape + (3,))
