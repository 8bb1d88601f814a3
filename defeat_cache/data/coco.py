"""COCO-format annotations (any dataset in that format, not only COCO itself)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

from .records import DataError, DetectionData, ImageRecord


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise DataError(f"{path}: annotation file not found; check the path in the dataset TOML")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}); is it a COCO annotation file?") from None
    except UnicodeDecodeError:
        raise DataError(f"{path}: not a text file; expected a COCO annotation JSON") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object with 'images', 'annotations' and 'categories' "
                        f"(got a {type(data).__name__}; a detection results file is not an annotation file)")
    for key in ("images", "categories"):
        if not isinstance(data.get(key), list):
            raise DataError(f"{path}: missing the COCO list '{key}'; is it a COCO annotation file?")
    data.setdefault("annotations", [])
    return data


def load_coco(annotations: Path, images_dir: Path | None, name: str, split: str) -> DetectionData:
    data = _read_json(annotations)
    cats = sorted(data["categories"], key=lambda c: c["id"])  # contiguous labels follow id order
    category_ids = [int(c["id"]) for c in cats]
    if len(set(category_ids)) != len(category_ids):
        raise DataError(f"{annotations}: duplicate category ids in 'categories'")
    label_of = {cid: i + 1 for i, cid in enumerate(category_ids)}
    class_names = ["__background__"] + [str(c.get("name", c["id"])) for c in cats]

    anns_by_image: dict[int, list[dict]] = {}
    for a in data["annotations"]:
        anns_by_image.setdefault(a["image_id"], []).append(a)

    dropped: Counter = Counter()
    records = []
    for img in data["images"]:
        file = Path(img["file_name"])
        if not file.is_absolute():
            if images_dir is None:
                raise DataError(f"{annotations}: file_name {img['file_name']!r} is relative but the dataset "
                                "TOML gives no 'images' folder for this split")
            file = images_dir / file
        height, width = img.get("height"), img.get("width")
        if not height or not width:  # some exports omit sizes: read the header, not the pixels
            try:
                with Image.open(file) as im:
                    width, height = im.size
            except OSError as e:
                raise DataError(f"{file}: cannot read image (image id {img['id']}): {e}") from None
        boxes, labels, ignored = [], [], []
        for a in anns_by_image.get(img["id"], []):
            if a.get("category_id") not in label_of:
                dropped["with unknown category_id"] += 1
                continue
            bbox = a.get("bbox")
            if bbox is None or len(bbox) != 4:
                dropped["without a 4-number bbox"] += 1
                continue
            x, y, w, h = (float(v) for v in bbox)
            x1, y1 = max(0.0, x), max(0.0, y)
            x2, y2 = min(float(width), x + w), min(float(height), y + h)
            if a.get("iscrowd", 0):
                ignored.append([x1, y1, x2, y2])
                dropped["crowd boxes (ignored in training)"] += 1
                continue
            if x2 - x1 < 1.0 or y2 - y1 < 1.0:
                dropped["zero/negative-size boxes"] += 1
                continue
            boxes.append([x1, y1, x2, y2])
            labels.append(label_of[a["category_id"]])
        records.append(ImageRecord(
            image_id=int(img["id"]), file=file, height=int(height), width=int(width),
            boxes=np.asarray(boxes, np.float32).reshape(-1, 4),
            labels=np.asarray(labels, np.int64),
            ignored_boxes=np.asarray(ignored, np.float32).reshape(-1, 4),
        ))
    return DetectionData(name=name, split=split, records=records, class_names=class_names,
                         category_ids=category_ids, coco_gt=data, format="coco", dropped=dict(dropped))
