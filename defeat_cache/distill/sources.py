"""Teacher sources: where a distillation run's teacher outputs come from.

- `CacheSource` streams a TeacherCache through the DataLoader (each sample carries its
  cached item); no teacher module is ever built. The cache dictates the student's exact
  input: its preprocessing and views.
- `OnlineSource` keeps a frozen teacher in memory and computes the same outputs with the same
  function the extractor uses (`models.teacher.teacher_outputs`), which is what makes the
  two modes comparable term by term (docs/design.md, invariant 1).

Both offer the same interface. The training loop takes from a source the student's data
(`preprocessing`, `views`, `dataset(data)`) and, each step, the teacher outputs of the batch
(`outputs(batch, images)`); the criterion (`distiller.Distiller`) only needs `facts`, what
the teacher is, to size its adaptation layers, and never sees the source itself.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor

from ..cache import CacheError, TeacherCache
from ..cache.reader import EncodedItem
from ..data.dataset import ViewDataset
from ..data.records import DataError, DetectionData
from ..errors import UserError
from ..models.checkpoint import load_weights
from ..models.teacher import teacher_outputs
from ..models.zoo import ModelSpec, build_detector, load_model_spec
from ..progress import log
from ..views import Preprocessing, ViewSet
from .compat import TeacherFacts
from .head_teacher import TeacherRoIHead


class TeacherSource(Protocol):
    """What `CacheSource` and `OnlineSource` both offer."""

    preprocessing: Preprocessing  # the student's exact input
    views: ViewSet
    facts: TeacherFacts
    roi_head: TeacherRoIHead | None  # the teacher's box head, for cls.rois = "student" (else None)

    def dataset(self, data: DetectionData) -> ViewDataset:
        """The student's samples of `data` (with the cached teacher items, for a cache)."""

    def outputs(self, batch: list[dict], images: list[Tensor]) -> list:
        """The teacher outputs of a batch's samples; `images`: the samples' images on the device."""


def _diff(ours: dict, theirs: dict) -> list[str]:
    return [f"{k}: cache {theirs.get(k)!r} vs this run {ours.get(k)!r}"
            for k in sorted(set(ours) | set(theirs)) if ours.get(k) != theirs.get(k)]


class CachedViewDataset(ViewDataset):
    """ViewDataset whose samples also carry the cached teacher item of that (image, view).

    ``decode_on_device``: the item stays encoded (`EncodedItem`) and `CacheSource.outputs`
    decodes it on the training device; ``in_memory``: decoded items held in RAM, read once
    (small caches and benchmarks: cache I/O and decoding out of the step)."""

    def __init__(self, data: DetectionData, pre: Preprocessing, views: ViewSet, cache,
                 decode_on_device: bool = False, in_memory: dict | None = None):
        super().__init__(data, pre, views)
        self.cache, self.decode_on_device, self.in_memory = cache, decode_on_device, in_memory

    def _item(self, index: int):
        if self.in_memory is not None:
            return self.in_memory[index]
        return self.cache.read_encoded(index) if self.decode_on_device else self.cache.read(index)

    def sample(self, image_index: int, view_index: int) -> dict:
        s = super().sample(image_index, view_index)
        # DataError, not UserError: ViewDataset turns it into an error value that
        # `check_batch` raises in the main process (not a DataLoader worker traceback).
        try:
            stored = self._item(self.cache.layout.item_index(image_index, view_index))
        except CacheError as e:
            raise DataError(str(e)) from None
        item = stored.record if isinstance(stored, EncodedItem) else stored
        if (item.image_index, item.view_index) != (image_index, view_index) or \
                tuple(item.image_size) != tuple(s["geometry"].image_size):
            raise DataError(f"cache item for image {image_index} view {view_index} does not match the "
                            f"rebuilt student input (sizes {item.image_size} vs {s['geometry'].image_size}); "
                            "the cache was made from different data or preprocessing")
        s["teacher"] = stored
        return s


