"""The DeFeat criterion: the KD loss terms of one training step, given the teacher's outputs.

A `Distiller` owns the adaptation layers (trained with the student, discarded after). It is
given the teacher outputs of each batch, whether they were read from a cache or computed
online (`sources.py`); from the teacher source it knows only the static `TeacherFacts`. So
cache mode and online mode run the same code here and differ only by the codec's rounding.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchvision.ops import box_iou

from ..distributed import batch_normaliser
from ..errors import UserError
from ..models.forward import DetectorOutput, is_retinanet, roi_class_logits
from ..models.sampling import ItemSeededSampler, image_generators, seeded_sampling
from ..models.zoo import ModelSpec
from ..progress import log
from ..seeding import seeded_init
from .compat import TeacherFacts, check_compatible
from .feature_kd import (FeatureAlign, FGDRelation, MGDGenerator, cwd_loss, fgd_level_sums, fgd_masks, mgd_keep_masks,
                         mgd_level_sum, pkd_loss)
from .losses import FeatureAdapters, all_cls_kd_loss, cls_kd_terms, neck_distill_loss, subsample_negatives
from .masks import FINEST_SCALE, backbone_gt_mask, build_level_masks

PAPER_MIN_SIZE = 800  # the input size 56-px finest scale of docs/method.md#level-assignment refers to


class Distiller(nn.Module):
    """Returns the named KD loss terms of a step (docs/method.md, Neck to RoI-classifier distillation).

    `teacher` describes the teacher whose outputs `forward` will be given (its family and
    channels size the adaptation layers); the teacher itself is never part of this module.
    """

    def __init__(self, preset: dict, student: ModelSpec, teacher: TeacherFacts, teacher_head=None):
        """teacher_head: a `head_teacher.TeacherRoIHead`, needed by cls.rois = "student" (the
        teacher's logits at the student's proposals); a plain attribute, never a submodule."""
        super().__init__()
        self.preset = preset
        neck, cls, bb = preset["neck"], preset["cls"], preset["backbone"]
        parts = check_compatible(student, teacher, preset)
        for note in parts.notes:
            log(note)
        self.neck_on, self.cls_on, self.bb_on = parts.neck, parts.cls, parts.backbone
        self.feature_kd = parts.feature_kd
        self.strides = student.strides
        fs = neck.get("finest_scale", "auto")
        self.finest_scale = FINEST_SCALE * student.preprocessing.min_size / PAPER_MIN_SIZE if fs == "auto" else float(fs)
        # (student, teacher) FPN level indices paired by stride (compat.shared_levels), and the
        # size of the teacher's pyramid, over which boxes are assigned to levels for the masks
        self.neck_pairs, self.teacher_num_levels = parts.neck_pairs, len(teacher.fpn_levels)
        if self.neck_on:
            self.neck_adapters = FeatureAdapters([student.fpn_channels] * len(self.neck_pairs),
                                                 [teacher.feature_channels[t] for _, t in self.neck_pairs])
        if self.bb_on:
            stage_names = [s.name for s in student.backbone_stages]
            self.bb_index = [stage_names.index(s) for s in bb["stages"]]
            s_ch = {s.name: s.channels for s in student.backbone_stages}
            self.backbone_adapters = FeatureAdapters([s_ch[s] for s in bb["stages"]],
                                                     [teacher.backbone_channels[s] for s in bb["stages"]],
                                                     relu=True)
            self.bb_teacher_index = [list(teacher.backbone_channels).index(s) for s in bb["stages"]]
        if self.feature_kd:  # docs/method.md#other-feature-kd-methods
            all_levels = len(self.neck_pairs)
            # the finest `levels` paired FPN levels of each method (0 = all), as the authors' configs pick them
            self.kd_levels = {m: min(preset[m]["levels"] or all_levels, all_levels) for m in self.feature_kd}
            t_ch = [teacher.feature_channels[t] for _, t in self.neck_pairs[:max(self.kd_levels.values())]]
            # Each group of modules draws from its own generator (defeat_cache.seeding), seeded from the
            # seed the distiller is built under (torch.initial_seed(): the run's, in training), so that
            # enabling one part never changes another part's initial weights.
            base = torch.initial_seed()
            with seeded_init(base, "feature_align"):
                self.feature_align = FeatureAlign([student.fpn_channels] * len(t_ch), t_ch)
            if "fgd" in self.feature_kd:  # one GcBlock on the student side and one on the teacher side per level
                with seeded_init(base, "fgd"):
                    self.fgd_relation_s = nn.ModuleList(FGDRelation(c) for c in t_ch[:self.kd_levels["fgd"]])
                    self.fgd_relation_t = nn.ModuleList(FGDRelation(c) for c in t_ch[:self.kd_levels["fgd"]])
            if "mgd" in self.feature_kd:
                with seeded_init(base, "mgd"):
                    self.mgd_generators = nn.ModuleList(MGDGenerator(c) for c in t_ch[:self.kd_levels["mgd"]])
        if self.cls_on:
            rpi = int(cls["rois_per_image"]) or int(student.config.get("roi", {}).get("batch_size_per_image", 512))
            self.kd_sampler = ItemSeededSampler(rpi, float(cls["positive_fraction"]), "kd_rois")
        self.student_rois = self.cls_on and cls["rois"] == "student"
        if self.student_rois and teacher_head is None:
            raise UserError(f"preset {preset['name']}: cls.rois = \"student\" needs the teacher's RoI head to score "
                            "the student's proposals: give --teacher-head CKPT (the teacher's checkpoint) with --cache")
        self.teacher_head = teacher_head if self.student_rois else None

    @property
    def parts(self) -> list[str]:
        """The parts this criterion computes: some of DeFeat's neck, cls, backbone and the other
        feature-KD methods (pkd, cwd, fgd, mgd)."""
        defeat = [name for name, on in (("neck", self.neck_on), ("cls", self.cls_on), ("backbone", self.bb_on)) if on]
        return defeat + list(self.feature_kd)

    def forward(self, student: nn.Module, out: DetectorOutput, teacher: list, targets: list[dict],
                seeds: list[int] | None = None) -> dict:
        """out: the student's forward on the batch; teacher: the teacher outputs of its images
        (`TeacherOutput`s or cache items); targets: their GT in view coordinates; seeds: one per
        image for the random parts (RoI sampling, random masks), see models/sampling.py."""
        device = out.images.tensors.device
        boxes = [t["boxes"] for t in targets]
        losses = {}
        if self.neck_on:
            losses.update(self.neck_losses(student, out, teacher, boxes, device, seeds))
        if self.bb_on:
            losses.update(self.backbone_losses(out, teacher, boxes, device))
        if self.feature_kd:
            losses.update(self.feature_kd_losses(out, teacher, boxes, device, seeds))
        if self.cls_on:
            with seeded_sampling([self.kd_sampler], seeds):
                losses.update(self.cls_losses(student, out, teacher, boxes, device, seeds))
        return losses

    # -- neck (sections 1-2)
    def neck_losses(self, student: nn.Module, out: DetectorOutput, teacher: list, boxes: list[Tensor],
                    device, seeds: list[int] | None = None) -> dict:
        student_maps = list(out.fpn.values())
        s_levels = self.neck_adapters([student_maps[s] for s, _ in self.neck_pairs])
        t_levels, valids = _pad_teacher([[t.features[ti] for t in teacher] for _, ti in self.neck_pairs],
                                        s_levels, device)
        sizes = [tuple(s.shape[-2:]) for s in s_levels]
        kind = self.preset["neck"]["mask"]
        anchors = num_a = None
        if kind == "fgfi":
            all_anchors, all_num_a = _level_anchors(student, out)
            anchors = [all_anchors[s] for s, _ in self.neck_pairs]
            num_a = [all_num_a[s] for s, _ in self.neck_pairs]
        generators = image_generators(seeds, "random_mask", device) if kind == "random" else None
        masks = build_level_masks(kind, boxes, sizes, [self.strides[s] for s, _ in self.neck_pairs],
                                  anchors_per_level=anchors, num_anchors_per_cell=num_a,
                                  finest_scale=self.finest_scale, generators=generators,
                                  levels=[t for _, t in self.neck_pairs], num_levels=self.teacher_num_levels)
        terms = neck_distill_loss(s_levels, t_levels, masks, valids, self.preset["neck"]["alpha_obj"],
                                  self.preset["neck"]["alpha_bg"])
        if kind == "all":  # one term over all cells (paper Eq. 1)
            return {"loss_neck": terms["loss_neck_obj"] + terms["loss_neck_bg"]}
        return terms

    # -- other feature-KD methods (docs/method.md#other-feature-kd-methods)
    def feature_kd_losses(self, out: DetectorOutput, teacher: list, boxes: list[Tensor], device,
                          seeds: list[int] | None = None) -> dict:
        pairs = self.neck_pairs[:len(self.feature_align.convs)]
        student_maps = list(out.fpn.values())
        s_levels = [s.float() for s in self.feature_align([student_maps[si] for si, _ in pairs])]
        t_levels, valids = _pad_teacher([[t.features[ti] for t in teacher] for _, ti in pairs], s_levels, device)
        strides = [self.strides[si] for si, _ in pairs]

        def levels(method):  # (S, T, valid) of the method's levels
            n = self.kd_levels[method]
            return s_levels[:n], t_levels[:n], valids[:n]

        losses = {}
        if "pkd" in self.feature_kd:
            losses["loss_pkd"] = self.preset["pkd"]["weight"] * pkd_loss(*levels("pkd"))
        if "cwd" in self.feature_kd:
            cfg = self.preset["cwd"]
            s, t, v = levels("cwd")
            losses["loss_cwd"] = cfg["weight"] * cwd_loss(s, t, cfg["tau"], v)
        if "fgd" not in self.feature_kd and "mgd" not in self.feature_kd:
            return losses
        # FGD and MGD sum per-image terms: divided by the batch size (of the global batch under DDP)
        images = batch_normaliser(torch.tensor(float(len(teacher)), device=device))
        if "fgd" in self.feature_kd:
            cfg = self.preset["fgd"]
            sums = sum(fgd_level_sums(s, t, v, *fgd_masks(boxes, v, stride), cfg["temp"], rel_s, rel_t)
                       for s, t, v, stride, rel_s, rel_t in zip(*levels("fgd"), strides,
                                                                self.fgd_relation_s, self.fgd_relation_t)) / images
            losses["loss_fgd_focal"] = cfg["alpha"] * sums[0] + cfg["beta"] * sums[1] + cfg["gamma"] * sums[2]
            losses["loss_fgd_global"] = cfg["lambda"] * sums[3]
        if "mgd" in self.feature_kd:
            cfg = self.preset["mgd"]
            generators = image_generators(seeds, "mgd_mask", device)  # drawn level after level, per image
            total = sum(mgd_level_sum(s, t, v, mgd_keep_masks(v, cfg["ratio"], generators), gen)
                        for s, t, v, gen in zip(*levels("mgd"), self.mgd_generators))
            losses["loss_mgd"] = cfg["alpha"] * total / images
        return losses

    # -- backbone (section 3)
    def backbone_losses(self, out: DetectorOutput, teacher: list, boxes: list[Tensor], device) -> dict:
        s_stages = self.backbone_adapters([out.body[i] for i in self.bb_index])
        t_stages, valids = _pad_teacher([[t.backbone_features[i] for t in teacher] for i in self.bb_teacher_index],
                                        s_stages, device)
        sizes = [tuple(s.shape[-2:]) for s in s_stages]
        H, W = out.images.tensors.shape[-2:]
        masks = [torch.stack(ms) for ms in zip(*[backbone_gt_mask(b, sizes, base_stride=4, base_size=(H // 4, W // 4))
                                                 for b in boxes])]
        cfg = self.preset["backbone"]
        terms = neck_distill_loss(s_stages, t_stages, masks, valids, cfg["alpha_obj"], cfg["alpha_bg"])
        return {"loss_backbone": terms["loss_neck_obj"] + terms["loss_neck_bg"]}

    # -- RoI classifier (section 4)
    def cls_losses(self, student: nn.Module, out: DetectorOutput, teacher: list, boxes: list[Tensor], device,
                   seeds: list[int] | None = None) -> dict:
        cfg = self.preset["cls"]
        rois, t_logits, positive = [], [], []
        for i, (t, gt) in enumerate(zip(teacher, boxes)):
            if self.student_rois:  # the student's proposals + GT, as the student's own box head samples them
                cand = torch.cat([out.proposals[i], gt]).to(device)
                logits = None  # computed below for the sampled RoIs only
            else:
                cand = torch.cat([t.proposals, t.gt_boxes]).to(device)
                logits = torch.cat([t.proposal_logits, t.gt_logits]).to(device)
            if len(gt) and len(cand):
                pos = box_iou(cand, gt).max(dim=1).values >= float(cfg["fg_iou"])
            else:
                pos = torch.zeros(len(cand), dtype=torch.bool, device=device)
            rois.append(cand)
            t_logits.append(logits)
            positive.append(pos)
        # The standard R-CNN sampler over the teacher's candidates; b_i comes from each sampled
        # RoI's own IoU with the GT (docs/method.md#where-the-positive-flag-comes-from), never from the student's sampling.
        pos_masks, neg_masks = self.kd_sampler([p.long() for p in positive])
        keep = [(pm | nm).bool() for pm, nm in zip(pos_masks, neg_masks)]
        mode = cfg["mode"]
        if mode in ("sub_negative", "all_sub_negative"):  # per image: its sampled positives and as many negatives
            gens = image_generators(seeds, "sub_negative", device) or [None] * len(keep)
            keep = [_scatter_keep(k, subsample_negatives(p[k], g)) for k, p, g in zip(keep, positive, gens)]
        elif mode in ("all_positive", "all_negative"):  # the sampled RoIs of one kind only
            keep = [k & (p if mode == "all_positive" else ~p) for k, p in zip(keep, positive)]
        rois = [r[k] for r, k in zip(rois, keep)]
        if self.student_rois:
            t_all = torch.cat(self.teacher_head([t.features for t in teacher], rois, out.images.image_sizes))
        else:
            t_all = torch.cat([lg[k] for lg, k in zip(t_logits, keep)])
        pos_all = torch.cat([p[k] for p, k in zip(positive, keep)])
        s_all = roi_class_logits(student, out.fpn, rois, out.images.image_sizes).float()
        if mode.startswith("all"):
            return {"loss_cls_kd": all_cls_kd_loss(s_all, t_all, float(cfg["t"]), float(cfg["lam"]))}
        return cls_kd_terms(s_all, t_all, pos_all, cfg["beta_obj"], cfg["beta_bg"], cfg["t_obj"], cfg["t_bg"])


def _scatter_keep(keep: Tensor, sub: Tensor) -> Tensor:
    """A keep-mask `sub` over the kept entries of `keep` -> a mask over all entries."""
    full = torch.zeros_like(keep)
    full[keep] = sub
    return full


def _pad_teacher(per_level: list[list[Tensor]], like: list[Tensor], device) -> tuple[list[Tensor], list[Tensor]]:
    """Per-image teacher maps (each its own canvas extent) -> batch tensors shaped like the
    student's padded maps, plus `valid` masks of each image's own canvas (docs/method.md#neck-distillation)."""
    teachers, valids = [], []
    for maps, s in zip(per_level, like):
        B, _, H, W = s.shape
        C = maps[0].shape[0]
        t = torch.zeros(B, C, H, W, device=device)
        v = torch.zeros(B, H, W, device=device)
        for b, m in enumerate(maps):
            h, w = min(m.shape[1], H), min(m.shape[2], W)
            t[b, :, :h, :w] = m[:, :h, :w].to(device, non_blocking=True)
            v[b, :h, :w] = 1.0
        teachers.append(t)
        valids.append(v)
    return teachers, valids


def _level_anchors(student: nn.Module, out: DetectorOutput) -> tuple[list[Tensor], list[int]]:
    """The student's own anchors per level on the padded batch grid (for FG-Mask)."""
    generator = student.anchor_generator if is_retinanet(student) else student.rpn.anchor_generator
    levels = list(out.fpn.values())
    with torch.no_grad():
        anchors = generator(out.images, levels)[0]  # the same for every image of the batch
    num_a = generator.num_anchors_per_location()
    counts = [lv.shape[-2] * lv.shape[-1] * a for lv, a in zip(levels, num_a)]
    return list(anchors.split(counts)), list(num_a)


def build_distiller(preset: dict, student: ModelSpec, teacher: TeacherFacts, teacher_head=None) -> Distiller:
    """The criterion of a resolved `preset` (distill.presets) for this student and teacher
    (`teacher_head`: the teacher source's `roi_head`, for cls.rois = "student")."""
    distiller = Distiller(preset, student, teacher, teacher_head)
    rois = f"; cls on the student's proposals, scored by {teacher_head.description}" if distiller.student_rois else ""
    log(f"distilling with preset {preset['name']} from {teacher.description}: " + ", ".join(distiller.parts) + rois)
    return distiller


__all__ = ["Distiller", "build_distiller"]
