"""Tests for defeat_cache.distill.losses against independent hand computations.

One level's (L_obj, L_bg) are checked through `neck_distill_loss`, the function training
calls (with all levels at once), on that single level with unit weights.
"""

import math

import pytest
import torch

from defeat_cache.distill.losses import (
    FeatureAdapters,
    all_cls_kd_loss,
    cls_kd_terms,
    decoupled_feature_loss,
    decoupled_kl_loss,
    kl_div_with_temperature,
    neck_distill_loss,
    subsample_negatives,
)


# ----------------------------------------------------------------------------- helpers
def ref_terms(S, T, M, V=None):
    """Plain-python reference of docs/method.md#neck-distillation for one level (nested lists / loops)."""
    B, C, H, W = len(S), len(S[0]), len(S[0][0]), len(S[0][0][0])
    num_o = num_b = cnt_o = cnt_b = 0.0
    for b in range(B):
        for h in range(H):
            for w in range(W):
                v = 1.0 if V is None else float(V[b][h][w])
                m = float(M[b][h][w])
                e = sum((S[b][c][h][w] - T[b][c][h][w]) ** 2 for c in range(C))
                num_o += v * m * e
                num_b += v * (1 - m) * e
                cnt_o += v * m
                cnt_b += v * (1 - m)
    return num_o / max(1.0, 2 * C * cnt_o), num_b / max(1.0, 2 * C * cnt_b)


def ref_kl(zs, zt, T):
    """Plain-python T^2 * KL(p_t || p_s) for one RoI."""
    def softmax(z):
        m = max(z)
        ex = [math.exp((v - m) / T) for v in z]
        s = sum(ex)
        return [v / s for v in ex]

    ps, pt = softmax(zs), softmax(zt)
    return T * T * sum(a * (math.log(a) - math.log(b)) for a, b in zip(pt, ps))


def one_level_terms(S, T, M, V=None):
    """Unweighted (L_obj, L_bg) of one level, as neck_distill_loss computes them."""
    terms = neck_distill_loss([S], [T], [M], [V], alpha_obj=1.0, alpha_bg=1.0)
    return terms["loss_neck_obj"], terms["loss_neck_bg"]


def rand_feats(shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).float()


# ----------------------------------------------------------------------------- features
def test_feature_terms_tiny_handworked():
    # B=1, C=1, H=1, W=2: cell 0 object (err 2 -> E=4), cell 1 background (err 1 -> E=1)
    s = torch.tensor([[[[3.0, 1.0]]]])
    t = torch.tensor([[[[1.0, 0.0]]]])
    m = torch.tensor([[[1.0, 0.0]]])
    l_obj, l_bg = one_level_terms(s, t, m)
    # normaliser max(1, 2*C*count) = max(1, 2) = 2
    assert l_obj.item() == pytest.approx(4.0 / 2.0)
    assert l_bg.item() == pytest.approx(1.0 / 2.0)
    tot = decoupled_feature_loss(s, t, m, alpha_obj=4.0, alpha_bg=16.0)
    assert tot.item() == pytest.approx(4 * 2.0 + 16 * 0.5)


def test_feature_terms_match_reference_batch_normaliser():
    B, C, H, W = 2, 3, 3, 4
    S = rand_feats((B, C, H, W), 0)
    T = rand_feats((B, C, H, W), 1)
    M = torch.zeros(B, H, W)
    M[0, 0, 0] = 1
    M[0, 1, 1:3] = 1
    M[1, 2, 3] = 1  # counts differ per image: normaliser is over the whole batch
    l_obj, l_bg = one_level_terms(S, T, M)
    r_obj, r_bg = ref_terms(S.tolist(), T.tolist(), M.tolist())
    assert l_obj.item() == pytest.approx(r_obj, rel=1e-5)
    assert l_bg.item() == pytest.approx(r_bg, rel=1e-5)
    # batch normalisation differs from averaging per-image losses
    per_img = [ref_terms(S[b:b + 1].tolist(), T[b:b + 1].tolist(), M[b:b + 1].tolist())[0] for b in range(B)]
    assert abs(sum(per_img) / B - r_obj) > 1e-3


