"""Images with their detections drawn: boxes, class names and scores (PIL ImageDraw)."""

from __future__ import annotations

import colorsys
import zlib
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont


def class_colour(name: str) -> tuple[int, int, int]:
    """A bright colour per class name, the same in every image and run."""
    hue = (zlib.crc32(name.encode()) % 360) / 360.0
    r, g, b = colorsys.hsv_to_rgb(hue, 0.85, 1.0)
    return int(r * 255), int(g * 255), int(b * 255)


def draw_detections(image: torch.Tensor, detections: list[tuple[list[float], str, float]], path: Path) -> Path:
    """Writes `image` (uint8 RGB [3, H, W]) with each (xyxy box, class name, score) drawn, as PNG."""
    im = Image.fromarray(image.permute(1, 2, 0).numpy())
    draw = ImageDraw.Draw(im)
    font = ImageFont.load_default()
    width = max(1, round(min(im.size) / 200))
    for box, name, score in sorted(detections, key=lambda d: d[2]):  # best drawn last, on top
        colour = class_colour(name)
        draw.rectangle(box, outline=colour, width=width)
        text = f"{name} {score:.2f}"
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        x, y = box[0], max(0.0, box[1] - (bottom - top) - 2)
        draw.rectangle([x, y, x + right - left + 2, y + bottom - top + 2], fill=colour)
        draw.text((x + 1, y + 1 - top), text, fill=(0, 0, 0), font=font)
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path)
    return path


__all__ = ["class_colour", "draw_detections"]
