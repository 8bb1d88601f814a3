"""DeFeat distillation losses (docs/method.md: Neck, Backbone and RoI-classifier distillation).

All losses detach the teacher, compute in float32 and return exactly 0 (still connected to
the student's autograd graph) when a term has no cells / RoIs, so that DDP never sees an
unused parameter and no NaN appears.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..distributed import batch_normaliser

__all__ = [
    "FeatureAdapters",
    "decoupled_feature_loss",
    "neck_distill_loss",
    "kl_div_with_temperature",
    "cls_kd_terms",
    "decoupled_kl_loss",
    "all_cls_kd_loss",
    "subsample_negatives",
]


# --------------------------------------------------------------------------------------
# Adaptation layers
# --------------------------------------------------------------------------------------
class FeatureAdapters(nn.Module):
    """One 3x3 conv (C_s -> C_t, padding 1, bias) per level, optionally followed by ReLU.

    Weights ~ N(0, 1) truncated to [-2, 2], then scaled by 1e-4; bias zero (docs/method.md#neck-distillation).
    ``relu=True`` is the backbone variant (sec 3).
    """

    def __init__(self, student_channels: Sequence[int], teacher_channels: Sequence[int], relu: bool = False):
        super().__init__()
        student_channels = list(student_channels)
        teacher_channels = list(teacher_channels)
        if len(student_channels) != len(teacher_channels):
            raise ValueError(
                f"student_channels ({len(student_channels)}) and teacher_channels "
                f"({len(teacher_channels)}) must have the same length"
            )
        self.relu = bool(relu)
        self.convs = nn.ModuleList(
            nn.Conv2d(cs, ct, kernel_size=3, padding=1, bias=True)
            for cs, ct in zip(student_channels, teacher_channels)
        )
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        for conv in self.convs:
            nn.init.trunc_normal_(conv.weight, mean=0.0, std=1.0, a=-2.0, b=2.0)
            conv.weight.mul_(1e-4)
            nn.init.zeros_(conv.bias)

    def __len__(self) -> int:
        return len(self.convs)

    def forward(self, feats: Sequence[Tensor]) -> list[Tensor]:
        feats = list(feats)
        if len(feats) != len(self.convs):
            raise ValueError(f"expected {len(self.convs)} feature maps, got {len(feats)}")
        out = []
        for conv, f in zip(self.convs, feats):
            y = conv(f)
            if self.relu:
                y = F.relu(y)
            out.append(y)
        return out


# --------------------------------------------------------------------------------------
# Feature imitation (neck / backbone)
# --------------------------------------------------------------------------------------
def _as_bhw(t: Tensor, like: Tensor, name: str) -> Tensor:
    """Bring a mask / valid tensor to float32 [B, H, W] matching ``like`` ([B, C, H, W])."""
    B, _, H, W = like.shape
    t = t.to(device=like.device, dtype=torch.float32)
    if t.dim() == 4 and t.shape[1] == 1:
        t = t[:, 0]
    if t.dim() == 2:
        t = t.unsqueeze(0).expand(B, H, W)
    if tuple(t.shape) != (B, H, W):
        raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {(B, H, W)}")
    return t


def _feature_sums(student: Tensor, teacher: Tensor, mask: Tensor, valid: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """([sum(M * E), sum((1 - M) * E)], [2 C sum M, 2 C sum (1 - M)]) of one level (see neck_distill_loss)."""
    if student.dim() != 4:
        raise ValueError(f"student must be [B, C, H, W], got {tuple(student.shape)}")
    teacher = teacher.detach()
    if teacher.shape != student.shape:
        raise ValueError(f"teacher shape {tuple(teacher.shape)} != student shape {tuple(student.shape)}")
    C = student.shape[1]
    s = student.float()
    t = teacher.to(device=s.device, dtype=torch.float32)
    m = _as_bhw(mask, s, "mask")
    obj_w = m
    bg_w = 1.0 - m
    if valid is not None:
        v = _as_bhw(valid, s, "valid")
        obj_w = obj_w * v
        bg_w = bg_w * v
    # per-cell squared error summed over channels: [B, H, W]
    e = (s - t).pow(2).sum(dim=1)
    sums = torch.stack([(obj_w * e).sum(), (bg_w * e).sum()])
    counts = (2.0 * C) * torch.stack([obj_w.sum(), bg_w.sum()])
    return sums, counts


def neck_distill_loss(
    students: Sequence[Tensor],
    teachers: Sequence[Tensor],
    masks: Sequence[Tensor],
    valids: Optional[Sequence[Optional[Tensor]]],
    alpha_obj: float,
    alpha_bg: float,
) -> dict[str, Tensor]:
    """Level-averaged decoupled imitation loss (docs/method.md#neck-distillation; also used for the backbone, #backbone-distillation).

    Per level l: students[l], teachers[l] are [B, C, H, W] (student already adapted; teacher
    detached here); masks[l] is [B, H, W] (or [H, W]) in [0, 1], may be real-valued; valids[l]
    is [B, H, W] bool/float or None (= all valid): invalid cells are in neither sum nor count.

    L_obj_l = sum(M * E) / max(1, 2 * C * sum_bhw M),
    L_bg_l  = sum((1 - M) * E) / max(1, 2 * C * sum_bhw (1 - M)),  E = (S - T)^2,
    normalised over the whole batch (under DDP the global batch: `distributed.batch_normaliser`).

    Returns {"loss_neck_obj": alpha_obj * mean_l L_obj_l, "loss_neck_bg": alpha_bg * mean_l L_bg_l}.
    """
    students, teachers, masks = list(students), list(teachers), list(masks)
    L = len(students)
    if L == 0:
        raise ValueError("neck_distill_loss needs at least one level")
    if len(teachers) != L or len(masks) != L:
        raise ValueError(f"got {L} student levels, {len(teachers)} teacher levels, {len(masks)} masks")
    if valids is None:
        valids = [None] * L
    valids = list(valids)
    if len(valids) != L:
        raise ValueError(f"got {len(valids)} valid masks for {L} levels")
    sums, counts = zip(*(_feature_sums(s, t, m, v) for s, t, m, v in zip(students, teachers, masks, valids)))
    # one normaliser call for all levels: under DDP that is one all-reduce per step, not 2 per level
    terms = torch.stack(sums) / batch_normaliser(torch.stack(counts))  # [L, 2]: (L_obj, L_bg) per level
    return {
        "loss_neck_obj": alpha_obj * terms[:, 0].mean(),
        "loss_neck_bg": alpha_bg * terms[:, 1].mean(),
    }


def decoupled_feature_loss(
    student: Tensor,
    teacher: Tensor,
    mask: Tensor,
    alpha_obj: float,
    alpha_bg: float,
    valid: Optional[Tensor] = None,
) -> Tensor:
    """Paper Eq. 5 for ONE level: alpha_obj * L_obj + alpha_bg * L_bg (scalar; terms as in
    neck_distill_loss, which training calls with all levels at once)."""
    terms = neck_distill_loss([student], [teacher], [mask], [valid], alpha_obj, alpha_bg)
    return terms["loss_neck_obj"] + terms["loss_neck_bg"]


# --------------------------------------------------------------------------------------
# RoI classifier distillation
# --------------------------------------------------------------------------------------
def kl_div_with_temperature(student_logits: Tensor, teacher_logits: Tensor, T: float) -> Tensor:
    """Per-RoI T^2 * sum_c p_t (log p_t - log p_s), softmax(z / T) over all classes. Returns [K]."""
    zt = teacher_logits.detach().to(device=student_logits.device, dtype=torch.float32)
    zs = student_logits.float()
    if zs.shape != zt.shape:
        raise ValueError(f"student logits {tuple(zs.shape)} != teacher logits {tuple(zt.shape)}")
    T = float(T)
    log_pt = F.log_softmax(zt / T, dim=-1)
    log_ps = F.log_softmax(zs / T, dim=-1)
    pt = log_pt.exp()
    return (T * T) * (pt * (log_pt - log_ps)).sum(dim=-1)


def _masked_kl_sum(zs: Tensor, zt: Tensor, sel: Tensor, T: float) -> Tensor:
    # Indexing with an all-False mask gives an empty tensor still attached to the graph,
    # so the result is an exact, connected 0 when nothing is selected.
    return kl_div_with_temperature(zs[sel], zt[sel], T).sum()


def cls_kd_terms(
    student_logits: Tensor,
    teacher_logits: Tensor,
    positive: Tensor,
    beta_obj: float,
    beta_bg: float,
    t_obj: float,
    t_bg: float,
) -> dict[str, Tensor]:
    """Decoupled RoI-classifier KD (paper Eq. 8-9), counts over the whole batch.

    positive: [K] bool (b_i = 1 for positive RoIs, from the teacher-side sampling).
    Returns {"loss_cls_pos": beta_obj * L_pos, "loss_cls_neg": beta_bg * L_neg}.
    """
    pos = positive.to(device=student_logits.device).bool().reshape(-1)
    if pos.numel() != student_logits.shape[0]:
        raise ValueError(f"positive has {pos.numel()} entries for {student_logits.shape[0]} RoIs")
    sums = torch.stack([_masked_kl_sum(student_logits, teacher_logits, pos, t_obj),
                        _masked_kl_sum(student_logits, teacher_logits, ~pos, t_bg)])
    l_pos, l_neg = sums / batch_normaliser(torch.stack([pos.sum(), (~pos).sum()]))
    return {"loss_cls_pos": beta_obj * l_pos, "loss_cls_neg": beta_bg * l_neg}


def decoupled_kl_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    positive: Tensor,
    beta_obj: float,
    beta_bg: float,
    t_obj: float,
    t_bg: float,
) -> Tensor:
    """Paper Eq. 8-9: beta_obj * L_pos + beta_bg * L_neg (scalar): the sum of cls_kd_terms, the
    function training calls (it logs the two terms apart)."""
    d = cls_kd_terms(student_logits, teacher_logits, positive, beta_obj, beta_bg, t_obj, t_bg)
    return d["loss_cls_pos"] + d["loss_cls_neg"]


def all_cls_kd_loss(student_logits: Tensor, teacher_logits: Tensor, T: float, lam: float) -> Tensor:
    """Paper Eq. 2: lam * mean over all RoIs of KL_T (exact, connected 0 when K = 0)."""
    kl = kl_div_with_temperature(student_logits, teacher_logits, T)
    return lam * (kl.sum() / batch_normaliser(torch.tensor(kl.numel(), device=kl.device)))


def subsample_negatives(positive: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
    """Keep-mask for the sub-negative variant: all positives + min(#pos, #neg) random negatives."""
    pos = positive.bool().reshape(-1)
    keep = pos.clone()
    neg_idx = torch.nonzero(~pos, as_tuple=False).flatten()
    n_keep = min(int(pos.sum().item()), neg_idx.numel())
    if n_keep > 0:
        dev = generator.device if generator is not None else neg_idx.device
        perm = torch.randperm(neg_idx.numel(), generator=generator, device=dev)[:n_keep]
        keep[neg_idx[perm.to(neg_idx.device)]] = True
    return keep.reshape(positive.shape)
