"""The other feature-KD methods (defeat_cache.distill.feature_kd): PKD, CWD, FGD, MGD.

Hand-computed values on tiny tensors, an independent computation on each image's own canvas
(the valid cells cropped out), padded cells that change nothing, and gradients. The training
paths (cache == online, logged terms) are in tests/test_distill.py.
"""
from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F

from defeat_cache.distill import cwd_loss, pkd_loss
from defeat_cache.distill.feature_kd import (FGDRelation, MGDGenerator, fgd_attention, fgd_level_sums, fgd_masks,
                                             mgd_keep_masks, mgd_level_sum)
from defeat_cache.distill.presets import load_preset
from defeat_cache.data.records import DataError
from defeat_cache.models.sampling import image_generator

GARBAGE = 1e3  # what padded cells hold in the tests: any value there must change nothing


def _canvas_valid(B: int, H: int, W: int, extents: list[tuple[int, int]]) -> torch.Tensor:
    """[B, H, W] bool: image b's canvas is the top-left h x w of the padded grid."""
    v = torch.zeros(B, H, W, dtype=torch.bool)
    for b, (h, w) in enumerate(extents):
        v[b, :h, :w] = True
    return v


def _padded(x: torch.Tensor, valid: torch.Tensor, fill: float) -> torch.Tensor:
    return torch.where(valid[:, None], x, torch.full_like(x, fill))


def _random_levels(seed: int):
    """Two levels of a 3-image batch whose canvases differ (padding on the right and bottom)."""
    g = torch.Generator().manual_seed(seed)
    shapes = [((6, 7), [(6, 7), (4, 5), (6, 3)]), ((3, 4), [(3, 4), (2, 3), (3, 2)])]
    students, teachers, valids = [], [], []
    for (H, W), extents in shapes:
        v = _canvas_valid(3, H, W, extents)
        students.append(_padded(torch.randn(3, 4, H, W, generator=g), v, GARBAGE).requires_grad_())
        teachers.append(_padded(torch.randn(3, 4, H, W, generator=g) * 2 + 1, v, -GARBAGE))
        valids.append(v)
    return students, teachers, valids


