"""Views: resize rule, padding, flips, box transforms, batching and the (image, view) sampler."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from defeat_cache.data.dataset import ViewSampler
from defeat_cache.models.zoo import ViewTransform
from defeat_cache.views import Preprocessing, ViewSet, apply_view, view_geometry

TINY = Preprocessing(min_size=64, max_size=96)
DEFAULT = Preprocessing()  # 800 / 1333


def _image(h: int, w: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8)


# ------------------------------------------------------------------------------------------------
# resize rule and canvas
# ------------------------------------------------------------------------------------------------

# (h, w), preprocessing -> resized (h, w), canvas (h, w); computed by hand:
#   scale = min(min_size / shorter, max_size / longer)
CASES = [
    ((48, 64), TINY, (64, 85), (64, 96)),  # 64/48 = 1.333 < 96/64 = 1.5: shorter side -> 64; 64*4/3 = 85.3
    ((100, 50), TINY, (96, 48), (96, 64)),  # 64/50 = 1.28 > 96/100 = 0.96: longer side capped at 96
    ((64, 64), TINY, (64, 64), (64, 64)),  # already there: identity
    ((200, 160), TINY, (80, 64), (96, 64)),  # downscale: 64/160 = 0.4 < 96/200 = 0.48
    ((480, 640), DEFAULT, (800, 1067), (800, 1088)),  # 800/480 = 1.667; 640 * 1.667 = 1066.7
    ((427, 640), DEFAULT, (800, 1199), (800, 1216)),  # 800/427 = 1.8735; 640 * 1.8735 = 1199.1
    ((375, 500), DEFAULT, (800, 1067), (800, 1088)),  # VOC-typical
    ((200, 1000), DEFAULT, (267, 1333), (288, 1344)),  # 800/200 = 4 > 1333/1000: 200 * 1.333 = 266.6
]


@pytest.mark.parametrize("orig, pre, resized, canvas", CASES)
def test_resize_rule_and_canvas(orig, pre, resized, canvas):
    g = view_geometry(orig, pre, flip=False)
    assert g.orig_size == orig
    assert g.image_size == resized
    assert g.canvas_size == canvas
    assert all(c % pre.size_divisible == 0 for c in g.canvas_size)
    assert g.scale == pytest.approx((resized[0] / orig[0], resized[1] / orig[1]))
    assert max(g.image_size) <= pre.max_size
    assert min(g.image_size) <= pre.min_size


def test_canvas_follows_size_divisible():
    pre = Preprocessing(min_size=64, max_size=96, size_divisible=7)
    g = view_geometry((48, 64), pre, flip=True)
    assert g.image_size == (64, 85) and g.canvas_size == (70, 91)


def test_preprocessing_dict_round_trip():
    pre = Preprocessing(min_size=64, max_size=96, mean=(1.0, 2.0, 3.0), std=(4.0, 5.0, 6.0), size_divisible=16)
    d = pre.to_dict()
    assert d["mean"] == [1.0, 2.0, 3.0]
    assert Preprocessing.from_dict(d) == pre


# ------------------------------------------------------------------------------------------------
# apply_view
# ------------------------------------------------------------------------------------------------

def test_apply_view_shape_dtype_and_normalisation():
    image = torch.zeros(3, 64, 80, dtype=torch.uint8)
    image[0], image[1], image[2] = 10, 128, 250
    x, g = apply_view(image, TINY, flip=False)  # 64 is already the shorter side: no resize
    assert x.dtype == torch.float32 and tuple(x.shape) == (3, 64, 80)
    assert g.image_size == (64, 80) and g.canvas_size == (64, 96)
    for c, v in enumerate((10, 128, 250)):
        expected = (v - TINY.mean[c]) / TINY.std[c]
        assert torch.allclose(x[c], torch.full((64, 80), expected), atol=1e-6)


@pytest.mark.parametrize("size", [(48, 64), (100, 50), (64, 64), (77, 93)])
def test_apply_view_is_deterministic_and_hflip_is_the_mirror(size):
    image = _image(*size)
    a, ga = apply_view(image, TINY, flip=False)
    b, gb = apply_view(image.clone(), TINY, flip=False)
    assert torch.equal(a, b) and ga == gb
    f, gf = apply_view(image, TINY, flip=True)
    assert torch.equal(f, apply_view(image, TINY, flip=True)[0])
    assert tuple(a.shape[1:]) == ga.image_size == gf.image_size
    assert torch.equal(f, a.flip(-1))
    assert gf.flip and not ga.flip


def test_apply_view_rejects_non_rgb():
    with pytest.raises(ValueError):
        apply_view(torch.zeros(1, 10, 10, dtype=torch.uint8), TINY, flip=False)
    with pytest.raises(ValueError):
        apply_view(torch.zeros(10, 10, dtype=torch.uint8), TINY, flip=False)


# ------------------------------------------------------------------------------------------------
# boxes
# ------------------------------------------------------------------------------------------------

def test_boxes_to_view_by_hand():
    g = view_geometry((48, 64), TINY, flip=False)  # -> (64, 85): sx = 85/64, sy = 64/48
    boxes = torch.tensor([[8.0, 6.0, 32.0, 24.0], [0.0, 0.0, 64.0, 48.0]])
    expected = torch.tensor([[10.625, 8.0, 42.5, 32.0], [0.0, 0.0, 85.0, 64.0]])
    assert torch.allclose(g.boxes_to_view(boxes), expected)

    gf = view_geometry((48, 64), TINY, flip=True)  # x -> 85 - x, and x1/x2 swap
    expected_flipped = torch.tensor([[85 - 42.5, 8.0, 85 - 10.625, 32.0], [0.0, 0.0, 85.0, 64.0]])
    assert torch.allclose(gf.boxes_to_view(boxes), expected_flipped)
    assert gf.boxes_to_view(boxes).dtype == torch.float32


@pytest.mark.parametrize("flip", [False, True])
@pytest.mark.parametrize("orig, pre", [((48, 64), TINY), ((100, 50), TINY), ((427, 640), DEFAULT)])
def test_boxes_round_trip(orig, pre, flip):
    g = view_geometry(orig, pre, flip)
    h, w = orig
    gen = torch.Generator().manual_seed(1)
    xy = torch.rand(20, 2, generator=gen) * torch.tensor([w / 2, h / 2])
    wh = torch.rand(20, 2, generator=gen) * torch.tensor([w / 2, h / 2]) + 1
    boxes = torch.cat([xy, xy + wh], 1)
    view = g.boxes_to_view(boxes)
    assert (view[:, 2] >= view[:, 0]).all() and (view[:, 3] >= view[:, 1]).all()
    assert torch.allclose(g.boxes_to_original(view), boxes, atol=1e-4)
    assert g.boxes_to_view(torch.zeros(0, 4)).shape == (0, 4)


def test_flipped_boxes_follow_the_flipped_pixels():
    """A bright rectangle's pixel extent in the flipped view equals boxes_to_view of its box."""
    pre = Preprocessing(min_size=48, max_size=1000)  # 48x64 stays unresized: exact pixels
    image = torch.zeros(3, 48, 64, dtype=torch.uint8)
    x1, y1, x2, y2 = 5, 7, 20, 30  # pixels [x1, x2) x [y1, y2)
    image[:, y1:y2, x1:x2] = 255
    for flip in (False, True):
        x, g = apply_view(image, pre, flip)
        bright = x[0] > 0
        cols = bright.any(0).nonzero().flatten()
        rows = bright.any(1).nonzero().flatten()
        pixel_box = torch.tensor([[cols.min(), rows.min(), cols.max() + 1, rows.max() + 1]], dtype=torch.float32)
        assert torch.equal(g.boxes_to_view(torch.tensor([[x1, y1, x2, y2]])), pixel_box)
    assert pixel_box.tolist() == [[64 - 20, 7, 64 - 5, 30]]