class CacheSource:
    """Teacher outputs read from a cache; refuses a cache that does not fit the run."""

    def __init__(self, path: str, data: DetectionData, student: ModelSpec, storage_options: dict | None = None,
                 decode_on_device: bool = False, in_memory: bool = False, head_checkpoint: str | None = None,
                 head_model: str | None = None, device: torch.device = torch.device("cpu")):
        """head_checkpoint: the teacher checkpoint whose box head alone scores the student's
        proposals (cls.rois = "student"); head_model: its model (default: the manifest's teacher)."""
        self.cache = TeacherCache(path, storage_options=storage_options)
        self.decode_on_device = decode_on_device
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
            raise UserError(f"cache {path} does not match this training run: " + "; ".join(problems)
                            + ". Re-extract the cache for this dataset/preprocessing or use the matching ones.")
        self.preprocessing = Preprocessing.from_dict(cached_pre)
        self.views = ViewSet(tuple(prov["views"]))
        layout = self.cache.layout
        self.facts = TeacherFacts(
            family=prov["teacher"]["family"],
            fpn_levels=tuple(lv.name for lv in layout.feature_levels),
            backbone_stages=tuple(lv.name for lv in layout.backbone_levels),
            feature_channels=tuple(lv.channels for lv in layout.feature_levels),
            backbone_channels={lv.name: lv.channels for lv in layout.backbone_levels},
            description=f"cache {path} ({prov['teacher']['name']}, codec {layout.codec})")

        self.roi_head = None
        if head_checkpoint:
            self.roi_head = TeacherRoIHead.from_checkpoint(self._head_spec(prov, head_model, path), head_checkpoint,
                                                           data, device)

        self.in_memory = None
        if in_memory:
            log(f"reading the {len(self.cache)} items of {path} into memory")
            self.in_memory = {i: self.cache.read(i) for i in range(len(self.cache))}

    def _head_spec(self, prov: dict, head_model: str | None, path: str) -> ModelSpec:
        """The teacher model of --teacher-head: --teacher-head-model, else the one the manifest records."""
        if head_model:
            spec = load_model_spec(head_model)
        else:
            t = prov["teacher"]
            if "config" not in t:
                raise UserError(f"cache {path} does not record its teacher's model config; give --teacher-head-model")
            spec = ModelSpec(name=t["name"], family=t["family"], config=t["config"], preprocessing=self.preprocessing)
        cached = tuple(lv.channels for lv in self.cache.layout.feature_levels)
        if spec.has_roi_head and tuple(lv.channels for lv in spec.fpn_levels) != cached:
            raise UserError(f"--teacher-head-model {spec.name}: its FPN levels have {[lv.channels for lv in spec.fpn_levels]} "
                            f"channels, the cache's {list(cached)}; give the model the cache was extracted with "
                            f"({prov['teacher'].get('name')})")
        return spec

    def dataset(self, data: DetectionData) -> ViewDataset:
        return CachedViewDataset(data, self.preprocessing, self.views, self.cache,
                                 decode_on_device=self.decode_on_device, in_memory=self.in_memory)

    def outputs(self, batch: list[dict], images: list[Tensor]) -> list:
        device = images[0].device
        return [self.cache.decode_item(s["teacher"], device) if isinstance(s["teacher"], EncodedItem) else s["teacher"]
                for s in batch]


