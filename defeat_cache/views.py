"""Views: the one place where an image becomes a model input.

A *view* is a deterministic preprocessing of one image: resize so the shorter side is
`min_size` unless the longer side would exceed `max_size`, optionally flip horizontally,
normalise, and pad to a multiple of `size_divisible`. The teacher cache is written per
(image, view) and the student rebuilds exactly the same input from the manifest's
`Preprocessing`, so nothing here may depend on anything but its arguments.

Batching is not done here: the models pad a batch with torchvision's own
`GeneralizedRCNNTransform.batch_images` (through models.zoo.ViewTransform), zero after
normalisation, to a multiple of `size_divisible`, so an image alone fills its `canvas_size`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from .errors import UserError

# Names of the views a cache can hold; index order is the cache's view order.
VIEW_NAMES = ("orig", "hflip")


@dataclass(frozen=True)
class Preprocessing:
    min_size: int = 800
    max_size: int = 1333
    mean: tuple[float, float, float] = (123.675, 116.28, 103.53)  # RGB, 0..255 scale
    std: tuple[float, float, float] = (58.395, 57.12, 57.375)
    size_divisible: int = 32

    def to_dict(self) -> dict:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocessing":
        return cls(
            min_size=int(d["min_size"]),
            max_size=int(d["max_size"]),
            mean=tuple(float(v) for v in d["mean"]),
            std=tuple(float(v) for v in d["std"]),
            size_divisible=int(d["size_divisible"]),
        )


@dataclass(frozen=True)
class ViewGeometry:
    """Where one view puts an image: sizes and the transform from original pixels."""

    orig_size: tuple[int, int]  # (h, w) of the decoded image
    image_size: tuple[int, int]  # (h, w) after resize
    canvas_size: tuple[int, int]  # image_size padded to size_divisible (what the model sees alone)
    scale: tuple[float, float]  # (sy, sx): resized / original
    flip: bool

    def boxes_to_view(self, boxes: torch.Tensor) -> torch.Tensor:
        """Original-pixel xyxy boxes -> this view's pixel coordinates."""
        sy, sx = self.scale
        out = boxes.to(torch.float32) * torch.tensor([sx, sy, sx, sy], dtype=torch.float32)
        if self.flip:
            w = float(self.image_size[1])
            out = torch.stack([w - out[:, 2], out[:, 1], w - out[:, 0], out[:, 3]], dim=1)
        return out

    def boxes_to_original(self, boxes: torch.Tensor) -> torch.Tensor:
        """Inverse of boxes_to_view (used to report detections in dataset coordinates)."""
        out = boxes.to(torch.float32)
        if self.flip:
            w = float(self.image_size[1])
            out = torch.stack([w - out[:, 2], out[:, 1], w - out[:, 0], out[:, 3]], dim=1)
        sy, sx = self.scale
        return out / torch.tensor([sx, sy, sx, sy], dtype=torch.float32)


def _round_up(x: int, d: int) -> int:
    return int(math.ceil(x / d) * d)


def view_geometry(orig_size: tuple[int, int], pre: Preprocessing, flip: bool) -> ViewGeometry:
    h, w = orig_size
    scale = min(pre.min_size / min(h, w), pre.max_size / max(h, w))
    rh, rw = max(1, int(round(h * scale))), max(1, int(round(w * scale)))
    canvas = (_round_up(rh, pre.size_divisible), _round_up(rw, pre.size_divisible))
    return ViewGeometry(orig_size=(h, w), image_size=(rh, rw), canvas_size=canvas,
                        scale=(rh / h, rw / w), flip=flip)


def apply_view(image: torch.Tensor, pre: Preprocessing, flip: bool) -> tuple[torch.Tensor, ViewGeometry]:
    """uint8 [3, H, W] RGB image -> (normalised float32 [3, h, w] unpadded, geometry)."""
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"expected an RGB image [3, H, W], got shape {tuple(image.shape)}")
    geom = view_geometry((int(image.shape[1]), int(image.shape[2])), pre, flip)
    x = image.to(torch.float32).unsqueeze(0)
    if geom.image_size != geom.orig_size:
        # float64: float32 bilinear results depend on torch's thread count, and a view must
        # depend only on its arguments (DataLoader workers run single-threaded).
        x = F.interpolate(x.double(), size=geom.image_size, mode="bilinear", align_corners=False).float()
    x = x[0]
    if flip:
        x = x.flip(-1)
    mean = torch.tensor(pre.mean, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(pre.std, dtype=torch.float32).view(3, 1, 1)
    return (x - mean) / std, geom


@dataclass
class ViewSet:
    """The views a cache holds or training samples from, by name (e.g. "orig,hflip")."""

    names: tuple[str, ...] = field(default_factory=lambda: VIEW_NAMES)

    @classmethod
    def parse(cls, text: str) -> "ViewSet":
        names = tuple(n.strip() for n in str(text).split(",") if n.strip())
        known = ", ".join(VIEW_NAMES)
        bad = [n for n in names if n not in VIEW_NAMES]
        if bad:
            raise UserError(f"--views {text!r}: unknown view {bad[0]!r}; the views are {known} (comma-separated)")
        twice = [n for n in names if names.count(n) > 1]
        if twice:
            raise UserError(f"--views {text!r}: view {twice[0]!r} given twice; give each of {known} at most once")
        if not names:
            raise UserError(f"--views {text!r}: no view given; the views are {known} (comma-separated)")
        return cls(names)

    def flip(self, index: int) -> bool:
        return self.names[index] == "hflip"

    def __len__(self) -> int:
        return len(self.names)
