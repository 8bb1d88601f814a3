"""COCO-format annotations (any dataset in that format, not only COCO itself)."""

from __future__ import annotations

import json
import math
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


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _entry(path: Path, items: list, key: str, i: int) -> dict:
    """`items[i]` of the COCO list `key`, which must be a JSON object."""
    obj = items[i]
    if not isinstance(obj, dict):
        raise DataError(f"{path}: {key}[{i}] is a {type(obj).__name__}, not a JSON object; "
                        "is it a COCO annotation file?")
    return obj


def _where(key: str, i: int, obj: dict) -> str:
    """How an error names an entry: its list position, and its id where it has one."""
    return f"{key}[{i}]" + (f" (id {obj['id']})" if "id" in obj else "")


def _integer_field(path: Path, key: str, i: int, obj: dict, name: str, what: str) -> int:
    if name not in obj:
        raise DataError(f"{path}: {_where(key, i, obj)} has no '{name}'; {what}")
    value = obj[name]
    if not isinstance(value, int) or isinstance(value, bool):
        raise DataError(f"{path}: {_where(key, i, obj)}: '{name}' must be an integer, got {value!r}")
    return value


def _image_ids(path: Path, images: list) -> list[int]:
    """The images' ids, refusing missing and duplicate ones: a shared id would train the second
    image with the first one's boxes and lose its own."""
    ids = [_integer_field(path, "images", i, _entry(path, images, "images", i), "id",
                          "every COCO image needs an integer id and a file_name") for i in range(len(images))]
    repeated = sorted(k for k, n in Counter(ids).items() if n > 1)
    if repeated:
        shown = ", ".join(str(k) for k in repeated[:5]) + (f" (+{len(repeated) - 5} more)" if len(repeated) > 5 else "")
        raise DataError(f"{path}: duplicate image ids in 'images': {shown}; each image needs its own id")
    return ids


def _bbox(path: Path, i: int, a: dict) -> list[float] | None:
    """The annotation's [x, y, w, h] as floats; None if it has none (dropped and counted).
    Anything but 4 numbers is refused: strings would otherwise be parsed or crash later."""
    bbox = a.get("bbox")
    if bbox is None or (isinstance(bbox, list) and len(bbox) != 4):
        return None
    if not isinstance(bbox, list) or not all(_is_number(v) for v in bbox):
        raise DataError(f"{path}: {_where('annotations', i, a)}: bbox must be 4 numbers [x, y, width, height], "
                        f"got {bbox!r}")
    return [float(v) for v in bbox]


class _Dropped:
    """Annotations not trained on: reason -> count, and for the reasons that hint at broken
    data also where it first happened (a count alone does not help find it)."""

    def __init__(self):
        self.counts: Counter = Counter()
        self.first: dict[str, str] = {}

    def add(self, reason: str, where: str | None = None) -> None:
        self.counts[reason] += 1
        if where is not None:
            self.first.setdefault(reason, where)

    def report(self) -> dict[str, int]:
        return {f"{r} (first: {self.first[r]})" if r in self.first else r: n for r, n in self.counts.items()}


def _annotations_by_image(path: Path, annotations, image_ids: set[int], dropped: _Dropped):
    """(image id -> [(list index, annotation)], the annotations evaluation sees). Annotations of
    no known image and boxes with NaN/Inf (which would clip to full-width boxes) are dropped."""
    if not isinstance(annotations, list):
        raise DataError(f"{path}: 'annotations' must be a list, got a {type(annotations).__name__}")
    by_image: dict[int, list[tuple[int, dict]]] = {}
    evaluable = []  # of known images, with a finite bbox
    for i in range(len(annotations)):
        a = _entry(path, annotations, "annotations", i)
        if "image_id" not in a:
            raise DataError(f"{path}: {_where('annotations', i, a)} has no 'image_id'; "
                            "every COCO annotation names the image it belongs to")
        if a["image_id"] not in image_ids:
            dropped.add("annotations whose image_id matches no image",
                        f"annotation id {a.get('id', '?')}, image_id {a['image_id']!r}")
            continue
        bbox = _bbox(path, i, a)
        if bbox is not None and not all(math.isfinite(v) for v in bbox):
            dropped.add("boxes with non-finite values", f"image id {a['image_id']!r}, annotation id {a.get('id', '?')}")
            continue
        by_image.setdefault(a["image_id"], []).append((i, a))
        if bbox is not None:
            evaluable.append(a)
    return by_image, evaluable


def load_coco(annotations: Path, images_dir: Path | None, name: str, split: str) -> DetectionData:
    data = _read_json(annotations)
    categories = [_entry(annotations, data["categories"], "categories", i) for i in range(len(data["categories"]))]
    for i, c in enumerate(categories):
        _integer_field(annotations, "categories", i, c, "id", "every COCO category needs an integer id and a name")
    cats = sorted(categories, key=lambda c: c["id"])  # contiguous labels follow id order
    category_ids = [int(c["id"]) for c in cats]
    if len(set(category_ids)) != len(category_ids):
        raise DataError(f"{annotations}: duplicate category ids in 'categories'")
    label_of = {cid: i + 1 for i, cid in enumerate(category_ids)}
    class_names = ["__background__"] + [str(c.get("name", c["id"])) for c in cats]
    image_ids = set(_image_ids(annotations, data["images"]))

    dropped = _Dropped()
    anns_by_image, evaluable = _annotations_by_image(annotations, data["annotations"], image_ids, dropped)

    records = []
    for k, img in enumerate(data["images"]):
        if "file_name" not in img:
            raise DataError(f"{annotations}: {_where('images', k, img)} has no 'file_name'; "
                            "every COCO image needs an integer id and a file_name")
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
        elif not (_is_number(height) and _is_number(width)):
            raise DataError(f"{annotations}: image id {img['id']}: width and height must be numbers, "
                            f"got {width!r} x {height!r}")
        boxes, labels, ignored = [], [], []
        for i, a in anns_by_image.get(img["id"], []):
            if a.get("category_id") not in label_of:
                dropped.add("with unknown category_id")
                continue
            bbox = _bbox(annotations, i, a)
            if bbox is None:
                dropped.add("without a 4-number bbox")
                continue
            x, y, w, h = bbox
            x1, y1 = max(0.0, x), max(0.0, y)
            x2, y2 = min(float(width), x + w), min(float(height), y + h)
            if a.get("iscrowd", 0):
                ignored.append([x1, y1, x2, y2])
                dropped.add("crowd boxes (ignored in training)")
                continue
            if x2 - x1 < 1.0 or y2 - y1 < 1.0:
                dropped.add("zero/negative-size boxes")
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
                         category_ids=category_ids, coco_gt=dict(data, annotations=evaluable), format="coco", dropped=dropped.report())