def test_feature_terms_real_valued_mask():
    B, C, H, W = 1, 2, 2, 3
    S = rand_feats((B, C, H, W), 2)
    T = rand_feats((B, C, H, W), 3)
    M = torch.tensor([[[0.0, 0.25, 1.0], [0.5, 0.75, 0.1]]])
    l_obj, l_bg = one_level_terms(S, T, M)
    r_obj, r_bg = ref_terms(S.tolist(), T.tolist(), M.tolist())
    assert l_obj.item() == pytest.approx(r_obj, rel=1e-5)
    assert l_bg.item() == pytest.approx(r_bg, rel=1e-5)


def test_feature_terms_valid_excludes_cells():
    B, C, H, W = 2, 2, 3, 3
    S = rand_feats((B, C, H, W), 4)
    T = rand_feats((B, C, H, W), 5)
    M = torch.zeros(B, H, W)
    M[0, 0, 0] = 1
    M[1, 1, 1] = 1
    M[1, 2, 2] = 1  # this object cell is outside the canvas
    V = torch.ones(B, H, W, dtype=torch.bool)
    V[1, 2, :] = False
    V[1, :, 2] = False
    l_obj, l_bg = one_level_terms(S, T, M, V)
    r_obj, r_bg = ref_terms(S.tolist(), T.tolist(), M.tolist(), V.float().tolist())
    assert l_obj.item() == pytest.approx(r_obj, rel=1e-5)
    assert l_bg.item() == pytest.approx(r_bg, rel=1e-5)
    # changing anything in invalid cells (features or mask) changes nothing
    S2, T2, M2 = S.clone(), T.clone(), M.clone()
    S2[1, :, 2, :] += 100.0
    T2[1, :, :, 2] -= 50.0
    M2[1, 2, 0] = 1.0
    l_obj2, l_bg2 = one_level_terms(S2, T2, M2, V.float())
    assert l_obj2.item() == pytest.approx(l_obj.item(), rel=1e-6)
    assert l_bg2.item() == pytest.approx(l_bg.item(), rel=1e-6)


def test_feature_terms_normaliser_floor_of_one():
    # a tiny real-valued mask: 2*C*sum(M) = 2*1*0.1 = 0.2 < 1 -> normaliser 1
    s = torch.tensor([[[[2.0, 0.0]]]])
    t = torch.zeros(1, 1, 1, 2)
    m = torch.tensor([[[0.1, 0.0]]])
    l_obj, l_bg = one_level_terms(s, t, m)
    assert l_obj.item() == pytest.approx(0.1 * 4.0 / 1.0)
    # background: (0.9*4 + 1*0) / (2 * 1.9)
    assert l_bg.item() == pytest.approx(0.9 * 4.0 / (2 * 1.9))


@pytest.mark.parametrize("case", ["no_object", "no_background"])
def test_feature_terms_empty_side_is_exact_zero_with_grad(case):
    S = rand_feats((2, 3, 2, 2), 6).requires_grad_(True)
    T = rand_feats((2, 3, 2, 2), 7)
    M = torch.zeros(2, 2, 2) if case == "no_object" else torch.ones(2, 2, 2)
    l_obj, l_bg = one_level_terms(S, T, M)
    empty, other = (l_obj, l_bg) if case == "no_object" else (l_bg, l_obj)
    assert empty.item() == 0.0
    assert empty.requires_grad  # still connected to the student graph
    r = ref_terms(S.tolist(), T.tolist(), M.tolist())
    assert other.item() == pytest.approx(r[1] if case == "no_object" else r[0], rel=1e-5)
    (g,) = torch.autograd.grad(empty, S)
    assert torch.isfinite(g).all() and (g == 0).all()


def test_feature_loss_all_invalid_is_zero():
    S = rand_feats((1, 2, 2, 2), 8).requires_grad_(True)
    T = rand_feats((1, 2, 2, 2), 9)
    M = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])
    V = torch.zeros(1, 2, 2)
    loss = decoupled_feature_loss(S, T, M, 4.0, 16.0, valid=V)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.isfinite(S.grad).all()


