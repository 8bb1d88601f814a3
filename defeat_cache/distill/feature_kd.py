"""Feature-KD methods other than DeFeat that one cache serves: PKD, CWD, FGD and MGD
(docs/method.md#other-feature-kd-methods).

Each works per FPN level on the student's map S (aligned to the teacher's channels where
they differ) and the teacher's map T, both [B, C, H, W]; T is detached and everything is
computed in float32. `valid` ([B, H, W], True on the cells of each image's own canvas)
restricts every mean, sum and softmax to those cells. Counts over the batch go through
`distributed.batch_normaliser`, and PKD's batch statistics through `distributed.global_sum`,
so that under DDP the averaged gradient is the single-process gradient of the global batch.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..distributed import batch_normaliser, global_sum

__all__ = ["FGDRelation", "FeatureAlign", "MGDGenerator", "cwd_loss", "fgd_attention", "fgd_level_sums",
           "fgd_masks", "mgd_keep_masks", "mgd_level_sum", "pkd_loss"]

PKD_EPS = 1e-6  # added to the standard deviation (MMRazor's PKDLoss)


# --------------------------------------------------------------------------------------
# Level bookkeeping
# --------------------------------------------------------------------------------------
def _levels(student, teacher, valid, name: str) -> list[tuple[Tensor, Tensor, Tensor]]:
    """(S float32, T detached float32, valid float32 [B, H, W]) per level."""
    students = [student] if isinstance(student, Tensor) else list(student)
    teachers = [teacher] if isinstance(teacher, Tensor) else list(teacher)
    if not students:
        raise ValueError(f"{name} needs at least one level")
    if len(teachers) != len(students):
        raise ValueError(f"{name}: {len(students)} student levels, {len(teachers)} teacher levels")
    if valid is None or isinstance(valid, Tensor):
        valid = [valid] * len(students) if valid is None else [valid]
    valid = list(valid)
    if len(valid) != len(students):
        raise ValueError(f"{name}: {len(valid)} valid masks for {len(students)} levels")
    out = []
    for s, t, v in zip(students, teachers, valid):
        if s.dim() != 4 or t.shape != s.shape:
            raise ValueError(f"{name}: student {tuple(s.shape)} and teacher {tuple(t.shape)} must be one [B, C, H, W]")
        s = s.float()
        t = t.detach().to(device=s.device, dtype=torch.float32)
        B, _, H, W = s.shape
        if v is None:
            v = torch.ones(B, H, W, device=s.device)
        elif tuple(v.shape) != (B, H, W):
            raise ValueError(f"{name}: valid mask {tuple(v.shape)}, expected {(B, H, W)}")
        out.append((s, t, v.to(device=s.device, dtype=torch.float32)))
    return out


def _masked_logits(x: Tensor, keep: Tensor) -> Tensor:
    """Logits whose dropped entries take the smallest float: softmax gives them exactly 0 and the
    valid entries exactly their softmax among themselves, with finite values and gradients
    everywhere (a row with nothing valid stays finite; its caller weights it by 0)."""
    return x.masked_fill(~keep, torch.finfo(x.dtype).min)


# --------------------------------------------------------------------------------------
# PKD and CWD (the public functions of docs/method.md)
# --------------------------------------------------------------------------------------
def _standardise(x: Tensor, w: Tensor, n: Tensor) -> Tensor:
    """(x - mean_c) / (std_c + 1e-6) per channel over the valid cells (weights w, [B, 1, H, W]) of
    the global batch, std unbiased (torch's `std`); 0 on invalid cells."""
    mean = global_sum((x * w).sum(dim=(0, 2, 3))) / n.clamp(min=1)
    dev = (x - mean[None, :, None, None]) * w
    var = global_sum(dev.pow(2).sum(dim=(0, 2, 3))) / (n - 1).clamp(min=1)
    # clamped so that a constant channel has a finite gradient (its std stays < 1e-12 << eps)
    std = var.clamp(min=1e-24).sqrt()
    return dev / (std + PKD_EPS)[None, :, None, None]


def pkd_loss(student, teacher, valid=None) -> Tensor:
    """PKD (Cao et al., NeurIPS 2022; MMRazor's `PKDLoss`) without its weight, summed over levels.

    Per level: standardise each channel of S and of T over the valid cells of the batch
    (mean, unbiased std + 1e-6), then ½ · mean over valid cells and channels of the squared
    difference. `student`, `teacher`: lists of [B, C, H, W] (or one tensor); `valid`: a list of
    [B, H, W] bool masks (or None = every cell).
    """
    total = None
    for s, t, v in _levels(student, teacher, valid, "pkd_loss"):
        w = v[:, None]
        n = global_sum(v.sum().detach())
        diff = _standardise(s, w, n) - _standardise(t, w, n)
        level = 0.5 * diff.pow(2).sum() / batch_normaliser(s.shape[1] * v.sum())
        total = level if total is None else total + level
    return total


def cwd_loss(student, teacher, tau: float, valid=None) -> Tensor:
    """Channel-wise distillation (Shu et al., ICCV 2021; MMRazor's `ChannelWiseDivergence`) without
    its weight, summed over levels.

    Per level: for each image b and channel c a softmax over the valid cells of T/τ and of S/τ;
    τ² / (B·C) · Σ_{b,c} KL(p_T ‖ p_S).
    """
    tau = float(tau)
    if tau <= 0:
        raise ValueError(f"cwd_loss: tau must be > 0, got {tau}")
    total = None
    for s, t, v in _levels(student, teacher, valid, "cwd_loss"):
        B, C, H, W = s.shape
        keep = (v > 0)[:, None].expand(B, C, H, W).reshape(B * C, H * W)
        log_pt = F.log_softmax(_masked_logits(t.reshape(B * C, -1) / tau, keep), dim=-1)
        log_ps = F.log_softmax(_masked_logits(s.reshape(B * C, -1) / tau, keep), dim=-1)
        kl = torch.where(keep, log_pt.exp() * (log_pt - log_ps), torch.zeros_like(log_pt)).sum()
        level = (tau * tau) * kl / batch_normaliser(torch.tensor(float(B * C), device=s.device))
        total = level if total is None else total + level
    return total


# --------------------------------------------------------------------------------------
# Learned parts: channel alignment, FGD's GcBlocks, MGD's generators
# --------------------------------------------------------------------------------------
class FeatureAlign(nn.Module):
    """Per level a 1x1 conv from the student's channels to the teacher's where they differ, the
    identity where they agree (the authors' `align` of FGD and MGD; torch's default init)."""

    def __init__(self, student_channels: Sequence[int], teacher_channels: Sequence[int]):
        super().__init__()
        self.convs = nn.ModuleList(nn.Identity() if cs == ct else nn.Conv2d(cs, ct, kernel_size=1)
                                   for cs, ct in zip(student_channels, teacher_channels))

    def forward(self, feats: Sequence[Tensor]) -> list[Tensor]:
        return [conv(f) for conv, f in zip(self.convs, feats)]


class FGDRelation(nn.Module):
    """FGD's global-relation block (a GcBlock): attention pooling over the valid cells, then a
    channel transform (1x1 conv C -> C/2, LayerNorm, ReLU, 1x1 conv -> C) added to every cell.
    Init as the authors': the pooling conv Kaiming (fan-in), the last conv zero."""

    def __init__(self, channels: int):
        super().__init__()
        hidden = max(1, channels // 2)
        self.conv_mask = nn.Conv2d(channels, 1, kernel_size=1)
        self.channel_add = nn.Sequential(nn.Conv2d(channels, hidden, kernel_size=1), nn.LayerNorm([hidden, 1, 1]),
                                         nn.ReLU(), nn.Conv2d(hidden, channels, kernel_size=1))
        nn.init.kaiming_normal_(self.conv_mask.weight, mode="fan_in", nonlinearity="relu")
        nn.init.zeros_(self.conv_mask.bias)
        nn.init.zeros_(self.channel_add[-1].weight)
        nn.init.zeros_(self.channel_add[-1].bias)

    def forward(self, x: Tensor, valid: Tensor) -> Tensor:
        B, C = x.shape[:2]
        keep = valid.reshape(B, -1) > 0
        attn = F.softmax(_masked_logits(self.conv_mask(x).reshape(B, -1), keep), dim=-1)  # [B, HW]
        context = torch.einsum("bcn,bn->bc", x.reshape(B, C, -1), attn)[:, :, None, None]
        return x + self.channel_add(context)


class MGDGenerator(nn.Module):
    """MGD's generator: 3x3 conv -> ReLU -> 3x3 conv (C -> C, padding 1; torch's default init).

    Its hidden map is zeroed outside each image's canvas (as its input is), so that every image
    sees the zero padding of its own map at its border, as if it were alone in the batch."""

    def __init__(self, channels: int):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(channels, channels, kernel_size=3, padding=1), nn.ReLU(),
                                 nn.Conv2d(channels, channels, kernel_size=3, padding=1))

    def forward(self, x: Tensor, valid: Optional[Tensor] = None) -> Tensor:
        hidden = self.net[1](self.net[0](x))
        if valid is not None:
            hidden = hidden * valid[:, None]
        return self.net[2](hidden)


# --------------------------------------------------------------------------------------
# FGD (Yang et al., CVPR 2022)
# --------------------------------------------------------------------------------------
def fgd_attention(x: Tensor, valid: Tensor, temp: float) -> tuple[Tensor, Tensor]:
    """(spatial [B, H, W], channel [B, C]) attention of a map over each image's valid cells:
    n_b · softmax_hw(mean_c |x| / t) (0 off the canvas) and C · softmax_c(mean_hw |x| / t)."""
    B, C, H, W = x.shape
    a = x.abs()
    n = valid.sum(dim=(1, 2)).clamp(min=1)  # valid cells per image
    keep = valid.reshape(B, -1) > 0
    spatial = F.softmax(_masked_logits(a.mean(dim=1).reshape(B, -1) / temp, keep), dim=-1)
    spatial = (n[:, None] * spatial * keep).reshape(B, H, W)
    channel = (a * valid[:, None]).sum(dim=(2, 3)) / n[:, None]
    return spatial, C * F.softmax(channel / temp, dim=-1)


def fgd_masks(boxes: Sequence[Tensor], valid: Tensor, stride: float) -> tuple[Tensor, Tensor]:
    """FGD's foreground scale mask and normalised background mask of one level, [B, H, W].

    A box covers the cells floor(x1/s)..ceil(x2/s) x floor(y1/s)..ceil(y2/s) (both ends
    included, as the authors' code) with the value 1 / (its cell count); overlaps keep the
    maximum. Background = valid cells no box covers, each 1 / (the image's background count).
    """
    B, H, W = valid.shape
    fg = torch.zeros(B, H, W, device=valid.device)
    for b, bx in enumerate(boxes):
        if len(bx) == 0:
            continue
        cells = bx.detach().to(device=valid.device, dtype=torch.float64) / float(stride)
        lo = torch.floor(cells[:, :2]).long()
        hi = torch.ceil(cells[:, 2:]).long()
        area = 1.0 / ((hi[:, 1] + 1 - lo[:, 1]) * (hi[:, 0] + 1 - lo[:, 0])).double()
        for (x0, y0), (x1, y1), a in zip(lo.tolist(), hi.tolist(), area.tolist()):
            region = fg[b, max(y0, 0):max(y1 + 1, 0), max(x0, 0):max(x1 + 1, 0)]
            region.clamp_(min=a)
    fg = fg * valid
    bg = valid * (fg == 0)
    return fg, bg / bg.sum(dim=(1, 2), keepdim=True).clamp(min=1)


def fgd_level_sums(s: Tensor, t: Tensor, valid: Tensor, fg: Tensor, bg: Tensor, temp: float,
                   relation_s: FGDRelation, relation_t: FGDRelation) -> Tensor:
    """[fg, bg, attention, relation] sums of one level, each still to be divided by the batch size:
    Σ (S-T)² · A_S(T) · A_C(T) · M_fg, the same with M_bg, Σ|A_C(S) - A_C(T)| + Σ|A_S(S) - A_S(T)|,
    Σ_valid (GcBlock_s(S) - GcBlock_t(T))²."""
    t = t.detach()
    s_att_t, c_att_t = fgd_attention(t, valid, temp)
    s_att_s, c_att_s = fgd_attention(s, valid, temp)
    weighted = (s - t).pow(2) * s_att_t[:, None] * c_att_t[:, :, None, None]
    fg_sum = (weighted * fg[:, None]).sum()
    bg_sum = (weighted * bg[:, None]).sum()
    att_sum = (c_att_s - c_att_t).abs().sum() + ((s_att_s - s_att_t).abs() * valid).sum()
    rel_sum = ((relation_s(s, valid) - relation_t(t, valid)).pow(2) * valid[:, None]).sum()
    return torch.stack([fg_sum, bg_sum, att_sum, rel_sum])


# --------------------------------------------------------------------------------------
# MGD (Yang et al., ECCV 2022)
# --------------------------------------------------------------------------------------
def mgd_keep_masks(valid: Tensor, ratio: float, generators: Optional[list] = None) -> Tensor:
    """[B, H, W] float: 1 on the valid cells MGD keeps, each valid cell dropped with probability
    `ratio`. Each image draws from its own generator over its own canvas cells only (so its draw
    does not depend on the batch padding); without generators, from the global RNG."""
    B, H, W = valid.shape
    keep = torch.zeros(B, H, W, device=valid.device)
    for b in range(B):
        h = int(valid[b].any(dim=1).sum())
        w = int(valid[b].any(dim=0).sum())
        g = generators[b] if generators is not None else None
        u = torch.rand(h, w, generator=g, device=g.device if g is not None else valid.device)
        keep[b, :h, :w] = (u <= 1.0 - ratio).to(device=valid.device, dtype=torch.float32)
    return keep * valid


def mgd_level_sum(s: Tensor, t: Tensor, valid: Tensor, keep: Tensor, generator: MGDGenerator) -> Tensor:
    """Σ_valid (G(S ⊙ keep) - T)² of one level, still to be divided by the batch size."""
    return ((generator(s * keep[:, None], valid) - t.detach()).pow(2) * valid[:, None]).sum()
