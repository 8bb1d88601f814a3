"""The DeFeat criterion: KD loss terms for one training step, from cached or online teacher outputs.

A `Distiller` owns the adaptation layers (trained with the student, discarded after) and a
*teacher source*:
- `CacheSource` streams a TeacherCache through the DataLoader (each sample carries its
  cached item); no teacher module is ever built.
- `OnlineSource` keeps a frozen teacher in memory and computes the same outputs with the same
  function the extractor uses (`models.teacher.teacher_outputs`), which is what makes the
  two modes comparable term by term (DESIGN.md invariant 1).
Everything after the source is shared code, so cache mode and online mode differ only by
the codec's rounding.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchvision.ops import box_iou

from ..cache import CacheError, TeacherCache
from ..data.dataset import ViewDataset
from ..data.records import DataError, DetectionData
from ..models.checkpoint import load_weights
from ..models.forward import DetectorOutput, is_retinanet, roi_class_logits
from ..models.sampling import ItemSeededSampler, image_generators, seeded_sampling
from ..models.teacher import teacher_outputs
from ..models.zoo import ModelSpec, build_detector, load_model_spec
from ..progress import log
from ..views import Preprocessing, ViewSet
from .compat import TeacherFacts, check_compatible
from .losses import FeatureAdapters, all_cls_kd_loss, cls_kd_terms, neck_distill_loss, subsample_negatives
from .masks import FINEST_SCALE, backbone_gt_mask, build_level_masks

PAPER_MIN_SIZE = 800  # the input size METHOD.md's 56-px finest scale refers to


def _diff(ours: dict, theirs: dict) -> list[str]:
    return [f"{k}: cache {theirs.get(k)!r} vs this run {ours.get(k)!r}"
            for k in sorted(set(ours) | set(theirs)) if ours.get(k) != theirs.get(k)]


# ---------------------------------------------------------------- teacher sources
class CachedViewDataset(ViewDataset):
    """ViewDataset whose samples also carry the cached teacher item of that (image, view)."""

    def __init__(self, data: DetectionData, pre: Preprocessing, views: ViewSet, cache):
        super().__init__(data, pre, views)
        self.cache = cache

    def sample(self, image_index: int, view_index: int) -> dict:
        s = super().sample(image_index, view_index)
        try:
            item = self.cache.read(self.cache.layout.item_index(image_index, view_index))
        except CacheError as e:
            raise DataError(str(e)) from None
        if (item.image_index, item.view_index) != (image_index, view_index) or \
                tuple(item.image_size) != tuple(s["geometry"].image_size):
            raise DataError(f"cache item for image {image_index} view {view_index} does not match the "
                            f"rebuilt student input (sizes {item.image_size} vs {s['geometry'].image_size}); "
                            "the cache was made from different data or preprocessing")
        s["teacher"] = item
        return s


class CacheSource:
    """Teacher outputs read from a cache; refuses a cache that does not fit the run."""

    def __init__(self, path: str, data: DetectionData, student: ModelSpec, storage_options: dict | None = None):
        self.cache = TeacherCache(path, storage_options=storage_options)
        prov = self.cache.provenance()
        ds = prov.get("dataset", {})
        problems = []
        if ds.get("fingerprint") != data.fingerprint():
            problems.append(f"dataset: cache was extracted from {ds.get('name')}/{ds.get('split')} "
                            f"(fingerprint {ds.get('fingerprint')}), --data gives {data.name}/{data.split} "
                            f"(fingerprint {data.fingerprint()}): different images, boxes or classes")
        cached_pre = prov.get("preprocessing", {})
        problems += [f"preprocessing {d}" for d in _diff(student.preprocessing.to_dict(), cached_pre)]
        if problems:
            raise DataError(f"cache {path} does not match this training run: " + "; ".join(problems)
                            + ". Re-extract the cache for this dataset/preprocessing or use the matching ones.")
        self.preprocessing = Preprocessing.from_dict(cached_pre)
        self.views = ViewSet(tuple(prov["views"]))
        self.teacher_family = prov["teacher"]["family"]
        self.has_backbone = bool(self.cache.layout.backbone_levels)
        layout = self.cache.layout
        self.teacher_channels = [lv.channels for lv in layout.feature_levels]
        self.teacher_backbone_channels = {lv.name: lv.channels for lv in layout.backbone_levels}
        self.description = f"cache {path} ({prov['teacher']['name']}, codec {layout.codec})"

    def dataset(self, data: DetectionData, pre: Preprocessing) -> ViewDataset:
        return CachedViewDataset(data, pre, self.views, self.cache)

    def outputs(self, batch: list[dict], images: list[Tensor]) -> list:
        return [s["teacher"] for s in batch]


class OnlineSource:
    """A frozen teacher in memory (today's online distillation; our reference for faithfulness)."""

    def __init__(self, teacher_name: str, checkpoint: str, data: DetectionData, student: ModelSpec,
                 preset: dict, views: ViewSet, device: torch.device):
        spec = load_model_spec(teacher_name)
        diff = _diff(student.preprocessing.to_dict(), spec.preprocessing.to_dict())
        if diff:
            raise DataError(f"teacher {spec.name} and student {student.name} preprocess differently: "
                            + "; ".join(d.replace("cache", "teacher") for d in diff))
        teacher = build_detector(spec, data.num_classes)
        load_weights(teacher, checkpoint, backbone_only=False)
        # A plain attribute on a non-Module: the teacher stays out of the student's
        # parameters, state dict and DDP.
        self.teacher = teacher.eval().to(device).requires_grad_(False)
        self.preprocessing, self.views = spec.preprocessing, views
        self.teacher_family = spec.family
        self.has_backbone = True
        self.teacher_channels = [lv.channels for lv in spec.fpn_levels]
        # the stages an extracted cache holds, so both sources index them alike
        self.teacher_backbone_channels = {s.name: s.channels for s in spec.cached_backbone_stages}
        self.proposals = int(preset["teacher"]["proposals"])
        self.pre_nms_top_n = int(preset["teacher"]["pre_nms_top_n"])
        self.with_backbone = bool(preset["backbone"]["enabled"])
        self.description = f"online teacher {spec.name} ({checkpoint})"

    def dataset(self, data: DetectionData, pre: Preprocessing) -> ViewDataset:
        return ViewDataset(data, pre, self.views)

    def outputs(self, batch: list[dict], images: list[Tensor]) -> list:
        with torch.autocast(images[0].device.type, enabled=False):
            return teacher_outputs(self.teacher, [im.float() for im in images],
                                   [s["boxes"] for s in batch], self.proposals, self.pre_nms_top_n,
                                   self.with_backbone)


# ---------------------------------------------------------------- the criterion
class Distiller(nn.Module):
    """Returns the named KD loss terms of a step (METHOD.md sections 1-4)."""

    def __init__(self, preset: dict, student: ModelSpec, source, num_classes: int):
        super().__init__()
        self.preset, self.source = preset, source
        self.student_family = student.family
        neck, cls, bb = preset["neck"], preset["cls"], preset["backbone"]
        teacher = TeacherFacts.of_family(source.teacher_family, source.teacher_backbone_channels)
        parts = check_compatible(student, teacher, preset)
        for note in parts.notes:
            log(note)
        self.neck_on, self.cls_on, self.bb_on = parts.neck, parts.cls, parts.backbone
        self.strides = student.strides
        fs = neck.get("finest_scale", "auto")
        self.finest_scale = FINEST_SCALE * student.preprocessing.min_size / PAPER_MIN_SIZE if fs == "auto" else float(fs)
        if self.neck_on:
            n = len(self.strides)
            self.neck_adapters = FeatureAdapters([student.fpn_channels] * n, source.teacher_channels[:n])
        if self.bb_on:
            stage_names = [s.name for s in student.backbone_stages]
            self.bb_index = [stage_names.index(s) for s in bb["stages"]]
            s_ch = {s.name: s.channels for s in student.backbone_stages}
            self.backbone_adapters = FeatureAdapters([s_ch[s] for s in bb["stages"]],
                                                     [source.teacher_backbone_channels[s] for s in bb["stages"]],
                                                     relu=True)
            self.bb_teacher_index = [list(source.teacher_backbone_channels).index(s) for s in bb["stages"]]
        if self.cls_on:
            rpi = int(cls["rois_per_image"]) or int(student.config.get("roi", {}).get("batch_size_per_image", 512))
            self.kd_sampler = ItemSeededSampler(rpi, float(cls["positive_fraction"]), "kd_rois")
        self.num_classes = num_classes

    @property
    def preprocessing(self) -> Preprocessing:
        return self.source.preprocessing

    @property
    def views(self) -> ViewSet:
        return self.source.views

    def dataset(self, data: DetectionData, pre: Preprocessing):
        return self.source.dataset(data, pre)

    def forward(self, student: nn.Module, out: DetectorOutput, batch: list[dict], images: list[Tensor],
                targets: list[dict], seeds: list[int] | None = None) -> dict:
        """images: the unpadded student inputs on the device; targets: their GT in view coordinates;
        seeds: one per image for the random parts (RoI sampling, random masks), see models/sampling.py."""
        device = out.images.tensors.device
        teacher = self.source.outputs(batch, images)
        boxes = [t["boxes"] for t in targets]
        losses = {}
        if self.neck_on:
            losses.update(self.neck_losses(student, out, teacher, boxes, device, seeds))
        if self.bb_on:
            losses.update(self.backbone_losses(out, teacher, boxes, device))
        if self.cls_on:
            with seeded_sampling([self.kd_sampler], seeds):
                losses.update(self.cls_losses(student, out, teacher, boxes, device, seeds))
        return losses

    # -- neck (sections 1-2)
    def neck_losses(self, student: nn.Module, out: DetectorOutput, teacher: list, boxes: list[Tensor],
                    device, seeds: list[int] | None = None) -> dict:
        s_levels = self.neck_adapters(list(out.fpn.values()))
        t_levels, valids = _pad_teacher([[t.features[li] for t in teacher] for li in range(len(s_levels))],
                                        s_levels, device)
        sizes = [tuple(s.shape[-2:]) for s in s_levels]
        kind = self.preset["neck"]["mask"]
        anchors = num_a = None
        if kind == "fgfi":
            anchors, num_a = _level_anchors(student, out)
        generators = image_generators(seeds, "random_mask", device) if kind == "random" else None
        masks = build_level_masks(kind, boxes, sizes, self.strides, anchors_per_level=anchors,
                                  num_anchors_per_cell=num_a, finest_scale=self.finest_scale, generators=generators)
        terms = neck_distill_loss(s_levels, t_levels, masks, valids, self.preset["neck"]["alpha_obj"],
                                  self.preset["neck"]["alpha_bg"])
        if kind == "all":  # one term over all cells (paper Eq. 1)
            return {"loss_neck": terms["loss_neck_obj"] + terms["loss_neck_bg"]}
        return terms

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
        for t, gt in zip(teacher, boxes):
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
        # RoI's own IoU with the GT (METHOD.md sec 4 fix), never from the student's sampling.
        pos_masks, neg_masks = self.kd_sampler([p.long() for p in positive])
        keep = [(pm | nm).bool() for pm, nm in zip(pos_masks, neg_masks)]
        if cfg["mode"] == "sub_negative":  # per image: its sampled positives and as many of its negatives
            gens = image_generators(seeds, "sub_negative", device) or [None] * len(keep)
            keep = [_scatter_keep(k, subsample_negatives(p[k], g)) for k, p, g in zip(keep, positive, gens)]
        rois = [r[k] for r, k in zip(rois, keep)]
        t_all = torch.cat([lg[k] for lg, k in zip(t_logits, keep)])
        pos_all = torch.cat([p[k] for p, k in zip(positive, keep)])
        s_all = roi_class_logits(student, out.fpn, rois, out.images.image_sizes).float()
        if cfg["mode"] == "all":
            return {"loss_cls_kd": all_cls_kd_loss(s_all, t_all, float(cfg["t"]), float(cfg["lam"]))}
        return cls_kd_terms(s_all, t_all, pos_all, cfg["beta_obj"], cfg["beta_bg"], cfg["t_obj"], cfg["t_bg"])


def _scatter_keep(keep: Tensor, sub: Tensor) -> Tensor:
    """A keep-mask `sub` over the kept entries of `keep` -> a mask over all entries."""
    full = torch.zeros_like(keep)
    full[keep] = sub
    return full


def _pad_teacher(per_level: list[list[Tensor]], like: list[Tensor], device) -> tuple[list[Tensor], list[Tensor]]:
    """Per-image teacher maps (each its own canvas extent) -> batch tensors shaped like the
    student's padded maps, plus `valid` masks of each image's own canvas (METHOD.md sec 1)."""
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


def build_distiller(opts, student: ModelSpec, data: DetectionData, pre: Preprocessing, device) -> Distiller:
    preset = opts.distill
    if opts.cache:
        source = CacheSource(opts.cache, data, student, opts.storage_options)
    else:
        source = OnlineSource(opts.teacher, opts.teacher_checkpoint, data, student, preset,
                              ViewSet.parse(opts.views), device)
    distiller = Distiller(preset, student, source, data.num_classes)
    log(f"distilling with preset {preset['name']} from {source.description}: "
        + ", ".join(k for k, on in (("neck", distiller.neck_on), ("cls", distiller.cls_on),
                                    ("backbone", distiller.bb_on)) if on))
    return distiller