# ------------------------------------------------------------------------------------------------
# batching: torchvision's GeneralizedRCNNTransform.batch_images, as the models run it
# ------------------------------------------------------------------------------------------------

def _batch(images: list[torch.Tensor], size_divisible: int = 32):
    image_list, _ = ViewTransform(size_divisible)(images)
    return image_list


def test_batching_zero_pads_to_multiple():
    a = torch.randn(3, 50, 70)
    b = torch.randn(3, 64, 40)
    batch = _batch([a, b])
    out = batch.tensors
    assert tuple(out.shape) == (2, 3, 64, 96)
    assert batch.image_sizes == [(50, 70), (64, 40)]
    assert torch.equal(out[0, :, :50, :70], a) and torch.equal(out[1, :, :64, :40], b)  # pixels untouched
    mask = torch.ones_like(out, dtype=torch.bool)
    mask[0, :, :50, :70] = False
    mask[1, :, :64, :40] = False
    assert (out[mask] == 0).all()


def test_batching_follows_size_divisible():
    a = torch.ones(3, 10, 12)
    assert tuple(_batch([a], size_divisible=32).tensors.shape) == (1, 3, 32, 32)
    assert tuple(_batch([a], size_divisible=5).tensors.shape) == (1, 3, 10, 15)
    out = _batch([a], size_divisible=1).tensors
    assert torch.equal(out[0], a)