def test_feature_loss_gradient_reaches_student_not_teacher():
    S = rand_feats((1, 2, 2, 2), 10).requires_grad_(True)
    T = rand_feats((1, 2, 2, 2), 11).requires_grad_(True)
    M = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    loss = decoupled_feature_loss(S, T, M, 4.0, 16.0)
    loss.backward()
    assert S.grad is not None and S.grad.abs().sum() > 0
    assert T.grad is None
    # analytic gradient: dL/dS = alpha * 2 (S - T) / norm, norm = 2*C*count = 2*2*2 = 8
    w = torch.where(M.bool(), torch.tensor(4.0), torch.tensor(16.0))[:, None]
    expected = w * 2 * (S.detach() - T.detach()) / 8.0
    assert torch.allclose(S.grad, expected, atol=1e-6)


def test_neck_distill_loss_level_average():
    levels = [(2, 3, 4, 4), (2, 3, 2, 2)]
    Ss = [rand_feats(s, 20 + i) for i, s in enumerate(levels)]
    Ts = [rand_feats(s, 30 + i) for i, s in enumerate(levels)]
    M0 = torch.zeros(2, 4, 4)
    M0[0, 1:3, 1:3] = 1
    M1 = torch.zeros(2, 2, 2)  # level without objects: pure background
    V1 = torch.ones(2, 2, 2)
    V1[1, 1, 1] = 0
    out = neck_distill_loss(Ss, Ts, [M0, M1], [None, V1], alpha_obj=4.0, alpha_bg=16.0)
    r0 = ref_terms(Ss[0].tolist(), Ts[0].tolist(), M0.tolist())
    r1 = ref_terms(Ss[1].tolist(), Ts[1].tolist(), M1.tolist(), V1.tolist())
    assert r1[0] == 0.0
    assert out["loss_neck_obj"].item() == pytest.approx(4.0 * (r0[0] + r1[0]) / 2, rel=1e-5)
    assert out["loss_neck_bg"].item() == pytest.approx(16.0 * (r0[1] + r1[1]) / 2, rel=1e-5)
    # valids=None equals all-valid
    a = neck_distill_loss(Ss, Ts, [M0, M1], None, 1.0, 1.0)
    b = neck_distill_loss(Ss, Ts, [M0, M1], [torch.ones(2, 4, 4), torch.ones(2, 2, 2)], 1.0, 1.0)
    for k in a:
        assert a[k].item() == pytest.approx(b[k].item(), rel=1e-6)


def test_neck_all_neck_variant_and_zero_weights_keep_graph():
    S = rand_feats((1, 2, 2, 3), 40).requires_grad_(True)
    T = rand_feats((1, 2, 2, 3), 41)
    ones = torch.ones(1, 2, 3)
    out = neck_distill_loss([S], [T], [ones], None, alpha_obj=2.0, alpha_bg=16.0)
    # all-neck: single term over all cells; background term exactly 0
    e = ((S.detach() - T) ** 2).sum().item()
    assert out["loss_neck_obj"].item() == pytest.approx(2.0 * e / (2 * 2 * 6), rel=1e-5)
    assert out["loss_neck_bg"].item() == 0.0
    # background-only variant (alpha_obj = 0): object term exactly 0 but connected
    out2 = neck_distill_loss([S], [T], [ones * 0.0 + torch.tensor([[[1.0, 0, 0], [0, 0, 0]]])], None, 0.0, 1.0)
    assert out2["loss_neck_obj"].item() == 0.0 and out2["loss_neck_obj"].requires_grad
    sum(out2.values()).backward()
    assert torch.isfinite(S.grad).all()


