"""The dataset-independent record of one image and its annotations."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import UserError


class DataError(UserError):
    """A user-facing problem with a dataset file; the message names the file and the fix."""


@dataclass
class ImageRecord:
    image_id: int
    file: Path
    height: int
    width: int
    boxes: np.ndarray  # [G, 4] float32 xyxy, original pixels; only boxes trained on
    labels: np.ndarray  # [G] int64, contiguous 1..K (0 is background)
    ignored_boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.float32))  # crowd / difficult


@dataclass
class DetectionData:
    """One split of a dataset: records, class names and a COCO-format ground truth for eval."""

    name: str
    split: str
    records: list[ImageRecord]
    class_names: list[str]  # index 0 is "__background__"
    category_ids: list[int]  # dataset category id of contiguous label i+1
    coco_gt: dict  # COCO-format ground truth with the dataset's own ids
    format: str = "coco"
    dropped: dict = field(default_factory=dict)  # reason -> count of annotations not trained on
    voc_gt: list | None = None  # per image {"image_id","boxes","labels","difficult"} for VOC07 mAP

    @property
    def num_classes(self) -> int:
        """Classes including background, as torchvision detectors count them."""
        return len(self.class_names)

    def fingerprint(self) -> str:
        """Digest of what a teacher cache depends on: image ids, files, sizes, trained boxes and labels.

        Training refuses a cache whose fingerprint differs, since its GT logits and proposals
        are aligned to exactly these records.
        """
        h = hashlib.sha256()
        h.update(json.dumps([self.class_names, self.category_ids]).encode())
        for r in self.records:
            h.update(f"{r.image_id}|{r.file.name}|{r.height}|{r.width}|".encode())
            h.update(np.ascontiguousarray(r.boxes, dtype=np.float32).tobytes())
            h.update(np.ascontiguousarray(r.labels, dtype=np.int64).tobytes())
        return h.hexdigest()[:32]

    def summary(self) -> str:
        n_boxes = sum(len(r.boxes) for r in self.records)
        empty = sum(1 for r in self.records if len(r.boxes) == 0)
        text = (f"{self.name}/{self.split}: {len(self.records)} images, {n_boxes} boxes, "
                f"{self.num_classes - 1} classes, {empty} images without boxes")
        if self.dropped:
            text += "; not trained on: " + ", ".join(f"{v} {k}" for k, v in sorted(self.dropped.items()))
        return text