class OnlineSource:
    """A frozen teacher in memory (today's online distillation; our reference for faithfulness)."""

    def __init__(self, teacher_name: str, checkpoint: str, data: DetectionData, student: ModelSpec,
                 views: ViewSet, device: torch.device, proposals: int, pre_nms_top_n: int, with_backbone: bool,
                 with_roi_head: bool = False):
        spec = load_model_spec(teacher_name)
        diff = _diff(student.preprocessing.to_dict(), spec.preprocessing.to_dict())
        if diff:
            raise UserError(f"teacher {spec.name} and student {student.name} preprocess differently: "
                            + "; ".join(d.replace("cache", "teacher") for d in diff))
        teacher = build_detector(spec, data.num_classes)
        log(f"teacher {spec.name}: {load_weights(teacher, checkpoint, backbone_only=False, classes=data)} "
            f"from {checkpoint}")
        # A plain attribute on a non-Module: the teacher stays out of the student's
        # parameters, state dict and DDP.
        self.teacher = teacher.eval().to(device).requires_grad_(False)
        self.preprocessing, self.views = spec.preprocessing, views
        # the stages an extracted cache holds (C3-C5), so both sources index them alike
        self.facts = TeacherFacts.of_spec(spec, with_backbone=True,
                                          description=f"online teacher {spec.name} ({checkpoint})")
        self.proposals, self.pre_nms_top_n, self.with_backbone = proposals, pre_nms_top_n, with_backbone
        # cls.rois = "student": the in-memory teacher's own box head on its own features, the same
        # code path as a cache's head-only teacher (head_teacher.py)
        self.roi_head = TeacherRoIHead(teacher, spec, f"online teacher {spec.name}'s box head") \
            if with_roi_head and spec.has_roi_head else None

    def dataset(self, data: DetectionData) -> ViewDataset:
        return ViewDataset(data, self.preprocessing, self.views)

    def outputs(self, batch: list[dict], images: list[Tensor]) -> list:
        with torch.autocast(images[0].device.type, enabled=False):
            return teacher_outputs(self.teacher, [im.float() for im in images],
                                   [s["boxes"] for s in batch], self.proposals, self.pre_nms_top_n,
                                   self.with_backbone)


def build_teacher_source(data: DetectionData, student: ModelSpec, preset: dict, device: torch.device, *,
                         cache: str | None = None, storage_options: dict | None = None,
                         teacher: str | None = None, teacher_checkpoint: str | None = None,
                         views: str = "orig,hflip", cache_in_memory: bool = False,
                         teacher_head: str | None = None, teacher_head_model: str | None = None) -> TeacherSource:
    """A cache (`cache`, fsspec `storage_options` for a URL; it holds its own views) or an
    online teacher (`teacher` model name or TOML and its `teacher_checkpoint`, on `views`).
    On CUDA a cache's items travel encoded and are decoded on the device (less host-to-device
    traffic, no decoding in the DataLoader workers); on the CPU the workers decode them.

    `teacher_head` (cache mode): the teacher checkpoint whose box head scores the student's
    proposals, which a preset with cls.rois = "student" needs (`teacher_head_model`: its model,
    default the manifest's teacher); online, the teacher's own box head does."""
    student_rois = bool(preset["cls"]["enabled"]) and preset["cls"]["rois"] == "student"
    if teacher_head and not cache:
        raise UserError("--teacher-head is for --cache; with --teacher the online teacher's own box head scores "
                        "the student's proposals")
    if teacher_head_model and not teacher_head:
        raise UserError("--teacher-head-model names the model of --teacher-head; give --teacher-head CKPT too")
    if teacher_head and not student_rois:
        raise UserError(f"--teacher-head: preset {preset['name']} samples its cls KD RoIs from the teacher's cached "
                        "proposals (cls.rois = \"teacher\"), so it needs no teacher head; use a preset with "
                        "cls.rois = \"student\" (cls_student_rois) or --set cls.rois=student")
    if cache:
        if student_rois and not teacher_head:
            raise UserError(f"preset {preset['name']}: cls.rois = \"student\" needs the teacher's RoI head to score "
                            "the student's proposals: give --teacher-head CKPT (the teacher's checkpoint) with --cache")
        return CacheSource(cache, data, student, storage_options, decode_on_device=device.type == "cuda",
                           in_memory=cache_in_memory, head_checkpoint=teacher_head, head_model=teacher_head_model,
                           device=device)
    return OnlineSource(teacher, teacher_checkpoint, data, student, ViewSet.parse(views), device,
                        proposals=int(preset["teacher"]["proposals"]),
                        pre_nms_top_n=int(preset["teacher"]["pre_nms_top_n"]),
                        with_backbone=bool(preset["backbone"]["enabled"]), with_roi_head=student_rois)


__all__ = ["CacheSource", "CachedViewDataset", "OnlineSource", "TeacherFacts", "TeacherSource", "build_teacher_source"]
