"""Pascal VOC (VOCdevkit folders with Annotations/, ImageSets/Main/, JPEGImages/)."""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

import numpy as np

from .records import DataError, DetectionData, ImageRecord

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)


def _number(element: ET.Element, key: str, path: Path) -> float:
    text = element.findtext(key)
    try:
        return float(text)
    except (TypeError, ValueError):
        raise DataError(f"{path}: <{element.tag}><{key}> must be a number, got {text!r}") from None


def _parse_xml(path: Path, label_of: dict[str, int]):
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError) as e:
        raise DataError(f"{path}: cannot parse VOC annotation ({e})") from None
    size = root.find("size")
    if size is None:
        raise DataError(f"{path}: no <size> element; every VOC annotation needs width and height")
    width, height = (int(_number(size, k, path)) for k in ("width", "height"))
    objects = []
    for obj in root.findall("object"):
        name = (obj.findtext("name") or "").strip()
        bb = obj.find("bndbox")
        if name not in label_of or bb is None:
            objects.append(None)
            continue
        # VOC pixel coordinates are 1-based and inclusive: 0-based inclusive here (what VOC07
        # evaluation's +1 convention expects); training uses the continuous box (x2 + 1).
        x1, y1, x2, y2 = (_number(bb, k, path) - 1.0 for k in ("xmin", "ymin", "xmax", "ymax"))
        if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
            objects.append("non-finite")
            continue
        difficult = int(obj.findtext("difficult") or 0) == 1
        objects.append((x1, y1, x2, y2, label_of[name], difficult))
    return width, height, objects


def load_voc(roots: list[Path], image_set: str, name: str, split: str,
             classes: tuple[str, ...] = VOC_CLASSES) -> DetectionData:
    label_of = {c: i + 1 for i, c in enumerate(classes)}
    records, voc_gt = [], []
    coco_images, coco_anns = [], []
    dropped: Counter = Counter()
    for root in roots:
        ids_file = root / "ImageSets" / "Main" / f"{image_set}.txt"
        if not ids_file.is_file():
            raise DataError(f"{ids_file}: image set not found; check 'root' and 'image_set' in the dataset TOML")
        for stem in ids_file.read_text().split():
            width, height, objects = _parse_xml(root / "Annotations" / f"{stem}.xml", label_of)
            image_id = len(records)
            boxes, labels, ignored, all_boxes, all_labels, difficult = [], [], [], [], [], []
            for o in objects:
                if o is None:
                    dropped["objects of unknown class"] += 1
                    continue
                if o == "non-finite":
                    dropped["boxes with non-finite values"] += 1
                    continue
                x1, y1, x2, y2, lab, diff = o
                if x2 - x1 < 0 or y2 - y1 < 0:
                    dropped["zero/negative-size boxes"] += 1
                    continue
                all_boxes.append([x1, y1, x2, y2])
                all_labels.append(lab)
                difficult.append(diff)
                if diff:  # as in VOC evaluation: neither trained on nor counted as a miss
                    ignored.append([x1, y1, x2, y2])
                    dropped["difficult boxes (ignored in training)"] += 1
                else:
                    boxes.append([x1, y1, x2 + 1, y2 + 1])
                    labels.append(lab)
                coco_anns.append({"id": len(coco_anns) + 1, "image_id": image_id, "category_id": lab,
                                  "bbox": [x1, y1, x2 - x1 + 1, y2 - y1 + 1],
                                  "area": (x2 - x1 + 1) * (y2 - y1 + 1), "iscrowd": int(diff)})
            file = root / "JPEGImages" / f"{stem}.jpg"
            records.append(ImageRecord(image_id=image_id, file=file, height=height, width=width,
                                       boxes=np.asarray(boxes, np.float32).reshape(-1, 4),
                                       labels=np.asarray(labels, np.int64),
                                       ignored_boxes=np.asarray(ignored, np.float32).reshape(-1, 4)))
            voc_gt.append({"image_id": image_id, "boxes": np.asarray(all_boxes, np.float32).reshape(-1, 4),
                           "labels": np.asarray(all_labels, np.int64), "difficult": np.asarray(difficult, bool)})
            coco_images.append({"id": image_id, "file_name": str(file), "height": height, "width": width})
    coco_gt = {"images": coco_images, "annotations": coco_anns,
               "categories": [{"id": i + 1, "name": c} for i, c in enumerate(classes)]}
    return DetectionData(name=name, split=split, records=records, class_names=["__background__", *classes],
                         category_ids=list(range(1, len(classes) + 1)), coco_gt=coco_gt, format="voc",
                         dropped=dict(dropped), voc_gt=voc_gt)
