"""What a teacher contributes to DeFeat, per (image, view): computed here, cached or used online.

Both `extract` (written to the cache) and online distillation call `teacher_outputs`, so
the two modes see the same numbers by construction; the cache only adds its codec.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn
from torchvision.models.detection.rpn import concat_box_prediction_layers

from .family import family_of
from .forward import backbone_features, roi_class_logits


@dataclass
class TeacherOutput:
    """One (image, view). Features are cropped to the image's own canvas at each level.

    The one record of a teacher output, computed online or read from a cache. `teacher_outputs`
    leaves the item identity (which image and view, at what size) unset; extraction fills it in
    (`dataclasses.replace`) before writing, and the cache reader returns it filled.
    """

    features: list[Tensor]  # [C, h_l, w_l] per FPN level
    proposals: Tensor  # [N, 4] view coordinates (empty for RetinaNet)
    objectness: Tensor  # [N] RPN probability
    proposal_logits: Tensor  # [N, K] RoI classifier logits
    gt_boxes: Tensor  # [G, 4]
    gt_logits: Tensor  # [G, K]
    backbone_features: list[Tensor] | None = None  # C3, C4, C5
    image_index: int | None = None
    view_index: int | None = None
    image_size: tuple[int, int] | None = None  # (h, w) after resize (views.ViewGeometry)
    canvas_size: tuple[int, int] | None = None  # image_size padded to size_divisible

    def cpu(self) -> "TeacherOutput":
        """The same output with every tensor on the CPU (what the cache writer encodes)."""
        return replace(self, features=[f.cpu() for f in self.features], proposals=self.proposals.cpu(),
                       objectness=self.objectness.cpu(), proposal_logits=self.proposal_logits.cpu(),
                       gt_boxes=self.gt_boxes.cpu(), gt_logits=self.gt_logits.cpu(),
                       backbone_features=[b.cpu() for b in self.backbone_features] if self.backbone_features else None)


@contextlib.contextmanager
def _rpn_settings(rpn: nn.Module, pre_nms_top_n: int, post_nms_top_n: int):
    """Use training-time proposal counts in eval mode (docs/method.md#rois-and-the-sampler: 2000 per level, keep N)."""
    old = dict(rpn._pre_nms_top_n), dict(rpn._post_nms_top_n)
    rpn._pre_nms_top_n["testing"], rpn._post_nms_top_n["testing"] = pre_nms_top_n, post_nms_top_n
    try:
        yield
    finally:
        rpn._pre_nms_top_n, rpn._post_nms_top_n = old


def rpn_proposals(model: nn.Module, image_list, fpn) -> tuple[list[Tensor], list[Tensor]]:
    """Proposals and their objectness, as torchvision's RPN.forward computes them (it drops the scores)."""
    rpn = model.rpn
    levels = list(fpn.values())
    objectness, deltas = rpn.head(levels)
    anchors = rpn.anchor_generator(image_list, levels)
    num_anchors_per_level = [o[0].numel() for o in objectness]
    objectness, deltas = concat_box_prediction_layers(objectness, deltas)
    proposals = rpn.box_coder.decode(deltas.detach(), anchors).view(len(anchors), -1, 4)
    boxes, scores = rpn.filter_proposals(proposals, objectness, image_list.image_sizes, num_anchors_per_level)
    return boxes, scores


@torch.no_grad()
def teacher_outputs(teacher: nn.Module, images: list[Tensor], gt_boxes: list[Tensor], num_proposals: int = 1000, pre_nms_top_n: int = 2000,
                    with_backbone: bool = False) -> list[TeacherOutput]:
    """Runs the (eval-mode) teacher on each image at its own canvas.

    Images that share a canvas size are batched together: with no extra padding their
    features equal a single-image forward, so batching is only a speed-up, and every
    level's features are exactly the image's own canvas extent.
    """
    if teacher.training:
        raise RuntimeError("teacher must be in eval mode (frozen BatchNorm statistics)")
    device = images[0].device
    groups: dict[tuple[int, int], list[int]] = {}
    sd = teacher.transform.size_divisible
    for i, im in enumerate(images):
        canvas = (-(-im.shape[1] // sd) * sd, -(-im.shape[2] // sd) * sd)
        groups.setdefault(canvas, []).append(i)
    results: list[TeacherOutput | None] = [None] * len(images)
    family = family_of(teacher)
    for canvas, idx in groups.items():
        image_list, _ = teacher.transform([images[i] for i in idx])
        fpn, body = backbone_features(teacher, image_list)
        levels = list(fpn.values())
        if not family.has_roi_head:
            boxes = [torch.zeros(0, 4, device=device) for _ in idx]
            scores = [torch.zeros(0, device=device) for _ in idx]
        else:
            with _rpn_settings(teacher.rpn, pre_nms_top_n, num_proposals):
                boxes, scores = rpn_proposals(teacher, image_list, fpn)
            rois = [torch.cat([b, gt_boxes[i].to(device)]) for b, i in zip(boxes, idx)]
            logits = roi_class_logits(teacher, fpn, rois, image_list.image_sizes).float()
            per_image = logits.split([len(r) for r in rois])
        for j, i in enumerate(idx):
            if not family.has_roi_head:  # no logits, but the GT rows keep their count
                plog = torch.zeros(0, 0, device=device)
                glog = torch.zeros(len(gt_boxes[i]), 0, device=device)
            else:
                n = len(boxes[j])
                plog, glog = per_image[j][:n], per_image[j][n:]
            results[i] = TeacherOutput(
                features=[lev[j].float() for lev in levels], proposals=boxes[j].float(), objectness=scores[j].float(),
                proposal_logits=plog, gt_boxes=gt_boxes[i].to(device).float(), gt_logits=glog,
                backbone_features=[body[k][j].float() for k in family.cached_stage_indices] if with_backbone else None)
    return results  # type: ignore[return-value]
