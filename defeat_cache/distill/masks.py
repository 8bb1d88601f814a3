"""Imitation masks for DeFeat feature distillation (docs/method.md: GT-Mask, Other imitation masks, Backbone distillation).

Boxes are xyxy floats in the pixel coordinates of the (batch-padded) canvas the features
were computed on. Every per-image builder returns a float32 [H, W] tensor on the boxes'
device; batch helpers return [B, H, W] per level. Level index 0 is the finest level.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import box_iou

__all__ = [
    "FINEST_SCALE",
    "MASK_KINDS",
    "assign_levels",
    "gt_mask",
    "gaussian_mask",
    "fgfi_mask",
    "random_mask",
    "full_mask",
    "backbone_gt_mask",
    "build_level_masks",
]

FINEST_SCALE = 56.0
MASK_KINDS = ("gt", "fgfi", "gaussian", "random", "all")


def _boxes2d(boxes: Tensor) -> Tensor:
    boxes = torch.as_tensor(boxes)
    if boxes.numel() == 0:
        return boxes.reshape(0, 4).float()
    if boxes.dim() != 2 or boxes.shape[-1] != 4:
        raise ValueError(f"boxes must be [N, 4], got {tuple(boxes.shape)}")
    return boxes.float()


def assign_levels(boxes: Tensor, num_levels: int, finest_scale: float = FINEST_SCALE) -> Tensor:
    """FPN level of each box: floor(log2(sqrt((w+1)(h+1)) / 56 + 1e-6)), clamped to [0, L-1]."""
    boxes = _boxes2d(boxes)
    if boxes.shape[0] == 0:
        return torch.zeros(0, dtype=torch.long, device=boxes.device)
    w = boxes[:, 2] - boxes[:, 0] + 1
    h = boxes[:, 3] - boxes[:, 1] + 1
    scale = torch.sqrt(w * h)
    lvl = torch.floor(torch.log2(scale / finest_scale + 1e-6))
    return lvl.clamp(min=0, max=num_levels - 1).long()


def _cell_range(box: Sequence[float], stride: float, H: int, W: int) -> tuple[int, int, int, int, bool]:
    """Integer cell range of a box on a grid of the given stride (docs/method.md#box-to-cells).

    lx = int(x1/s), rx = min(int(x2/s), W), ly = int(y1/s), ry = min(int(y2/s), H)
    (lower ends clamped at 0). Returns (ly, ry, lx, rx, collapsed); when collapsed, the single
    cell (ly, lx) -- clamped into the grid -- is the one to mark.
    """
    x1, y1, x2, y2 = (float(v) for v in box)
    lx = max(int(x1 / stride), 0)
    ly = max(int(y1 / stride), 0)
    rx = min(int(x2 / stride), W)
    ry = min(int(y2 / stride), H)
    collapsed = rx <= lx or ry <= ly
    if collapsed:
        ly = min(ly, H - 1)
        lx = min(lx, W - 1)
    return ly, ry, lx, rx, collapsed


def _level_boxes(boxes: Tensor, level: int, num_levels: int, finest_scale: float = FINEST_SCALE) -> Tensor:
    boxes = _boxes2d(boxes)
    if boxes.shape[0] == 0:
        return boxes
    return boxes[assign_levels(boxes, num_levels, finest_scale) == level]


def _mark_boxes(boxes: Tensor, stride: float, size: tuple[int, int]) -> Tensor:
    """Binary mask of all given boxes on one grid (no level selection)."""
    boxes = _boxes2d(boxes)
    H, W = int(size[0]), int(size[1])
    mask = torch.zeros(H, W, dtype=torch.float32)
    if H > 0 and W > 0:
        for box in boxes.detach().cpu().tolist():
            ly, ry, lx, rx, collapsed = _cell_range(box, stride, H, W)
            if collapsed:
                mask[ly, lx] = 1.0
            else:
                mask[ly:ry, lx:rx] = 1.0
    return mask.to(boxes.device)


def gt_mask(boxes: Tensor, level: int, num_levels: int, stride: float, size: tuple[int, int],
            finest_scale: float = FINEST_SCALE) -> Tensor:
    """GT-Mask of one image at one level (docs/method.md#neck-distillation): boxes assigned to this level only."""
    return _mark_boxes(_level_boxes(boxes, level, num_levels, finest_scale), stride, size)


def gaussian_mask(boxes: Tensor, level: int, num_levels: int, stride: float, size: tuple[int, int],
                  finest_scale: float = FINEST_SCALE) -> Tensor:
    """Gaussian-Mask (TADF, docs/method.md#gaussian-mask) of one image at one level.

    For each level-assigned box, on the cells of its GT-Mask rectangle, the value at cell centre
    (j + 0.5, i + 0.5) (level units) is exp(-(dx^2 / (2 sx^2) + dy^2 / (2 sy^2))), centred at the
    stride-scaled box centre with sx, sy = half the stride-scaled box width / height. Overlaps take
    the element-wise max. A box collapsing to one cell marks that cell with 1 (its peak).
    """
    lb = _level_boxes(boxes, level, num_levels, finest_scale)
    H, W = int(size[0]), int(size[1])
    mask = torch.zeros(H, W, dtype=torch.float64)
    if H > 0 and W > 0:
        s = float(stride)
        for box in lb.detach().cpu().tolist():
            ly, ry, lx, rx, collapsed = _cell_range(box, s, H, W)
            if collapsed:
                mask[ly, lx] = 1.0
                continue
            x1, y1, x2, y2 = (v / s for v in box)
            x0, y0 = 0.5 * (x1 + x2), 0.5 * (y1 + y2)
            sx, sy = 0.5 * (x2 - x1), 0.5 * (y2 - y1)  # > 0 for a non-collapsed box
            xs = torch.arange(lx, rx, dtype=torch.float64) + 0.5
            ys = torch.arange(ly, ry, dtype=torch.float64) + 0.5
            gx = torch.exp(-((xs - x0) ** 2) / (2.0 * sx * sx))
            gy = torch.exp(-((ys - y0) ** 2) / (2.0 * sy * sy))
            g = gy[:, None] * gx[None, :]
            mask[ly:ry, lx:rx] = torch.maximum(mask[ly:ry, lx:rx], g)
    return mask.to(dtype=torch.float32, device=lb.device)


def fgfi_mask(
    boxes: Tensor,
    level: int,
    num_levels: int,
    anchors: Tensor,
    size: tuple[int, int],
    num_anchors_per_cell: int,
    psi: float = 0.5,
    finest_scale: float = FINEST_SCALE,
) -> Tensor:
    """FG-Mask (FGFI, docs/method.md#fg-mask) of one image at one level.

    anchors: [H*W*A, 4] pixel-coordinate anchors of this level in torchvision AnchorGenerator
    order (row-major cells, the A anchors of a cell contiguous). For every box assigned to this
    level, anchors with IoU > psi * (max IoU of that box over the level's anchors) are selected;
    a cell is masked when any of its anchors is selected.
    """
    H, W = int(size[0]), int(size[1])
    A = int(num_anchors_per_cell)
    anchors = torch.as_tensor(anchors).reshape(-1, 4).float()
    if anchors.shape[0] != H * W * A:
        raise ValueError(f"expected H*W*A = {H}*{W}*{A} = {H * W * A} anchors, got {anchors.shape[0]}")
    lb = _level_boxes(boxes, level, num_levels, finest_scale)
    out_device = lb.device
    if lb.shape[0] == 0 or anchors.shape[0] == 0:
        return torch.zeros(H, W, dtype=torch.float32, device=out_device)
    ious = box_iou(lb.to(anchors.device), anchors)  # [N, H*W*A]
    thresh = psi * ious.max(dim=1, keepdim=True).values
    selected = (ious > thresh).any(dim=0)
    return selected.view(H, W, A).any(dim=-1).to(dtype=torch.float32, device=out_device)


def random_mask(reference: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
    """Random binary mask with as many object cells (reference > 0) as ``reference``."""
    H, W = reference.shape[-2:]
    n = int((reference > 0).sum().item())
    flat = torch.zeros(H * W, dtype=torch.float32)
    if n > 0:
        dev = generator.device if generator is not None else torch.device("cpu")
        idx = torch.randperm(H * W, generator=generator, device=dev)[:n].cpu()
        flat[idx] = 1.0
    return flat.view(H, W).to(reference.device)


def full_mask(size: tuple[int, int], device: Optional[Union[str, torch.device]] = None) -> Tensor:
    """All-ones mask (all-neck variant)."""
    return torch.ones(int(size[0]), int(size[1]), dtype=torch.float32, device=device)


def backbone_gt_mask(
    boxes: Tensor,
    sizes: Sequence[tuple[int, int]],
    base_stride: int = 4,
    base_size: Optional[tuple[int, int]] = None,
) -> list[Tensor]:
    """Backbone mask (docs/method.md#backbone-distillation) of one image: ALL boxes on the stride-``base_stride`` grid
    (GT-Mask rounding rule, no level assignment), nearest-neighbour resized to each of ``sizes``.

    base_size: (H, W) of the stride-``base_stride`` grid (canvas / base_stride). Default: twice
    ``sizes[0]``, i.e. ``sizes[0]`` is taken to be C3 (stride 8) of a stride-4 base grid.
    """
    sizes = [(int(h), int(w)) for h, w in sizes]
    if base_size is None:
        if not sizes:
            return []
        base_size = (2 * sizes[0][0], 2 * sizes[0][1])
    base = _mark_boxes(boxes, float(base_stride), base_size)
    out = []
    for h, w in sizes:
        if (h, w) == tuple(base.shape):
            out.append(base.clone())
        else:
            out.append(F.interpolate(base[None, None], size=(h, w), mode="nearest")[0, 0])
    return out


def _per_level(value, num_levels: int, name: str) -> list:
    if isinstance(value, (list, tuple)):
        if len(value) != num_levels:
            raise ValueError(f"{name} has {len(value)} entries for {num_levels} levels")
        return list(value)
    return [value] * num_levels


def build_level_masks(
    kind: str,
    boxes_per_image: Sequence[Tensor],
    sizes: Sequence[tuple[int, int]],
    strides: Sequence[int],
    anchors_per_level: Optional[Sequence[Tensor]] = None,
    num_anchors_per_cell: Optional[Union[int, Sequence[int]]] = None,
    generator: Optional[torch.Generator] = None,
    psi: float = 0.5,
    finest_scale: float = FINEST_SCALE,
    generators: Optional[Sequence[torch.Generator]] = None,
    levels: Optional[Sequence[int]] = None,
    num_levels: Optional[int] = None,
) -> list[Tensor]:
    """Masks [B, H_l, W_l] for every level l of a batch.

    kind: "gt" (sec 1), "fgfi", "gaussian", "random" (sec 2), or "all" (all ones, all-neck).
    sizes / strides: per level (batch-padded feature sizes), finest level first.
    anchors_per_level / num_anchors_per_cell: only for "fgfi"; anchors_per_level[l] is the
    [H_l*W_l*A, 4] anchor tensor of level l (shared by all images of the padded batch);
    num_anchors_per_cell is an int or one int per level.
    "random": per image and level, the same number of object cells as the GT-Mask, at random cells,
    drawn from `generators[b]` for image b when given (else from `generator` / the global RNG).
    finest_scale: the box size assigned to the finest level (56 at the paper's 800-pixel inputs;
    smaller inputs scale it down so objects spread over the levels in the same proportion).
    levels / num_levels: the position of each given level in the pyramid boxes are assigned over,
    and that pyramid's size (default: the given levels are the whole pyramid). Neck distillation
    passes the teacher's pyramid when the student shares only some of its levels (distill/compat.py).
    """
    if kind not in MASK_KINDS:
        raise ValueError(f"unknown mask kind {kind!r}; expected one of {MASK_KINDS}")
    sizes = [(int(h), int(w)) for h, w in sizes]
    strides = list(strides)
    L = len(sizes)
    if len(strides) != L:
        raise ValueError(f"{len(strides)} strides for {L} levels")
    positions = list(range(L)) if levels is None else [int(i) for i in levels]
    if len(positions) != L:
        raise ValueError(f"{len(positions)} level positions for {L} levels")
    L_assign = L if num_levels is None else int(num_levels)
    boxes_per_image = [_boxes2d(b) for b in boxes_per_image]
    B = len(boxes_per_image)
    device = boxes_per_image[0].device if B > 0 else torch.device("cpu")

    if kind == "fgfi":
        if anchors_per_level is None or num_anchors_per_cell is None:
            raise ValueError("fgfi masks need anchors_per_level and num_anchors_per_cell")
        anchors_per_level = _per_level(anchors_per_level, L, "anchors_per_level")
        num_a = _per_level(num_anchors_per_cell, L, "num_anchors_per_cell")

    out = []
    for i, ((H, W), s) in enumerate(zip(sizes, strides)):
        if kind == "all":
            out.append(torch.ones(B, H, W, dtype=torch.float32, device=device))
            continue
        lvl = positions[i]
        per_img = []
        for b, boxes in enumerate(boxes_per_image):
            if kind == "gt":
                m = gt_mask(boxes, lvl, L_assign, s, (H, W), finest_scale)
            elif kind == "gaussian":
                m = gaussian_mask(boxes, lvl, L_assign, s, (H, W), finest_scale)
            elif kind == "fgfi":
                m = fgfi_mask(boxes, lvl, L_assign, anchors_per_level[i], (H, W), num_a[i], psi=psi,
                              finest_scale=finest_scale)
            else:  # random
                g = generators[b] if generators is not None else generator
                m = random_mask(gt_mask(boxes, lvl, L_assign, s, (H, W), finest_scale), generator=g)
            per_img.append(m.to(device))
        if per_img:
            out.append(torch.stack(per_img))
        else:
            out.append(torch.zeros(0, H, W, dtype=torch.float32, device=device))
    return out
