"""Tests for defeat_cache.distill.masks against hand-worked boxes."""

import math

import pytest
import torch

from defeat_cache.distill.masks import (
    assign_levels,
    backbone_gt_mask,
    build_level_masks,
    fgfi_mask,
    full_mask,
    gaussian_mask,
    gt_mask,
    random_mask,
)


def B(*rows):
    return torch.tensor(rows, dtype=torch.float32).reshape(-1, 4)


# ----------------------------------------------------------------------------- levels
def test_assign_levels_hand_worked():
    boxes = B(
        [0, 0, 9, 9],        # sqrt(10*10)=10 -> log2(10/56) < 0 -> 0
        [0, 0, 55, 55],      # 56 -> log2(1) = 0 -> 0
        [0, 0, 110, 110],    # 111 -> log2(1.98) -> 0
        [0, 0, 111, 111],    # 112 -> log2(2) = 1 (1e-6 keeps it from flooring to 0)
        [0, 0, 223, 223],    # 224 -> 2
        [0, 0, 447, 447],    # 448 -> 3
        [0, 0, 895, 895],    # 896 -> 4 -> clamped to 3 with 4 levels
        [0, 0, 2000, 2000],  # huge -> clamped
        [10, 10, 10, 10],    # degenerate, sqrt(1) -> 0
    )
    assert assign_levels(boxes, 4).tolist() == [0, 0, 0, 1, 2, 3, 3, 3, 0]
    assert assign_levels(boxes, 5).tolist() == [0, 0, 0, 1, 2, 3, 4, 4, 0]
    assert assign_levels(boxes[:0], 5).numel() == 0


# ----------------------------------------------------------------------------- GT mask
def test_gt_mask_cells_on_assigned_level():
    # small box (level 0, stride 4): x 5..18 -> lx=int(1.25)=1, rx=int(4.5)=4; y 9..30 -> ly=2, ry=7
    small = [5.0, 9.0, 18.0, 30.0]
    # large box 0..159 x 0..127 -> sqrt(160*128)=143 -> level 1 (stride 8): lx=0, rx=int(19.875)=19
    large = [0.0, 0.0, 159.0, 127.0]
    boxes = B(small, large)
    m0 = gt_mask(boxes, 0, 3, 4, (10, 12))
    exp0 = torch.zeros(10, 12)
    exp0[2:7, 1:4] = 1
    assert m0.dtype == torch.float32
    assert torch.equal(m0, exp0)
    m1 = gt_mask(boxes, 1, 3, 8, (20, 22))
    exp1 = torch.zeros(20, 22)
    exp1[0:15, 0:19] = 1  # ry = int(127/8) = 15
    assert torch.equal(m1, exp1)
    # nothing on level 2: pure background
    assert gt_mask(boxes, 2, 3, 16, (10, 11)).sum().item() == 0
    # no boxes at all
    assert torch.equal(gt_mask(B(), 0, 3, 4, (3, 4)), torch.zeros(3, 4))


def test_gt_mask_collapsed_box_marks_single_cell():
    # 9..11 / 4 -> lx=2, rx=2: zero width -> single cell (ly, lx)
    boxes = B([9.0, 21.0, 11.0, 40.0])  # ly = 5, ry = 10, but width collapses
    m = gt_mask(boxes, 0, 5, 4, (16, 16))
    exp = torch.zeros(16, 16)
    exp[5, 2] = 1
    assert torch.equal(m, exp)
    # collapsing in height only also marks the single cell
    m = gt_mask(B([0.0, 13.0, 30.0, 15.0]), 0, 5, 4, (16, 16))
    exp = torch.zeros(16, 16)
    exp[3, 0] = 1
    assert torch.equal(m, exp)