# ----------------------------------------------------------------------------- adapters
def test_feature_adapters_init_and_shapes():
    torch.manual_seed(0)
    ad = FeatureAdapters([4, 6], [8, 8])
    assert len(ad.convs) == 2
    for conv, cs in zip(ad.convs, [4, 6]):
        assert conv.kernel_size == (3, 3) and conv.padding == (1, 1)
        assert conv.in_channels == cs and conv.out_channels == 8
        assert conv.bias is not None and (conv.bias == 0).all()
        w = conv.weight
        assert w.abs().max().item() <= 2e-4 + 1e-12
        assert 0.3e-4 < w.std().item() < 1.5e-4  # truncated N(0,1)*1e-4 has std ~0.88e-4
    x = [torch.randn(2, 4, 5, 7), torch.randn(2, 6, 3, 3)]
    y = ad(x)
    assert [tuple(t.shape) for t in y] == [(2, 8, 5, 7), (2, 8, 3, 3)]
    assert (y[0] < 0).any()  # no ReLU in the neck variant


def test_feature_adapters_relu_and_grad():
    ad = FeatureAdapters([3], [3], relu=True)
    x = torch.randn(1, 3, 4, 4)
    (y,) = ad([x])
    assert (y >= 0).all()
    with torch.no_grad():
        ad.convs[0].weight.zero_()
        ad.convs[0].bias.copy_(torch.tensor([1.0, -1.0, 2.0]))
    (y,) = ad([x])
    assert torch.allclose(y[0, 0], torch.ones(4, 4)) and (y[0, 1] == 0).all()
    with pytest.raises(ValueError):
        FeatureAdapters([3, 3], [3])


# ----------------------------------------------------------------------------- classifier KD
def test_kl_matches_reference_and_temperature_scaling():
    zs = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
    zt = torch.tensor([[2.0, 0.0, 1.0], [1.0, 1.0, 1.0]])
    for T in (1.0, 3.0):
        kl = kl_div_with_temperature(zs, zt, T)
        assert kl.shape == (2,)
        for i in range(2):
            assert kl[i].item() == pytest.approx(ref_kl(zs[i].tolist(), zt[i].tolist(), T), rel=1e-5)
    # T^2 factor: KL_T(z) = T^2 * KL_1(z / T)
    kl3 = kl_div_with_temperature(zs, zt, 3.0)
    kl1_scaled = kl_div_with_temperature(zs / 3.0, zt / 3.0, 1.0)
    assert torch.allclose(kl3, 9.0 * kl1_scaled, rtol=1e-5)


def test_kl_zero_when_equal_and_grad_to_student_only():
    z = torch.tensor([[0.3, -1.2, 2.0, 0.0]])
    assert kl_div_with_temperature(z, z.clone(), 2.0).abs().max().item() < 1e-6
    zs = torch.tensor([[1.0, 2.0, 0.5]], requires_grad=True)
    zt = torch.tensor([[2.0, 0.0, 1.0]], requires_grad=True)
    T = 2.0
    kl_div_with_temperature(zs, zt, T).sum().backward()
    assert zt.grad is None
    # d/dzs [T^2 KL(pt || softmax(zs/T))] = T (ps - pt)
    ps = torch.softmax(zs.detach() / T, -1)
    pt = torch.softmax(zt.detach() / T, -1)
    assert torch.allclose(zs.grad, T * (ps - pt), atol=1e-6)


def _cls_batch():
    zs = torch.tensor(
        [[1.0, 2.0, 0.5], [0.0, -1.0, 3.0], [2.0, 2.0, 0.0], [0.1, 0.2, 0.3], [-1.0, 0.0, 1.0]]
    )
    zt = torch.tensor(
        [[2.0, 0.0, 1.0], [1.0, 1.0, 1.0], [0.0, 3.0, 0.0], [1.0, 0.0, -1.0], [0.5, 0.5, 2.0]]
    )
    pos = torch.tensor([True, False, True, False, False])
    return zs, zt, pos


