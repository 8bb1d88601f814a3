"""Renders one image of the shapes dataset: background and clutter, objects placed under the
occlusion and truncation rules, blur and pixel noise, and the objects' tight boxes.

Content
-------
* 8 classes that differ by shape and texture (:data:`CLASSES`, drawn by ``shapes_objects``):
  circle, ring, square, triangle, cross, star (solid fills with mild shading), striped_rect
  (two-colour stripes on an elongated rectangle) and checker (two-colour checkerboard square).
  Colours are random per object, so colour never identifies a class; they are only chosen to
  contrast with the local background.
* Objects are rotated, mildly anisotropic and log-uniformly sized (nominal extent 16 px up to
  128 px, capped at 0.85 x the shorter image side; per-class floors of 16-21 px keep the shape or
  texture recognisable), so the COCO small / medium / large buckets are all populated; 1-6 per
  image, placed largest first; partial occlusion (every object keeps at least 60 % of its in-image
  pixels) and truncation at the image border (at least 50 % inside) are allowed.
* Clutter that is not annotated (``shapes_clutter``): multi-scale noise backgrounds, sometimes
  faint waves, irregular blobs, open arcs and line segments (some drawn over objects), then mild
  blur and pixel noise.
* Every ``EMPTY_EVERY``-th image (index % 30 == 29, about 3 %) contains no objects.

Boxes are tight to the object pixels that remain visible after occlusion and clipping (measured
before the final blur, which spreads edges by about one pixel). ``area`` is the box area ``w * h``
(there are no segmentations), so COCOeval's small / medium / large buckets (32**2, 96**2) refer to
box size, consistently with how it measures detections. With the defaults (160-224 px images),
about 39 % of the objects are small, 54 % medium and 7 % large; 3.7 objects per image on average.

Determinism: image ``i`` of split ``s`` is drawn from ``numpy.random.default_rng([seed, s, i])``,
so splits are independent, and the first N images do not depend on ``num_train`` / ``num_val``.
"""

from __future__ import annotations

import math

import numpy as np

from .shapes_canvas import Window, gaussian_blur
from .shapes_clutter import background, draw_arc, draw_blob, draw_line
from .shapes_objects import CLASSES, object_pixels

#: Bump whenever the rendered content changes, so cached datasets are regenerated.
GENERATOR_VERSION = 2

#: Image ``i`` is empty (no objects) when ``i % EMPTY_EVERY == EMPTY_EVERY - 1``.
EMPTY_EVERY = 30

#: The splits in the order the dataset lists them; a split's index seeds its images.
SPLITS = ("train", "val")
_SPLIT_IDS = {split: k for k, split in enumerate(SPLITS)}

# v2: objects from 16 px and less clutter, so a ResNet-18 teacher trained from scratch for
# ~800 CPU iterations reaches a clearly useful AP (v1's 8-px objects kept it near 8 AP).
_MIN_SIZE = 16.0  # nominal object extent, px
# per-class floor on the nominal extent, so the defining shape / texture stays recognisable
_CLASS_MIN_SIZE = {"circle": 16.0, "square": 16.0, "triangle": 17.0, "ring": 17.0, "cross": 18.0,
                   "star": 19.0, "striped_rect": 20.0, "checker": 21.0}
_MAX_SIZE = 128.0
_MAX_SIZE_FRAC = 0.85  # of the shorter image side
_MAX_OBJECTS = 6
_MIN_VISIBLE_FRAC = 0.6  # of an object's in-image pixels must stay visible under later objects
_MIN_INSIDE_FRAC = 0.5  # of an object's pixels must lie inside the image
_MIN_VISIBLE_PX = 12
_MIN_BOX_SIDE = 3


def _image_rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), _SPLIT_IDS[split], int(index)])


def render_image(seed: int, split: str, index: int, min_side: int = 160, max_side: int = 224
                 ) -> tuple[np.ndarray, list[dict]]:
    """Renders image ``index`` of ``split``: returns (uint8 HxWx3 array, objects).

    Each object is ``{"category_id", "bbox" [x, y, w, h] (floats, tight to the visible pixels),
    "area" (box area w * h)}``.
    """
    img, objects, _ = render_with_owners(seed, split, index, min_side, max_side)
    return img, objects


def render_with_owners(seed: int, split: str, index: int, min_side: int, max_side: int
            ) -> tuple[np.ndarray, list[dict], np.ndarray]:
    """As :func:`render_image`, plus the (H, W) int32 map of which object owns each pixel
    (-1: none; ``k``: the k-th returned object)."""
    rng = _image_rng(seed, split, index)
    w = int(rng.integers(min_side, max_side + 1))
    h = int(rng.integers(min_side, max_side + 1))
    img = background(rng, h, w)

    # clutter underneath the objects
    for _ in range(int(rng.integers(0, 3))):
        draw_blob(rng, img)
    for _ in range(int(rng.integers(0, 2))):
        draw_arc(rng, img)
    for _ in range(int(rng.integers(0, 3))):
        draw_line(rng, img)

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
            win = Window(cx, cy, 0.75 * size + 2, h, w)
            if win.empty:
                continue
            ref = img[win.img].reshape(-1, 3).mean(axis=0)
            mask_full, colors = object_pixels(rng, CLASSES[cls_id], win, size, ref)
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
        draw_line(rng, img, max_width=1.5)

    if rng.random() < 0.6:
        img = gaussian_blur(img, rng.uniform(0.4, 1.0))
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