def test_gt_mask_clamps_to_grid():
    # box extends past the grid: rx = min(int(50/4), W=5) = 5, ry = min(int(30/4), H=4) = 4
    m = gt_mask(B([8.0, 4.0, 50.0, 30.0]), 0, 5, 4, (4, 5))
    exp = torch.zeros(4, 5)
    exp[1:4, 2:5] = 1
    assert torch.equal(m, exp)
    # box starting at the grid's edge collapses and is clamped into the grid
    m = gt_mask(B([20.0, 16.0, 24.0, 30.0]), 0, 5, 4, (4, 5))
    exp = torch.zeros(4, 5)
    exp[3, 4] = 1
    assert torch.equal(m, exp)


# ----------------------------------------------------------------------------- Gaussian
def test_gaussian_mask_values():
    # level 0, stride 4: box 4..16 -> level coords 1..4, centre 2.5, sigma 1.5; cells 1,2,3
    box = [4.0, 8.0, 16.0, 20.0]  # y: 2..5, centre 3.5, sigma 1.5; cells 2,3,4
    m = gaussian_mask(B(box), 0, 5, 4, (8, 8))
    assert m.dtype == torch.float32
    for i in range(8):
        for j in range(8):
            if 2 <= i < 5 and 1 <= j < 4:
                dx, dy = (j + 0.5) - 2.5, (i + 0.5) - 3.5
                want = math.exp(-(dx * dx) / (2 * 1.5 ** 2) - (dy * dy) / (2 * 1.5 ** 2))
            else:
                want = 0.0
            assert m[i, j].item() == pytest.approx(want, abs=1e-6)
    assert m[3, 2].item() == pytest.approx(1.0)  # peak 1 at the centre cell
    assert m.max().item() <= 1.0 and m.min().item() >= 0.0
    # support equals the GT-mask support
    assert torch.equal(m > 0, gt_mask(B(box), 0, 5, 4, (8, 8)) > 0)


def test_gaussian_mask_overlap_takes_max():
    a = [0.0, 0.0, 12.0, 12.0]  # level coords 0..3, centre 1.5
    b = [8.0, 8.0, 20.0, 20.0]  # level coords 2..5, centre 3.5
    m = gaussian_mask(B(a, b), 0, 5, 4, (6, 6))
    ma = gaussian_mask(B(a), 0, 5, 4, (6, 6))
    mb = gaussian_mask(B(b), 0, 5, 4, (6, 6))
    assert torch.allclose(m, torch.maximum(ma, mb))
    assert m[1, 1].item() == pytest.approx(1.0) and m[3, 3].item() == pytest.approx(1.0)
    # overlapping cell (2,2): a gives exp(-1/(2*2.25))^2 ... both equal here by symmetry
    v = math.exp(-2 * 1.0 / (2 * 1.5 ** 2))
    assert m[2, 2].item() == pytest.approx(v, rel=1e-6)


def test_gaussian_mask_level_assignment_and_collapsed():
    big = [0.0, 0.0, 159.0, 127.0]  # level 1
    assert gaussian_mask(B(big), 0, 5, 4, (8, 8)).sum().item() == 0
    assert gaussian_mask(B(big), 1, 5, 8, (20, 22)).max().item() > 0.9
    m = gaussian_mask(B([9.0, 21.0, 11.0, 40.0]), 0, 5, 4, (16, 16))
    exp = torch.zeros(16, 16)
    exp[5, 2] = 1
    assert torch.equal(m, exp)


# ----------------------------------------------------------------------------- FGFI
def _grid_anchors(H, W, stride, sizes):
    """Anchors in torchvision order: for each cell (y, x), the A anchors (squares of given sizes)."""
    rows = []
    for y in range(H):
        for x in range(W):
            cx, cy = x * stride, y * stride
            for s in sizes:
                rows.append([cx - s / 2, cy - s / 2, cx + s / 2, cy + s / 2])
    return torch.tensor(rows)


def _iou(a, b):
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    ua = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / ua