@pytest.mark.parametrize("orig, pre, resized, canvas", CASES)
def test_an_image_batched_alone_fills_its_canvas(orig, pre, resized, canvas):
    """The view's canvas_size is what the model's batching pads the view to when it is alone."""
    x = torch.randn(3, *view_geometry(orig, pre, flip=False).image_size)
    assert tuple(_batch([x], pre.size_divisible).tensors.shape[-2:]) == canvas


# ------------------------------------------------------------------------------------------------
# ViewSet and ViewSampler
# ------------------------------------------------------------------------------------------------

def test_viewset_parse():
    assert ViewSet.parse("orig,hflip").names == ("orig", "hflip")
    vs = ViewSet.parse(" hflip ")
    assert len(vs) == 1 and vs.flip(0)
    assert not ViewSet.parse("orig,hflip").flip(0)
    for bad in ("", "orig,orig", "vflip", "orig,,rot90"):
        with pytest.raises(ValueError):
            ViewSet.parse(bad)


def _epoch(sampler: ViewSampler, epoch: int) -> list[tuple[int, int]]:
    sampler.set_epoch(epoch)
    return list(sampler)


def test_sampler_same_seed_same_order_and_views():
    a, b = ViewSampler(10, 2, seed=3), ViewSampler(10, 2, seed=3)
    for epoch in range(3):
        assert _epoch(a, epoch) == _epoch(b, epoch)
    assert _epoch(ViewSampler(10, 2, seed=4), 0) != _epoch(a, 0)


def test_sampler_epochs_differ_and_cover_every_image_once():
    s = ViewSampler(10, 2, seed=0)
    orders = [_epoch(s, e) for e in range(4)]
    assert len({tuple(i for i, _ in o) for o in orders}) == 4  # different order each epoch
    for o in orders:
        assert len(o) == len(s) == 10
        assert sorted(i for i, _ in o) == list(range(10))
        assert all(v in (0, 1) for _, v in o)


def test_sampler_both_views_used():
    s = ViewSampler(10, 2, seed=0)
    seen = Counter()
    for e in range(8):
        seen.update(_epoch(s, e))
    views = Counter(v for (_, v), n in seen.items() for _ in range(n))
    assert views[0] > 10 and views[1] > 10  # 80 draws, about half each
    for i in range(10):  # over 8 epochs each image has had both views
        assert {v for (j, v) in seen if j == i} == {0, 1}


def test_sampler_single_view_and_no_shuffle():
    s = ViewSampler(5, 1, seed=0)
    assert all(v == 0 for _, v in _epoch(s, 0))
    s = ViewSampler(5, 2, seed=0, shuffle=False, random_view=False)
    assert _epoch(s, 3) == [(i, 0) for i in range(5)]


def test_sampler_ranks_split_the_epoch_without_overlap():
    full = ViewSampler(10, 2, seed=7)
    ranks = [ViewSampler(10, 2, seed=7, rank=r, world_size=2) for r in range(2)]
    for epoch in range(3):
        parts = [_epoch(s, epoch) for s in ranks]
        assert [len(p) for p in parts] == [5, 5] and all(len(s) == 5 for s in ranks)
        assert not set(parts[0]) & set(parts[1])
        assert sorted(parts[0] + parts[1]) == sorted(_epoch(full, epoch))  # same (image, view) pairs


def test_sampler_uneven_split_pads_like_distributed_sampler():
    ranks = [ViewSampler(5, 2, seed=0, rank=r, world_size=2) for r in range(2)]
    parts = [_epoch(s, 0) for s in ranks]
    assert [len(p) for p in parts] == [3, 3]
    assert {i for p in parts for i, _ in p} == set(range(5))  # one image repeated as padding
    dropped = [ViewSampler(5, 2, seed=0, rank=r, world_size=2, drop_last=True) for r in range(2)]
    parts = [_epoch(s, 0) for s in dropped]
    assert [len(p) for p in parts] == [2, 2] and not set(parts[0]) & set(parts[1])