def test_decoupled_kl_matches_reference():
    zs, zt, pos = _cls_batch()
    b_obj, b_bg, t_obj, t_bg = 0.05, 2.0, 3.0, 1.0
    Lpos = sum(ref_kl(zs[i].tolist(), zt[i].tolist(), t_obj) for i in (0, 2)) / 2
    Lneg = sum(ref_kl(zs[i].tolist(), zt[i].tolist(), t_bg) for i in (1, 3, 4)) / 3
    d = cls_kd_terms(zs, zt, pos, b_obj, b_bg, t_obj, t_bg)
    assert set(d) == {"loss_cls_pos", "loss_cls_neg"}
    assert d["loss_cls_pos"].item() == pytest.approx(b_obj * Lpos, rel=1e-5)
    assert d["loss_cls_neg"].item() == pytest.approx(b_bg * Lneg, rel=1e-5)
    tot = decoupled_kl_loss(zs, zt, pos, b_obj, b_bg, t_obj, t_bg)
    assert tot.item() == pytest.approx(b_obj * Lpos + b_bg * Lneg, rel=1e-5)
    # positive as a 0/1 integer tensor gives the same
    tot2 = decoupled_kl_loss(zs, zt, pos.long(), b_obj, b_bg, t_obj, t_bg)
    assert tot2.item() == pytest.approx(tot.item(), rel=1e-6)


@pytest.mark.parametrize("which", ["no_positive", "no_negative", "no_roi"])
def test_decoupled_kl_empty_sides(which):
    zs, zt, _ = _cls_batch()
    if which == "no_positive":
        pos = torch.zeros(5, dtype=torch.bool)
    elif which == "no_negative":
        pos = torch.ones(5, dtype=torch.bool)
    else:
        zs, zt, pos = zs[:0], zt[:0], torch.zeros(0, dtype=torch.bool)
    zs = zs.clone().requires_grad_(True)
    d = cls_kd_terms(zs, zt, pos, 0.05, 2.0, 3.0, 1.0)
    if which in ("no_positive", "no_roi"):
        assert d["loss_cls_pos"].item() == 0.0
    if which in ("no_negative", "no_roi"):
        assert d["loss_cls_neg"].item() == 0.0
    if which == "no_positive":
        ref = sum(ref_kl(zs[i].tolist(), zt[i].tolist(), 1.0) for i in range(5)) / 5
        assert d["loss_cls_neg"].item() == pytest.approx(2.0 * ref, rel=1e-5)
    for v in d.values():
        assert torch.isfinite(v) and v.requires_grad
    (d["loss_cls_pos"] + d["loss_cls_neg"]).backward()
    assert zs.grad is not None and torch.isfinite(zs.grad).all()


def test_decoupled_kl_zero_when_equal():
    zs, _, pos = _cls_batch()
    assert abs(decoupled_kl_loss(zs, zs.clone(), pos, 1.0, 1.0, 3.0, 1.0).item()) < 1e-6


def test_all_cls_kd_loss():
    zs, zt, _ = _cls_batch()
    T, lam = 2.0, 0.5
    ref = sum(ref_kl(zs[i].tolist(), zt[i].tolist(), T) for i in range(5)) / 5
    assert all_cls_kd_loss(zs, zt, T, lam).item() == pytest.approx(lam * ref, rel=1e-5)
    e = zs[:0].clone().requires_grad_(True)
    z = all_cls_kd_loss(e, zt[:0], T, lam)
    assert z.item() == 0.0 and z.requires_grad
    z.backward()


def test_subsample_negatives():
    pos = torch.tensor([True, False, False, True, False, False, False, False])
    g = torch.Generator().manual_seed(0)
    keep = subsample_negatives(pos, generator=g)
    assert keep.dtype == torch.bool and keep.shape == pos.shape
    assert keep[pos].all()
    assert int((keep & ~pos).sum()) == 2
    # different seeds give (eventually) different negatives; same seed same negatives
    k2 = subsample_negatives(pos, generator=torch.Generator().manual_seed(0))
    assert torch.equal(keep, k2)
    seen = {tuple(subsample_negatives(pos, torch.Generator().manual_seed(s)).tolist()) for s in range(20)}
    assert len(seen) > 1
    # fewer negatives than positives: all kept
    pos2 = torch.tensor([True, True, True, False])
    assert subsample_negatives(pos2).all()
    # no positives: nothing kept
    assert not subsample_negatives(torch.zeros(4, dtype=torch.bool)).any()
    assert subsample_negatives(torch.zeros(0, dtype=torch.bool)).numel() == 0