def test_fgfi_mask_selects_max_iou_anchor_cell():
    H, W, s, sizes = 6, 6, 8, [8.0, 16.0]
    anchors = _grid_anchors(H, W, s, sizes)
    # box exactly equal to the 16px anchor of cell (y=2, x=3): centre (24, 16)
    box = [16.0, 8.0, 32.0, 24.0]
    m = fgfi_mask(B(box), 0, 5, anchors, (H, W), 2, psi=0.5)
    # hand reference with plain loops
    ious = [_iou(box, a) for a in anchors.tolist()]
    best = max(ious)
    assert best == pytest.approx(1.0)
    exp = torch.zeros(H, W)
    for k, v in enumerate(ious):
        if v > 0.5 * best:
            cell = k // 2
            exp[cell // W, cell % W] = 1
    assert torch.equal(m, exp)
    assert m[2, 3].item() == 1.0
    # a strict psi of ~1 keeps only the max-IoU anchor's cell
    m1 = fgfi_mask(B(box), 0, 5, anchors, (H, W), 2, psi=0.999)
    exp1 = torch.zeros(H, W)
    exp1[2, 3] = 1
    assert torch.equal(m1, exp1)


def test_fgfi_mask_level_and_empty_and_no_overlap():
    H, W, s = 4, 4, 8
    anchors = _grid_anchors(H, W, s, [8.0])
    # box on another level -> empty
    assert fgfi_mask(B([0.0, 0.0, 200.0, 200.0]), 0, 5, anchors, (H, W), 1).sum().item() == 0
    # box with no overlap with any anchor -> max IoU 0 -> nothing selected
    assert fgfi_mask(B([500.0, 500.0, 510.0, 510.0]), 0, 5, anchors, (H, W), 1).sum().item() == 0
    assert fgfi_mask(B(), 0, 5, anchors, (H, W), 1).sum().item() == 0
    with pytest.raises(ValueError):
        fgfi_mask(B([0.0, 0.0, 8.0, 8.0]), 0, 5, anchors, (H, W), 2)


def test_fgfi_mask_two_boxes_union():
    H, W, s = 5, 5, 8
    anchors = _grid_anchors(H, W, s, [8.0])
    boxes = [[4.0, 4.0, 12.0, 12.0], [20.0, 28.0, 28.0, 36.0]]  # anchors of cells (1,1) and (4,3)
    m = fgfi_mask(B(*boxes), 0, 5, anchors, (H, W), 1, psi=0.5)
    exp = torch.zeros(H, W)
    for box in boxes:
        ious = [_iou(box, a) for a in anchors.tolist()]
        best = max(ious)
        for k, v in enumerate(ious):
            if v > 0.5 * best:
                exp[k // W, k % W] = 1
    assert torch.equal(m, exp)
    assert m[1, 1] == 1 and m[4, 3] == 1


# ----------------------------------------------------------------------------- random / full
def test_random_mask_same_count():
    ref = torch.zeros(6, 7)
    ref[1:3, 2:5] = 1
    g = torch.Generator().manual_seed(0)
    m = random_mask(ref, generator=g)
    assert m.shape == (6, 7) and m.dtype == torch.float32
    assert set(m.unique().tolist()) <= {0.0, 1.0}
    assert int(m.sum()) == 6
    outs = {tuple(random_mask(ref, torch.Generator().manual_seed(k)).flatten().tolist()) for k in range(10)}
    assert len(outs) > 1
    assert random_mask(torch.zeros(3, 3)).sum().item() == 0
    # real-valued reference: count of non-zero cells
    assert int(random_mask(torch.tensor([[0.2, 0.0], [0.0, 1.0]])).sum()) == 2


def test_full_mask():
    m = full_mask((3, 4))
    assert m.shape == (3, 4) and (m == 1).all() and m.dtype == torch.float32


# ----------------------------------------------------------------------------- backbone
def test_backbone_gt_mask_shapes_and_content():
    # canvas 64x64: stride-4 grid 16x16; stages C3, C4, C5 = 8x8, 4x4, 2x2
    # all boxes used regardless of size: a small one and a large one
    boxes = B([0.0, 0.0, 15.0, 15.0], [32.0, 32.0, 63.0, 63.0])
    ms = backbone_gt_mask(boxes, [(8, 8), (4, 4), (2, 2)])
    assert [tuple(m.shape) for m in ms] == [(8, 8), (4, 4), (2, 2)]
    base = torch.zeros(16, 16)
    base[0:3, 0:3] = 1     # int(15/4) = 3
    base[8:15, 8:15] = 1   # int(63/4) = 15
    for m, (h, w) in zip(ms, [(8, 8), (4, 4), (2, 2)]):
        f = 16 // h
        exp = torch.tensor([[base[i * f, j * f].item() for j in range(w)] for i in range(h)])
        assert torch.equal(m, exp)
    # explicit base size and non-divisible sizes
    ms = backbone_gt_mask(boxes, [(7, 9), (4, 5)], base_stride=4, base_size=(14, 18))
    assert [tuple(m.shape) for m in ms] == [(7, 9), (4, 5)]
    assert backbone_gt_mask(B(), [(4, 4)])[0].sum().item() == 0


# ----------------------------------------------------------------------------- batch builder
def test_build_level_masks_gt_and_gaussian_batch():
    boxes = [B([5.0, 9.0, 18.0, 30.0], [0.0, 0.0, 159.0, 127.0]), B()]
    sizes = [(10, 12), (20, 22), (3, 3)]  # arbitrary per-level padded sizes
    strides = [4, 8, 16]
    ms = build_level_masks("gt", boxes, sizes, strides)
    assert [tuple(m.shape) for m in ms] == [(2, 10, 12), (2, 20, 22), (2, 3, 3)]
    for lvl in range(3):
        assert torch.equal(ms[lvl][0], gt_mask(boxes[0], lvl, 3, strides[lvl], sizes[lvl]))
        assert ms[lvl][1].sum().item() == 0
    assert ms[0][0].sum().item() == 15 and ms[1][0].sum().item() == 15 * 19
    gs = build_level_masks("gaussian", boxes, sizes, strides)
    assert torch.equal(gs[0][0], gaussian_mask(boxes[0], 0, 3, 4, (10, 12)))


def test_build_level_masks_random_all_fgfi():
    boxes = [B([5.0, 9.0, 18.0, 30.0]), B([0.0, 0.0, 159.0, 127.0])]
    sizes, strides = [(10, 12), (20, 22)], [4, 8]
    gt = build_level_masks("gt", boxes, sizes, strides)
    rnd = build_level_masks("random", boxes, sizes, strides, generator=torch.Generator().manual_seed(1))
    for g, r in zip(gt, rnd):
        assert g.shape == r.shape
        assert torch.equal(g.sum(dim=(1, 2)), r.sum(dim=(1, 2)))
    al = build_level_masks("all", boxes, sizes, strides)
    assert all((m == 1).all() and m.shape[0] == 2 for m in al)
    anchors = [_grid_anchors(10, 12, 4, [16.0, 32.0]), _grid_anchors(20, 22, 8, [32.0, 64.0])]
    fg = build_level_masks("fgfi", boxes, sizes, strides, anchors_per_level=anchors, num_anchors_per_cell=2)
    assert torch.equal(fg[0][0], fgfi_mask(boxes[0], 0, 2, anchors[0], (10, 12), 2))
    assert torch.equal(fg[1][1], fgfi_mask(boxes[1], 1, 2, anchors[1], (20, 22), 2))
    assert fg[0][1].sum() == 0 and fg[1][0].sum() == 0
    with pytest.raises(ValueError):
        build_level_masks("fgfi", boxes, sizes, strides)
    with pytest.raises(ValueError):
        build_level_masks("nope", boxes, sizes, strides)
