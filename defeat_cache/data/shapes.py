"""Deterministic synthetic object-detection dataset ("shapes"), the project's built-in default.

``generate_shapes(out_dir)`` renders RGB images of geometric objects on cluttered backgrounds and
writes them with COCO-format annotations and a dataset TOML::

    out_dir/
      data.toml                      # format = "coco", [train], [val], [generator]
      annotations/train.json         # COCO: images / annotations / categories (ids from 1)
      annotations/val.json
      images/train/000000.png ...    # file_name in the JSON is relative to images/: "train/000000.png"
      images/val/000000.png ...

Content
-------
* 8 classes that differ by shape and texture (:data:`CLASSES`): circle, ring, square, triangle,
  cross, star (solid fills with mild shading), striped_rect (two-colour stripes on an elongated
  rectangle) and checker (two-colour checkerboard square). Colours are random per object, so colour
  never identifies a class; they are only chosen to contrast with the local background.
* Objects are rotated, mildly anisotropic and log-uniformly sized (nominal extent 8 px up to
  160 px, capped at 0.85 x the shorter image side; per-class floors of 8-14 px keep the shape or
  texture recognisable), so the COCO small / medium / large buckets are all populated; 1-8 per
  image, placed largest first; partial occlusion (every object keeps at least 60 % of its in-image
  pixels) and truncation at the image border (at least 50 % inside) are allowed.
* Clutter that is not annotated: multi-scale noise backgrounds, sometimes faint waves, irregular
  blobs, open arcs and line segments (some drawn over objects), then mild blur and pixel noise.
* Every ``EMPTY_EVERY``-th image (index % 30 == 29, about 3 %) contains no objects.

Boxes are tight to the object pixels that remain visible after occlusion and clipping (measured
before the final blur, which spreads edges by about one pixel). ``area`` is the box area ``w * h``
(there are no segmentations), so COCOeval's small / medium / large buckets (32**2, 96**2) refer to
box size, consistently with how it measures detections. With the defaults, about 47 % of the
objects are small, 44 % medium and 9 % large; 4.5 objects per image on average.

Determinism: image ``i`` of split ``s`` is drawn from ``numpy.random.default_rng([seed, s, i])``,
so splits are independent, and the first N images do not depend on ``num_train`` / ``num_val``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import tomllib
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = ["CLASSES", "EMPTY_EVERY", "GENERATOR_VERSION", "generate_shapes", "render_image"]

#: Bump whenever the rendered content changes, so cached datasets are regenerated.
GENERATOR_VERSION = 2

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

#: Image ``i`` is empty (no objects) when ``i % EMPTY_EVERY == EMPTY_EVERY - 1``.
EMPTY_EVERY = 30

_SPLITS = ("train", "val")
_SPLIT_IDS = {"train": 0, "val": 1}

# v2: objects from 16 px and less clutter, so a ResNet-18 teacher trained from scratch for
# ~800 CPU iterations reaches a clearly useful AP (v1's 8-px objects kept it near 8 AP).
_MIN_SIZE = 16.0  # nominal object extent, px
# per-class floor on the nominal extent, so the defining shape / texture stays recognisable
_CLASS_MIN_SIZE = {"circle": 16.0, "square": 16.0, "triangle": 17.0, "ring": 17.0, "cross": 18.0,
                   "star": 19.0, "striped_rect": 20.0, "checker": 21.0}
_MAX_SIZE = 128.0
_MAX_SIZE_FRAC = 0.85 # of the shorter image side
_MAX_OBJECTS = 6
_MIN_VISIBLE_FRAC = 0.6  # of an object's in-image pixels must stay visible under later objects
_MIN_INSIDE_FRAC = 0.5  # of an object's pixels must lie inside the image
_MIN_VISIBLE_PX = 12
_MIN_BOX_SIDE = 3


# ----------------------------------------------------------------------------------------------
# low-level helpers
# ----------------------------------------------------------------------------------------------


def _upsample(grid: np.ndarray, h: int, w: int) -> np.ndarray:
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


def _gaussian_blur(img: np.ndarray, sigma: float) -> np.ndarray:
    radius = max(1, int(math.ceil(2.5 * sigma)))
    k = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2).astype(np.float32)
    k /= k.sum()
    h, w = img.shape[:2]
    p = np.pad(img, ((radius, radius), (0, 0), (0, 0)), mode="reflect")
    out = sum(k[i] * p[i : i + h] for i in range(len(k)))
    p = np.pad(out, ((0, 0), (radius, radius), (0, 0)), mode="reflect")
    return sum(k[i] * p[:, i : i + w] for i in range(len(k)))


class _Window:
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


def _contrasting_color(rng: np.random.Generator, ref: np.ndarray, min_dist: float = 90.0) -> np.ndarray:
    best, best_d = None, -1.0
    for _ in range(24):
        c = rng.uniform(0.0, 255.0, 3).astype(np.float32)
        d = float(np.linalg.norm(c - ref))
        if d >= min_dist:
            return c
        if d > best_d:
            best, best_d = c, d
    return best


# ----------------------------------------------------------------------------------------------
# shapes: masks in normalized, rotated coordinates (nominal extent [-1, 1])
# ----------------------------------------------------------------------------------------------


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


def _object_pixels(rng: np.random.Generator, cls: str, win: _Window, size: float,
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
    c1 = _contrasting_color(rng, bg_ref)

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
        c2 = _contrasting_color(rng, c1)
        period = rng.uniform(max(2.5, size / 12.0), max(3.0, size / 4.5))
        coord = (u * su if rng.random() < 0.5 else v * sv) / period + rng.uniform(0.0, 2.0)
        alt = np.floor(coord).astype(np.int64) % 2 == 1
        colors = np.where(alt[..., None], c2, c1)
        return np.broadcast_to(mask, shape), np.broadcast_to(colors, shape + (3,))
    elif cls == "checker":
        mask = np.maximum(np.abs(u), np.abs(v)) <= 0.9
        c2 = _contrasting_color(rng, c1)
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


# ----------------------------------------------------------------------------------------------
# clutter
# ----------------------------------------------------------------------------------------------


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    base = rng.uniform(30.0, 225.0, 3).astype(np.float32)
    g = int(rng.integers(2, 6))
    low = _upsample(rng.normal(0.0, rng.uniform(15.0, 55.0), (g, g, 3)).astype(np.float32), h, w)
    gm = int(rng.integers(10, 28))
    mid_gray = rng.normal(0.0, rng.uniform(4.0, 20.0), (gm, gm, 1)).astype(np.float32)
    mid = _upsample(mid_gray, h, w)
    bg = base + low + mid
    if rng.random() < 0.3:
        period = rng.uniform(12.0, 60.0)
        ang = rng.uniform(0.0, math.pi)
        x = np.arange(w, dtype=np.float32)[None, :]
        y = np.arange(h, dtype=np.float32)[:, None]
        wave = np.sin(2 * math.pi * (x * math.cos(ang) + y * math.sin(ang)) / period + rng.uniform(0, 6.3))
        bg = bg + wave[..., None] * rng.uniform(-14.0, 14.0, 3).astype(np.float32)
    return np.clip(bg, 0.0, 255.0).astype(np.float32)


def _draw_blob(rng: np.random.Generator, img: np.ndarray) -> None:
    h, w = img.shape[:2]
    r = math.exp(rng.uniform(math.log(4.0), math.log(40.0)))
    cx, cy = rng.uniform(0, w), rng.uniform(0, h)
    win = _Window(cx, cy, 1.8 * r + 1, h, w)
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
    win = _Window(float(c[0]), float(c[1]), float(np.linalg.norm(p1 - p0)) / 2.0 + width + 1, h, w)
    if win.empty:
        return
    d = p1 - p0
    L2 = max(float(d @ d), 1e-6)
    px, py = win.dx + c[0] - p0[0], win.dy + c[1] - p0[1]
    t = np.clip((px * d[0] + py * d[1]) / L2, 0.0, 1.0)
    dist2 = (px - t * d[0]) ** 2 + (py - t * d[1]) ** 2
    mask = (dist2 <= (width / 2.0) ** 2)[win.loc]
    img[win.img][mask] = color


def _draw_line(rng: np.random.Generator, img: np.ndarray, max_width: float = 2.5) -> None:
    h, w = img.shape[:2]
    p0 = np.array([rng.uniform(0, w), rng.uniform(0, h)])
    ang = rng.uniform(0.0, 2.0 * math.pi)
    length = rng.uniform(10.0, 0.8 * max(h, w))
    p1 = p0 + length * np.array([math.cos(ang), math.sin(ang)])
    _draw_segment(img, p0, p1, rng.uniform(1.0, max_width), rng.uniform(0.0, 255.0, 3).astype(np.float32))


def _draw_arc(rng: np.random.Generator, img: np.ndarray) -> None:
    """An open ring sector (never more than 200 degrees), a hard negative for the ring class."""
    h, w = img.shape[:2]
    r = math.exp(rng.uniform(math.log(5.0), math.log(40.0)))
    cx, cy = rng.uniform(0, w), rng.uniform(0, h)
    win = _Window(cx, cy, r + 1, h, w)
    if win.empty:
        return
    t = rng.uniform(0.15, 0.4)
    rad = np.sqrt(win.dx ** 2 + win.dy ** 2) / r
    phi = np.mod(np.arctan2(win.dy, win.dx) - rng.uniform(0, 2 * math.pi), 2 * math.pi)
    mask = ((rad <= 1.0) & (rad >= 1.0 - t) & (phi <= math.radians(rng.uniform(60, 200))))[win.loc]
    img[win.img][mask] = rng.uniform(0.0, 255.0, 3).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# one image
# ----------------------------------------------------------------------------------------------


def _image_rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), _SPLIT_IDS[split], int(index)])


def render_image(seed: int, split: str, index: int, min_side: int = 160, max_side: int = 224
                 ) -> tuple[np.ndarray, list[dict]]:
    """Renders image ``index`` of ``split``: returns (uint8 HxWx3 array, objects).

    Each object is ``{"category_id", "bbox" [x, y, w, h] (floats, tight to the visible pixels),
    "area" (box area w * h)}``.
    """
    img, objects, _ = _render(seed, split, index, min_side, max_side)
    return img, objects


def _render(seed: int, split: str, index: int, min_side: int, max_side: int
            ) -> tuple[np.ndarray, list[dict], np.ndarray]:
    """As :func:`render_image`, plus the (H, W) int32 map of which object owns each pixel
    (-1: none; ``k``: the k-th returned object)."""
    rng = _image_rng(seed, split, index)
    w = int(rng.integers(min_side, max_side + 1))
    h = int(rng.integers(min_side, max_side + 1))
    img = _background(rng, h, w)

    # clutter underneath the objects
    for _ in range(int(rng.integers(0, 3))):
        _draw_blob(rng, img)
    for _ in range(int(rng.integers(0, 2))):
        _draw_arc(rng, img)
    for _ in range(int(rng.integers(0, 3))):
        _draw_line(rng, img)

    empty = index % EMPTY_EVERY == EMPTY_EVERY - 1
    n_target = 0 if empty else int(rng.integers(1, _MAX_OBJECTS + 1))
    owner = np.full((h, w), -1, dtype=np.int32)
    placed: list[dict] = []  # cls, win, full, visible
    max_size = min(_MAX_SIZE, _MAX_SIZE_FRAC * min(h, w))
    log_lo, log_hi = math.log(_MIN_SIZE), math.log(max_size)

    # largest first, so big objects are not rejected for hiding earlier small ones
    sizes = sorted((math.exp(rng.uniform(log_lo, log_hi)) for _ in range(n_target)), reverse=True)
    for size in sizes:
        cls_id = int(rng.integers(0, len(CLASSES)))
        floor = _CLASS_MIN_SIZE[CLASSES[cls_id]]
        size = max(size, floor)
        for attempt in range(9):
            if attempt and attempt % 3 == 0:  # crowded image: shrink
                size = max(floor, size * 0.7)
            cx, cy = rng.uniform(0, w), rng.uniform(0, h)
            win = _Window(cx, cy, 0.75 * size + 2, h, w)
            if win.empty:
                continue
            ref = img[win.img].reshape(-1, 3).mean(axis=0)
            mask_full, colors = _object_pixels(rng, CLASSES[cls_id], win, size, ref)
            full = int(mask_full.sum())
            mask = mask_full[win.loc]
            inside = int(mask.sum())
            if full == 0 or inside < _MIN_VISIBLE_PX or inside < _MIN_INSIDE_FRAC * full:
                continue
            if placed:
                under = owner[win.img][mask]
                covered = np.bincount(under[under >= 0], minlength=len(placed))
                if any(p["visible"] - covered[j] < max(_MIN_VISIBLE_FRAC * p["inside"], 0.4 * p["full"])
                       for j, p in enumerate(placed)):
                    continue
                for j, p in enumerate(placed):
                    p["visible"] -= int(covered[j])
            img[win.img][mask] = colors[win.loc][mask]
            owner[win.img][mask] = len(placed)
            placed.append({"cls": cls_id, "win": win, "full": full, "inside": inside, "visible": inside})
            break

    # thin occluders over the objects (not annotated, do not change the boxes)
    for _ in range(int(rng.integers(0, 3))):
        _draw_line(rng, img, max_width=1.5)

    if rng.random() < 0.6:
        img = _gaussian_blur(img, rng.uniform(0.4, 1.0))
    img = img + rng.normal(0.0, rng.uniform(1.0, 7.0), img.shape).astype(np.float32)
    out = np.clip(np.rint(img), 0, 255).astype(np.uint8)

    objects = []
    final_owner = np.full_like(owner, -1)
    for k, p in enumerate(placed):
        vis = owner[p["win"].img] == k
        ys = np.flatnonzero(vis.any(axis=1))
        xs = np.flatnonzero(vis.any(axis=0))
        if len(ys) == 0:  # pragma: no cover - prevented by the visibility check
            continue
        oy, ox = p["win"].origin
        x0, x1 = ox + int(xs[0]), ox + int(xs[-1]) + 1
        y0, y1 = oy + int(ys[0]), oy + int(ys[-1]) + 1
        if x1 - x0 < _MIN_BOX_SIDE or y1 - y0 < _MIN_BOX_SIDE:
            continue
        objects.append({
            "category_id": p["cls"] + 1,
            "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
            "area": float((x1 - x0) * (y1 - y0)),
        })
        final_owner[p["win"].img][vis] = len(objects) - 1
    return out, objects, final_owner


# ----------------------------------------------------------------------------------------------
# dataset
# ----------------------------------------------------------------------------------------------


def _params(num_train: int, num_val: int, seed: int, min_side: int, max_side: int) -> dict:
    return {
        "generator": "defeat_cache.data.shapes",
        "version": GENERATOR_VERSION,
        "seed": int(seed),
        "num_train": int(num_train),
        "num_val": int(num_val),
        "min_side": int(min_side),
        "max_side": int(max_side),
    }


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    return json.dumps(str(v))  # JSON string escaping is valid TOML basic-string escaping


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _is_complete(out_dir: Path, params: dict) -> bool:
    toml_path = out_dir / "data.toml"
    try:
        with open(toml_path, "rb") as f:
            recorded = tomllib.load(f).get("generator")
    except (OSError, tomllib.TOMLDecodeError):
        return False
    if recorded != params:
        return False
    for split, n in (("train", params["num_train"]), ("val", params["num_val"])):
        if not (out_dir / "annotations" / f"{split}.json").is_file():
            return False
        if n > 0 and not (out_dir / "images" / split / f"{n - 1:06d}.png").is_file():
            return False
    return True


def generate_shapes(out_dir: str | Path, num_train: int = 1200, num_val: int = 200, seed: int = 0,
                    min_side: int = 160, max_side: int = 224, progress: bool = True) -> Path:
    """Writes the dataset and returns the path of its dataset TOML (out_dir/data.toml). Idempotent:
    if out_dir/data.toml exists and its recorded generation parameters match, returns it without regenerating."""
    if not (0 < min_side <= max_side):
        raise ValueError(f"need 0 < min_side <= max_side, got {min_side}, {max_side}")
    if min_side < 32:
        raise ValueError("min_side must be at least 32")
    if num_train < 0 or num_val < 0:
        raise ValueError("num_train and num_val must be >= 0")
    out_dir = Path(out_dir)
    toml_path = out_dir / "data.toml"
    params = _params(num_train, num_val, seed, min_side, max_side)
    if _is_complete(out_dir, params):
        return toml_path

    if toml_path.exists():
        toml_path.unlink()  # mark incomplete while (re)generating
    (out_dir / "annotations").mkdir(parents=True, exist_ok=True)
    categories = [{"id": k + 1, "name": name, "supercategory": "shape"} for k, name in enumerate(CLASSES)]
    total = num_train + num_val
    done = 0
    t0 = time.monotonic()
    for split, n in (("train", num_train), ("val", num_val)):
        img_dir = out_dir / "images" / split
        img_dir.mkdir(parents=True, exist_ok=True)
        keep = {f"{i:06d}.png" for i in range(n)}
        for stale in img_dir.glob("[0-9][0-9][0-9][0-9][0-9][0-9].png"):
            if stale.name not in keep:  # left over from a larger earlier generation
                stale.unlink()
        images, annotations = [], []
        for i in range(n):
            arr, objects = render_image(seed, split, i, min_side, max_side)
            name = f"{i:06d}.png"
            Image.fromarray(arr, "RGB").save(img_dir / name, format="PNG", compress_level=1)
            image_id = i + 1
            images.append({"id": image_id, "file_name": f"{split}/{name}",
                           "width": int(arr.shape[1]), "height": int(arr.shape[0])})
            for obj in objects:
                annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                    "category_id": obj["category_id"], "bbox": obj["bbox"],
                                    "area": obj["area"], "iscrowd": 0})
            done += 1
            if progress and (done % 50 == 0 or done == total):
                print(f"\rshapes: {done}/{total} images ({time.monotonic() - t0:.1f}s)",
                      end="\n" if done == total else "", file=sys.stderr, flush=True)
        coco = {
            "info": {"description": f"defeat-cache synthetic shapes ({split})",
                     "version": str(GENERATOR_VERSION), **{k: v for k, v in params.items() if k != "version"}},
            "images": images,
            "annotations": annotations,
            "categories": categories,
        }
        _write_atomic(out_dir / "annotations" / f"{split}.json",
                      json.dumps(coco, separators=(",", ":")).encode())

    lines = [
        "# Synthetic shapes dataset written by defeat_cache.data.shapes.generate_shapes.",
        "# Paths are relative to this file's folder.",
        'format = "coco"',
        'name = "shapes"',
        "",
    ]
    for split in _SPLITS:
        lines += [f"[{split}]", f'annotations = "annotations/{split}.json"', 'images = "images"', ""]
    lines.append("[generator]  # parameters used; regeneration is skipped when they match")
    lines += [f"{k} = {_toml_value(v)}" for k, v in params.items()]
    _write_atomic(toml_path, ("\n".join(lines) + "\n").encode())
    return toml_path


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Generate the synthetic shapes detection dataset.")
    ap.add_argument("out_dir")
    ap.add_argument("--num-train", type=int, default=1200)
    ap.add_argument("--num-val", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--min-side", type=int, default=160)
    ap.add_argument("--max-side", type=int, default=224)
    a = ap.parse_args(argv)
    print(generate_shapes(a.out_dir, a.num_train, a.num_val, a.seed, a.min_side, a.max_side))


if __name__ == "__main__":
    main()
