"""The teacher's RoI box head alone, for RoI-classifier KD on the student's proposals.

With `cls.rois = "student"` (docs/method.md#kd-on-the-students-proposals) the teacher's logits
are needed at RoIs the student proposes during training, which no cache can hold. The part of
the teacher that computes them is small (MultiScaleRoIAlign, the box head's layers and the
classifier) and its input, the teacher's FPN features, is in every cache item. So a
`TeacherRoIHead` holds just that part, loaded from the teacher's checkpoint, and runs it on the
cached features; the teacher's backbone, FPN and RPN never enter memory. Online, the same class
wraps the in-memory teacher's own box head, so both modes compute the logits with one code path.

A `TeacherRoIHead` is not an `nn.Module`: it stays out of the student's parameters, state dict,
optimizer and DDP, as the online teacher does (distill/sources.py).
"""

from __future__ import annotations

import warnings
from collections import OrderedDict

import torch
from torch import Tensor, nn

from ..errors import UserError
from ..models.checkpoint import load_weights
from ..models.forward import roi_class_logits
from ..models.zoo import ModelSpec, box_head_modules, build_detector
from ..progress import log
from ..seeding import seeded_init

# the teacher checkpoint's keys a head-only teacher loads (torchvision's names; foreign formats are converted first)
BOX_HEAD_PREFIXES = ("roi_heads.box_head.", "roi_heads.box_predictor.")


def level_names(spec: ModelSpec) -> list[str]:
    """The names torchvision's BackboneWithFPN gives the FPN levels of `spec` ("0".."3" for the
    body's stages, which RoIAlign pools from; the extra levels get names it ignores)."""
    stages = len(spec.backbone_stages)
    return [str(i) if i < stages else f"extra{i}" for i in range(len(spec.fpn_levels))]


class TeacherRoIHead:
    """Frozen, eval-mode teacher box head: per-image teacher FPN features + RoIs -> class logits."""

    def __init__(self, model: nn.Module, spec: ModelSpec, description: str):
        """model: anything with `roi_heads.box_roi_pool / box_head / box_predictor` (a detector)."""
        self.model = model.eval().requires_grad_(False)
        self.names = level_names(spec)
        self.description = description

    @classmethod
    def from_checkpoint(cls, spec: ModelSpec, checkpoint: str, classes, device: torch.device) -> TeacherRoIHead:
        """Loads only the box head of `checkpoint` (any models/checkpoint.py form) for teacher `spec`;
        `classes`: the dataset (num_classes, and the COCO-id mapping of the class heads)."""
        if not spec.has_roi_head:
            raise UserError(f"--teacher-head: teacher model {spec.name} is a {spec.family_record.title} model and has "
                            "no RoI head; cls.rois = \"student\" needs a Faster R-CNN teacher")
        # The full detector on the meta device (shapes, no memory) is the template the checkpoint
        # reader checks names and shapes against and converts foreign formats for; only its box head is real.
        with torch.device("meta"):
            template = build_detector(spec, classes.num_classes)
        with seeded_init(0, "teacher_head"):  # its init is overwritten; the run's RNG stays untouched
            pool, head, predictor = box_head_modules(spec, classes.num_classes)
        template.roi_heads.box_roi_pool, template.roi_heads.box_head = pool, head
        template.roi_heads.box_predictor = predictor
        with warnings.catch_warnings():  # BatchNorm fills in its missing counters on the meta template: a no-op
            warnings.filterwarnings("ignore", message=".*copying from a non-meta parameter.*")
            loaded = load_weights(template, checkpoint, classes=classes, only=BOX_HEAD_PREFIXES)
        log(f"teacher RoI head of {spec.name}: {loaded} from {checkpoint} (box head only)")
        box_head = nn.Module()
        box_head.roi_heads = nn.Module()
        box_head.roi_heads.box_roi_pool, box_head.roi_heads.box_head = pool, head
        box_head.roi_heads.box_predictor = predictor
        return cls(box_head.to(device), spec, f"{spec.name} box head from {checkpoint}")

    @torch.no_grad()
    def __call__(self, features: list[list[Tensor]], rois: list[Tensor],
                 image_sizes: list[tuple[int, int]]) -> list[Tensor]:
        """features: per image, its teacher FPN maps [C, h_l, w_l] at its own canvas; rois: per
        image [n, 4] in view coordinates. Each image runs alone at its own canvas, as the teacher
        itself computes it (one padded batch would change RoIAlign at the canvas borders)."""
        out = []
        for maps, boxes, size in zip(features, rois, image_sizes):
            device = boxes.device
            with torch.autocast(device.type, enabled=False):  # fp32, as the online teacher and extraction run
                fpn = OrderedDict((n, m[None].to(device).float()) for n, m in zip(self.names, maps))
                out.append(roi_class_logits(self.model, fpn, [boxes.float()], [tuple(size)]).float())
        return out


__all__ = ["BOX_HEAD_PREFIXES", "TeacherRoIHead", "level_names"]