def _valid_cells(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """[C, n]: the channels of the valid cells, the independent way (boolean indexing)."""
    return x.permute(1, 0, 2, 3)[:, v]


# ------------------------------------------------------------------------------------ PKD
def test_pkd_hand_values():
    s = torch.tensor([1.0, 2.0, 3.0, 4.0]).reshape(1, 1, 2, 2)
    # the same up to scale and shift: standardised equal, loss 0
    assert pkd_loss([s], [3 * s + 7]).item() == pytest.approx(0.0, abs=1e-10)
    # perfectly anti-correlated: norm T = -norm S, so 1/2 * mean((2 norm S)^2) = 2 (n - 1) / n = 1.5 for n = 4
    assert pkd_loss([s], [-s]).item() == pytest.approx(1.5, rel=1e-5)
    # two levels: the sum
    assert pkd_loss([s, s], [-s, 2 * s]).item() == pytest.approx(1.5, rel=1e-5)


def test_pkd_valid_mask_hand_value():
    """The same four values spread over two images of a padded batch, the rest garbage."""
    v = _canvas_valid(2, 2, 3, [(2, 1), (1, 2)])  # image 0: column 0; image 1: row 0, columns 0-1
    s = torch.full((2, 1, 2, 3), GARBAGE)
    s[0, 0, :, 0] = torch.tensor([1.0, 2.0])
    s[1, 0, 0, :2] = torch.tensor([3.0, 4.0])
    t = -s
    t[~v[:, None]] = 5.0
    assert pkd_loss([s], [t], [v]).item() == pytest.approx(1.5, rel=1e-5)


def test_pkd_equals_independent_computation_and_padding_changes_nothing():
    students, teachers, valids = _random_levels(0)
    got = pkd_loss(students, teachers, valids)

    def norm(f):
        return (f - f.mean(dim=1, keepdim=True)) / (f.std(dim=1, keepdim=True) + 1e-6)

    ref_students = [s.detach().clone().requires_grad_() for s in students]
    ref = sum(0.5 * F.mse_loss(norm(_valid_cells(s, v)), norm(_valid_cells(t, v)))
              for s, t, v in zip(ref_students, teachers, valids))
    assert got.item() == pytest.approx(ref.item(), rel=1e-5)
    got.backward()
    ref.backward()
    for s, r, v in zip(students, ref_students, valids):
        assert torch.allclose(s.grad, r.grad, rtol=1e-4, atol=1e-7)
        assert s.grad[~v[:, None].expand_as(s)].abs().max() == 0  # padded cells get no gradient
        assert s.grad[v[:, None].expand_as(s)].abs().max() > 0
    # other garbage in the padded cells: the same loss
    other = [_padded(s.detach(), v, -7.0) for s, v in zip(students, valids)]
    other_t = [_padded(t, v, 0.0) for t, v in zip(teachers, valids)]
    assert pkd_loss(other, other_t, valids).item() == pytest.approx(got.item(), rel=1e-6)
    # without a valid mask the padded cells count: a different value
    assert abs(pkd_loss(students, teachers).item() - got.item()) > 1e-3


# ------------------------------------------------------------------------------------ CWD
def test_cwd_hand_values():
    # T uniform over 2 cells, S softmax (3/4, 1/4): KL = 1/2 ln(2/3) + 1/2 ln 2 = 1/2 ln(4/3); B = C = 1
    s = torch.tensor([math.log(3.0), 0.0]).reshape(1, 1, 1, 2)
    t = torch.zeros(1, 1, 1, 2)
    assert cwd_loss([s], [t], 1.0).item() == pytest.approx(0.5 * math.log(4 / 3), rel=1e-6)
    # tau = 2: p_S = softmax(ln 3 / 2, 0) = (r, 1 - r), r = sqrt 3 / (sqrt 3 + 1); times tau^2 = 4
    r = math.sqrt(3) / (math.sqrt(3) + 1)
    expected = 4 * (0.5 * math.log(0.5 / r) + 0.5 * math.log(0.5 / (1 - r)))
    assert cwd_loss([s], [t], 2.0).item() == pytest.approx(expected, rel=1e-6)
    # a padded third cell (invalid) with garbage in it: the same; a second, identical channel: the same mean
    v = torch.tensor([[[True, True, False]]])
    s3 = torch.cat([s, torch.full((1, 1, 1, 1), GARBAGE)], dim=-1)
    t3 = torch.cat([t, torch.full((1, 1, 1, 1), -GARBAGE)], dim=-1)
    assert cwd_loss([s3.repeat(1, 2, 1, 1)], [t3.repeat(1, 2, 1, 1)], 1.0, [v]).item() == pytest.approx(
        0.5 * math.log(4 / 3), rel=1e-6)


def test_cwd_equals_independent_computation_and_padding_changes_nothing():
    students, teachers, valids = _random_levels(1)
    tau = 2.5
    got = cwd_loss(students, teachers, tau, valids)
    ref_students = [s.detach().clone().requires_grad_() for s in students]
    ref = 0.0
    for s, t, v in zip(ref_students, teachers, valids):
        B, C = s.shape[:2]
        for b in range(B):  # each image's own canvas, cropped
            h, w = int(v[b].any(1).sum()), int(v[b].any(0).sum())
            zs, zt = s[b, :, :h, :w].reshape(C, -1) / tau, t[b, :, :h, :w].reshape(C, -1) / tau
            ref = ref + tau ** 2 * F.kl_div(F.log_softmax(zs, -1), F.log_softmax(zt, -1), log_target=True,
                                            reduction="sum") / (B * C)
    assert got.item() == pytest.approx(ref.item(), rel=1e-5)
    got.backward()
    ref.backward()
    for s, r, v in zip(students, ref_students, valids):
        assert torch.allclose(s.grad, r.grad, rtol=1e-4, atol=1e-8)
        assert s.grad[~v[:, None].expand_as(s)].abs().max() == 0
    other = [_padded(s.detach(), v, 3.0) for s, v in zip(students, valids)]
    assert cwd_loss(other, teachers, tau, valids).item() == pytest.approx(got.item(), rel=1e-6)
    with pytest.raises(ValueError, match="tau"):
        cwd_loss(students, teachers, 0.0, valids)


# ------------------------------------------------------------------------------------ FGD
def test_fgd_masks_hand_values():
    v = _canvas_valid(2, 5, 6, [(5, 6), (3, 4)])
    boxes = [torch.tensor([[4.0, 4.0, 12.0, 8.0],     # cells x 1..3, y 1..2: 6 cells, 1/6 each
                           [8.0, 4.0, 11.0, 7.0]]),   # x 2..3, y 1..2: 4 cells, 1/4: the max on the overlap
             torch.tensor([[0.0, 0.0, 20.0, 20.0]])]  # 6 x 6 cells (1/36), clipped to the 3 x 4 canvas
    fg, bg = fgd_masks(boxes, v.float(), stride=4)
    exp0 = torch.zeros(5, 6)
    exp0[1:3, 1:4] = 1 / 6
    exp0[1:3, 2:4] = 1 / 4
    assert torch.allclose(fg[0], exp0)
    exp1 = torch.zeros(5, 6)
    exp1[:3, :4] = 1 / 36
    assert torch.allclose(fg[1], exp1)
    assert torch.allclose(bg[0], (exp0 == 0).float() / 24)  # 30 cells, 6 foreground
    assert bg[1].sum() == 0  # the whole canvas is foreground; padded cells are not background
    e, _ = fgd_masks([torch.zeros(0, 4), torch.zeros(0, 4)], v.float(), stride=4)
    assert e.sum() == 0


def test_fgd_attention_over_valid_cells():
    v = _canvas_valid(2, 4, 5, [(4, 5), (2, 3)]).float()
    x = _padded(torch.randn(2, 3, 4, 5), v.bool(), GARBAGE)
    spatial, channel = fgd_attention(x, v, 0.5)
    assert torch.allclose(spatial.sum(dim=(1, 2)), v.sum(dim=(1, 2)))  # n_b * softmax: mean 1 over the canvas
    assert spatial[v == 0].abs().max() == 0
    assert torch.allclose(channel.sum(dim=1), torch.full((2,), 3.0))
    crop = x[1:, :, :2, :3].abs()  # image 1 by hand on its own canvas
    assert torch.allclose(spatial[1, :2, :3], 6 * F.softmax(crop.mean(1).flatten() / 0.5, 0).reshape(2, 3))
    assert torch.allclose(channel[1], 3 * F.softmax(crop.mean(dim=(2, 3))[0] / 0.5, 0))


def _fgd_authors(s, t, boxes, stride, temp, rel_s, rel_t):
    """The authors' FGD arithmetic (mmdet FeatureLoss) on ONE unpadded image, without weights:
    (fg, bg, attention, relation) for s, t of [1, C, H, W], boxes mapped to cells by the stride."""
    _, C, H, W = s.shape

    def attention(x):
        a = x.abs()
        sp = H * W * F.softmax((a.mean(1) / temp).reshape(1, -1), dim=1).reshape(1, H, W)
        return sp, C * F.softmax(a.mean(dim=(2, 3)) / temp, dim=1)

    sa_t, ca_t = attention(t)
    sa_s, ca_s = attention(s)
    fg = torch.zeros(1, H, W)
    for x1, y1, x2, y2 in (boxes / stride).tolist():
        wmin, wmax, hmin, hmax = math.floor(x1), math.ceil(x2), math.floor(y1), math.ceil(y2)
        area = 1.0 / (hmax + 1 - hmin) / (wmax + 1 - wmin)
        fg[0, hmin:hmax + 1, wmin:wmax + 1] = torch.clamp(fg[0, hmin:hmax + 1, wmin:wmax + 1], min=area)
    bg = (fg == 0).float()
    bg = bg / bg.sum() if bg.sum() else bg
    w = sa_t[:, None].sqrt() * ca_t[:, :, None, None].sqrt()
    fg_l = ((s * w * fg[:, None].sqrt() - t * w * fg[:, None].sqrt()) ** 2).sum()
    bg_l = ((s * w * bg[:, None].sqrt() - t * w * bg[:, None].sqrt()) ** 2).sum()
    att = (ca_s - ca_t).abs().sum() + (sa_s - sa_t).abs().sum()

    def gc(x, block):
        ctx = (x.reshape(1, C, -1) * F.softmax(block.conv_mask(x).reshape(1, -1), dim=1)[:, None]).sum(-1)
        return x + block.channel_add(ctx[:, :, None, None])

    rel = ((gc(s, rel_s) - gc(t, rel_t)) ** 2).sum()
    return torch.stack([fg_l, bg_l, att, rel])


def test_fgd_level_sums_equal_the_authors_arithmetic_per_image():
    torch.manual_seed(0)
    C, stride = 6, 8
    v = _canvas_valid(2, 5, 7, [(5, 7), (3, 4)])
    s = _padded(torch.randn(2, C, 5, 7), v, GARBAGE).requires_grad_()
    t = _padded(torch.randn(2, C, 5, 7), v, -GARBAGE)
    boxes = [torch.tensor([[3.0, 5.0, 30.0, 22.0], [40.0, 1.0, 55.0, 38.0]]), torch.tensor([[2.0, 2.0, 14.0, 9.0]])]
    rel_s, rel_t = FGDRelation(C), FGDRelation(C)
    with torch.no_grad():  # leave the authors' zero init so the relation block really transforms
        for block in (rel_s, rel_t):
            block.channel_add[-1].weight.normal_()
    got = fgd_level_sums(s, t, v.float(), *fgd_masks(boxes, v.float(), stride), 0.5, rel_s, rel_t)
    ref = sum(_fgd_authors(s[b:b + 1, :, :h, :w], t[b:b + 1, :, :h, :w], boxes[b], stride, 0.5, rel_s, rel_t)
              for b, (h, w) in enumerate([(5, 7), (3, 4)]))
    assert torch.allclose(got, ref, rtol=1e-5), (got, ref)
    assert (got > 0).all()
    weights = torch.tensor([1.0, 10.0, 0.1, 0.01])
    (got * weights).sum().backward()
    grad_s = s.grad.clone()
    s.grad = None
    (ref * weights).sum().backward()
    assert torch.allclose(grad_s, s.grad, rtol=1e-4, atol=1e-6)
    assert grad_s[~v[:, None].expand_as(s)].abs().max() == 0
    assert rel_s.conv_mask.weight.grad is not None and rel_t.channel_add[0].weight.grad is not None


# ------------------------------------------------------------------------------------ MGD
def test_mgd_keep_masks():
    v = _canvas_valid(2, 40, 50, [(40, 50), (30, 20)]).float()
    gens = [image_generator(11, "mgd_mask", "cpu"), image_generator(12, "mgd_mask", "cpu")]
    keep = mgd_keep_masks(v, 0.65, gens)
    assert keep[v == 0].abs().max() == 0
    dropped = 1 - keep[0].mean().item()
    assert abs(dropped - 0.65) < 0.03
    # an image's draw depends on its own canvas only, not on how far the batch is padded
    wider = _canvas_valid(2, 45, 60, [(40, 50), (30, 20)]).float()
    again = mgd_keep_masks(wider, 0.65, [image_generator(11, "mgd_mask", "cpu"), image_generator(12, "mgd_mask", "cpu")])
    assert torch.equal(again[:, :40, :50], keep)
    assert mgd_keep_masks(v, 0.0, gens).eq(v).all()


def test_mgd_level_sum_equals_the_authors_arithmetic_per_image():
    torch.manual_seed(1)
    C = 5
    v = _canvas_valid(2, 6, 7, [(6, 7), (4, 3)])
    s = _padded(torch.randn(2, C, 6, 7), v, GARBAGE).requires_grad_()
    t = _padded(torch.randn(2, C, 6, 7), v, -GARBAGE)
    gen = MGDGenerator(C)
    keep = mgd_keep_masks(v.float(), 0.5, [image_generator(b, "mgd_mask", "cpu") for b in range(2)])
    got = mgd_level_sum(s, t, v.float(), keep, gen)
    # the authors': Σ (G(S ⊙ M) - T)^2 over the image's own map (conv zero padding at its border)
    ref = sum(((gen(s[b:b + 1, :, :h, :w] * keep[b, :h, :w]) - t[b:b + 1, :, :h, :w]) ** 2).sum()
              for b, (h, w) in enumerate([(6, 7), (4, 3)]))
    assert got.item() == pytest.approx(ref.item(), rel=1e-5)
    got.backward()
    assert s.grad[~v[:, None].expand_as(s)].abs().max() == 0
    assert gen.net[0].weight.grad.abs().max() > 0


# ------------------------------------------------------------------------------------ presets
def test_feature_kd_presets_and_their_errors():
    p = load_preset("defeat")
    assert not any(p[m]["enabled"] for m in ("pkd", "cwd", "fgd", "mgd"))  # old presets: the methods off
    assert load_preset("fgd_retina")["fgd"]["alpha"] == 1e-3 and load_preset("mgd")["mgd"]["ratio"] == 0.45
    both = load_preset("defeat", ["pkd.enabled=true", "pkd.weight=2"])
    assert both["pkd"] == {"enabled": True, "weight": 2, "levels": 4}
    for bad, match in (("pkd.weight=-1", "pkd.weight"), ("cwd.tau=0", "cwd.tau"), ("mgd.ratio=1", "mgd.ratio"),
                       ("fgd.enabled=1", "fgd.enabled"), ("fgd.lambda=\"x\"", "fgd.lambda"),
                       ("mgd.levels=1.5", "mgd.levels")):
        with pytest.raises(DataError, match=match):
            load_preset("fgd", [bad])


# ------------------------------------------------------------------------------------ DDP
def _ddp_worker(rank: int, init: str, out: str):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    students, teachers, valids = _random_levels(3)
    half = slice(0, 2) if rank == 0 else slice(2, 3)  # rank 0: images 0-1, rank 1: image 2
    s = [x.detach()[half].clone().requires_grad_() for x in students]
    loss = pkd_loss(s, [t[half] for t in teachers], [v[half] for v in valids]) \
        + cwd_loss(s, [t[half] for t in teachers], 2.0, [v[half] for v in valids])
    loss.backward()
    # DDP averages the ranks' parameter gradients, so an input's share of them is its local gradient / 2
    grads = [x.grad / 2 for x in s]
    torch.save({"grads": grads}, f"{out}.{rank}")
    dist.destroy_process_group()


def test_pkd_and_cwd_under_ddp_give_the_single_process_gradient(tmp_path):
    """Two gloo ranks holding 2 + 1 images of a batch: DDP's averaged gradient equals the
    gradient one process computes on all 3 (PKD's statistics and both normalisers are global)."""
    import torch.multiprocessing as mp
    out = str(tmp_path / "grads")
    mp.start_processes(_ddp_worker, args=(f"file://{tmp_path / 'rendezvous'}", out), nprocs=2, join=True,
                       start_method="fork")  # fork: no second import of torch
    students, teachers, valids = _random_levels(3)
    (pkd_loss(students, teachers, valids) + cwd_loss(students, teachers, 2.0, valids)).backward()
    parts = [torch.load(f"{out}.{r}", weights_only=True)["grads"] for r in range(2)]
    for level, s in enumerate(students):
        ddp = torch.cat([parts[0][level], parts[1][level]])
        assert torch.allclose(ddp, s.grad, rtol=1e-4, atol=1e-7), (ddp - s.grad).abs().max()


# ------------------------------------------------------------------------------------ the criterion
def test_distiller_terms_on_the_preset_levels(tiny_student_toml, tiny_model_toml):
    """The Distiller's feature-KD terms: weight x the public functions on the finest `levels` levels
    of the padded batch (teacher maps at each image's own canvas); a change on an excluded level
    changes nothing, on an included one it does."""
    from collections import OrderedDict
    from types import SimpleNamespace

    from defeat_cache.distill.compat import TeacherFacts
    from defeat_cache.distill.distiller import build_distiller
    from defeat_cache.models.zoo import load_model_spec

    student, teacher_spec = load_model_spec(str(tiny_student_toml)), load_model_spec(str(tiny_model_toml))
    facts = TeacherFacts.of_spec(teacher_spec)
    C = facts.feature_channels[0]
    preset = load_preset("pkd", ["cwd.enabled=true", "cwd.tau=2", "cwd.levels=2", "fgd.enabled=true",
                                 "mgd.enabled=true", "mgd.levels=3"])
    preset["name"] = "test"
    torch.manual_seed(0)
    dist = build_distiller(preset, student, facts)
    assert dist.parts == ["pkd", "cwd", "fgd", "mgd"]
    assert dist.kd_levels == {"pkd": 4, "cwd": 2, "fgd": 4, "mgd": 3}
    assert len(dist.fgd_relation_s) == 4 and len(dist.mgd_generators) == 3
    assert student.fpn_channels != C and isinstance(dist.feature_align.convs[0], torch.nn.Conv2d)
    canvases = [(64, 96), (96, 64)]  # two images of different canvases in a 96 x 96 batch
    g = torch.Generator().manual_seed(5)
    fpn = OrderedDict((str(i), torch.randn(2, student.fpn_channels, 96 // s, 96 // s, generator=g))
                      for i, s in enumerate(student.strides))
    teacher = [SimpleNamespace(features=[torch.randn(C, h // s, w // s, generator=g) for s in student.strides])
               for h, w in canvases]
    boxes = [torch.tensor([[4.0, 8.0, 40.0, 30.0]]), torch.tensor([[10.0, 2.0, 60.0, 90.0]])]
    out = SimpleNamespace(fpn=fpn)
    seeds = [3, 4]
    losses = dist.feature_kd_losses(out, teacher, boxes, torch.device("cpu"), seeds)
    assert set(losses) == {"loss_pkd", "loss_cwd", "loss_fgd_focal", "loss_fgd_global", "loss_mgd"}

    def padded(levels):
        t, v = [], []
        for li in range(levels):
            H, W = fpn[str(li)].shape[-2:]
            tl, vl = torch.zeros(2, C, H, W), torch.zeros(2, H, W, dtype=torch.bool)
            for b, item in enumerate(teacher):
                h, w = item.features[li].shape[-2:]
                tl[b, :, :h, :w], vl[b, :h, :w] = item.features[li], True
            t.append(tl)
            v.append(vl)
        aligned = dist.feature_align([fpn[str(i)] for i in range(len(dist.feature_align.convs))])  # 1x1 convs
        return aligned[:levels], t, v

    assert losses["loss_pkd"].item() == pytest.approx(6.0 * pkd_loss(*padded(4)).item(), rel=1e-6)
    s2, t2, v2 = padded(2)
    assert losses["loss_cwd"].item() == pytest.approx(10.0 * cwd_loss(s2, t2, 2.0, v2).item(), rel=1e-6)
    assert all(torch.isfinite(x) and x > 0 for x in losses.values())
    again = dist.feature_kd_losses(out, teacher, boxes, torch.device("cpu"), seeds)
    assert all(torch.equal(again[k], losses[k]) for k in losses)  # MGD's masks come from the image seeds

    fpn["4"] = fpn["4"] * torch.rand(fpn["4"].shape, generator=g)  # P6: no method here distils it
    assert all(torch.equal(v, dist.feature_kd_losses(out, teacher, boxes, torch.device("cpu"), seeds)[k])
               for k, v in losses.items())
    fpn["2"] = fpn["2"] * torch.rand(fpn["2"].shape, generator=g)  # P4: all but CWD (2 levels) do
    changed = dist.feature_kd_losses(out, teacher, boxes, torch.device("cpu"), seeds)
    assert changed["loss_cwd"] == losses["loss_cwd"]
    assert all(changed[k] != losses[k] for k in ("loss_pkd", "loss_fgd_focal", "loss_fgd_global", "loss_mgd"))


def test_feature_kd_modules_are_seeded_apart(tiny_student_toml, tiny_model_toml):
    """FGD's and MGD's modules come from their own generators: enabling DeFeat's neck, PKD or the
    other method leaves their initial weights as they were; another seed changes them."""
    from defeat_cache.distill.compat import TeacherFacts
    from defeat_cache.distill.distiller import build_distiller
    from defeat_cache.models.zoo import load_model_spec
    from defeat_cache.seeding import seeded_init

    student = load_model_spec(str(tiny_student_toml))
    facts = TeacherFacts.of_spec(load_model_spec(str(tiny_model_toml)))

    def states(seed, *overrides):
        with seeded_init(seed, "distiller"):
            d = build_distiller(load_preset("fgd", list(overrides)), student, facts)
        return {k: v for k, v in d.state_dict().items() if k.startswith(("fgd_", "mgd_", "feature_align"))}

    alone = states(3, "mgd.enabled=true")
    crowded = states(3, "mgd.enabled=true", "neck.enabled=true", "pkd.enabled=true")
    assert alone.keys() == crowded.keys() and all(torch.equal(alone[k], crowded[k]) for k in alone)
    fgd_only = states(3)
    assert all(torch.equal(v, alone[k]) for k, v in fgd_only.items())
    other = states(4, "mgd.enabled=true")
    assert not torch.equal(other["mgd_generators.0.net.0.weight"], alone["mgd_generators.0.net.0.weight"])


def _criterion_case(student_toml: str, teacher_toml: str):
    """A distiller with all four methods (seeded), and a 3-image batch: FPN maps, per-image teacher
    maps at their own canvases, boxes and per-image seeds."""
    from collections import OrderedDict
    from types import SimpleNamespace

    from defeat_cache.distill.compat import TeacherFacts
    from defeat_cache.distill.distiller import build_distiller
    from defeat_cache.models.zoo import load_model_spec
    from defeat_cache.seeding import seeded_init

    student = load_model_spec(student_toml)
    facts = TeacherFacts.of_spec(load_model_spec(teacher_toml))
    preset = load_preset("pkd", ["cwd.enabled=true", "fgd.enabled=true", "mgd.enabled=true", "mgd.levels=0"])
    with seeded_init(7, "distiller"):
        dist = build_distiller(preset, student, facts)
    with torch.no_grad():  # a GcBlock that transforms, so its gradients are not trivially 0
        for block in dist.fgd_relation_s:
            block.channel_add[-1].weight.normal_(0, 0.1)
    g = torch.Generator().manual_seed(9)
    canvases = [(64, 96), (96, 64), (96, 96)]
    fpn = OrderedDict((str(i), torch.randn(3, student.fpn_channels, 96 // s, 96 // s, generator=g))
                      for i, s in enumerate(student.strides))
    C = facts.feature_channels[0]
    teacher = [SimpleNamespace(features=[torch.randn(C, h // s, w // s, generator=g) for s in student.strides])
               for h, w in canvases]
    boxes = [torch.tensor([[4.0, 8.0, 40.0, 30.0]]), torch.tensor([[10.0, 2.0, 60.0, 90.0]]), torch.zeros(0, 4)]
    return dist, fpn, teacher, boxes, [11, 12, 13]


def _criterion_grads(dist, fpn, teacher, boxes, seeds, images):
    """Gradients of the distiller's parameters from the sum of its feature-KD terms on `images`."""
    from collections import OrderedDict
    from types import SimpleNamespace

    dist.zero_grad(set_to_none=True)
    out = SimpleNamespace(fpn=OrderedDict((k, v[images]) for k, v in fpn.items()))
    losses = dist.feature_kd_losses(out, [teacher[i] for i in images], [boxes[i] for i in images],
                                    torch.device("cpu"), [seeds[i] for i in images])
    sum(losses.values()).backward()
    return {n: p.grad.clone() for n, p in dist.named_parameters() if p.grad is not None}


def _criterion_ddp_worker(rank: int, init: str, out: str, student_toml: str, teacher_toml: str):
    import torch.distributed as dist_
    dist_.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    case = _criterion_case(student_toml, teacher_toml)
    grads = _criterion_grads(*case, images=[0, 1] if rank == 0 else [2])
    for g in grads.values():  # DDP: the mean of the ranks' parameter gradients
        dist_.all_reduce(g)
        g /= 2
    if rank == 0:
        torch.save(grads, out)
    dist_.destroy_process_group()


def test_feature_kd_criterion_under_ddp_gives_the_single_process_gradient(tmp_path, tiny_student_toml,
                                                                           tiny_model_toml):
    """All four methods through the Distiller: 2 gloo ranks holding 2 + 1 images move every KD
    parameter (aligners, GcBlocks, generators) as one process on the 3 images does."""
    import torch.multiprocessing as mp
    out = str(tmp_path / "grads.pt")
    mp.start_processes(_criterion_ddp_worker, nprocs=2, join=True, start_method="fork",
                       args=(f"file://{tmp_path / 'rendezvous'}", out, str(tiny_student_toml), str(tiny_model_toml)))
    single = _criterion_grads(*_criterion_case(str(tiny_student_toml), str(tiny_model_toml)), images=[0, 1, 2])
    ddp = torch.load(out, weights_only=True)
    assert single.keys() == ddp.keys()
    assert any(k.startswith("fgd_relation_t") for k in single) and any(k.startswith("mgd_") for k in single)
    for name, g in single.items():  # float rounding only: relative to the tensor's largest gradient
        scale = float(g.abs().max())
        if scale < 1e-9:  # a gradient that is 0 but for rounding (the GcBlock pooling conv's bias: softmax ignores it)
            assert float(ddp[name].abs().max()) < 1e-9, name
            continue
        assert float((ddp[name] - g).abs().max()) <= 1e-3 * scale, name
