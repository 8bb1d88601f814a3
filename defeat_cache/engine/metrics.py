"""Detection metrics: COCO box AP and AR (via pycocotools) and PASCAL VOC2007 11-point mAP.

Entry points:

``coco_bbox_evaluation(coco_gt, detections)``
    Thin, file-free wrapper around pycocotools' ``COCOeval`` for ``iouType="bbox"``: the
    twelve summary numbers by name (``COCO_METRIC_NAMES``: AP, AP50, AP75, APS, APM, APL,
    AR1, AR10, AR100, ARS, ARM, ARL) as fractions in [0, 1], and the AP of every category.
    pycocotools reports ``-1`` for a bucket without ground truth (e.g. APL when the dataset
    has no large objects); that becomes ``None`` here (JSON ``null``, printed ``n/a``), so
    "no data" can never be averaged or plotted as an AP.

``coco_bbox_metrics(coco_gt, detections)``
    The twelve numbers alone.

``voc07_map(gt, detections, num_classes, iou_threshold=0.5)``
    Re-implementation of the VOC2007 devkit protocol (``VOCevaldet.m``, also
    py-faster-rcnn's ``voc_eval.py`` with ``use_07_metric=True``); see its docstring
    for the exact rules.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["COCO_AP_NAMES", "COCO_METRIC_NAMES", "CocoBoxResult", "coco_bbox_evaluation", "coco_bbox_metrics",
           "voc07_map"]

#: Keys returned by :func:`coco_bbox_metrics`, in pycocotools ``stats[0..11]`` order: AP at IoU
#: 0.50:0.95 / 0.50 / 0.75 (all areas), AP of small / medium / large objects, AR with at most 1 / 10 /
#: 100 detections per image (all areas), AR of small / medium / large objects (100 detections).
COCO_METRIC_NAMES: tuple[str, ...] = ("AP", "AP50", "AP75", "APS", "APM", "APL",
                                      "AR1", "AR10", "AR100", "ARS", "ARM", "ARL")
#: The six AP numbers (the columns of result tables).
COCO_AP_NAMES: tuple[str, ...] = COCO_METRIC_NAMES[:6]


# --------------------------------------------------------------------------------------
# COCO
# --------------------------------------------------------------------------------------


def _prepare_coco_gt(coco_gt: Mapping[str, Any]) -> dict[str, Any]:
    """Return a copy of ``coco_gt`` that pycocotools can evaluate safely.

    * every annotation dict is copied (COCOeval writes an ``ignore`` key into them);
    * missing ``area`` -> ``w * h`` of the bbox, missing ``iscrowd`` -> 0;
    * annotation ids are renumbered 1..N: COCOeval stores the matched GT *id* in its
      match table and treats 0 as "unmatched", so a GT with id 0 (or duplicated /
      missing ids) would silently corrupt the result. Ids are internal to the
      evaluation, so renumbering the copy changes nothing else;
    * missing ``categories`` are derived from the annotations' category ids.
    """
    if "images" not in coco_gt:
        raise ValueError("coco_gt must contain an 'images' list")
    annotations = []
    for new_id, ann in enumerate(coco_gt.get("annotations", []), start=1):
        ann = dict(ann)
        x, y, w, h = (float(v) for v in ann["bbox"])
        ann["bbox"] = [x, y, w, h]
        if "area" not in ann:
            ann["area"] = w * h
        if "iscrowd" not in ann:
            ann["iscrowd"] = 0
        ann["id"] = new_id
        annotations.append(ann)
    dataset: dict[str, Any] = dict(coco_gt)
    dataset["images"] = [dict(img) for img in coco_gt["images"]]
    dataset["annotations"] = annotations
    if "categories" in coco_gt:
        dataset["categories"] = [dict(cat) for cat in coco_gt["categories"]]
    else:
        cat_ids = sorted({ann["category_id"] for ann in annotations})
        dataset["categories"] = [{"id": c, "name": str(c)} for c in cat_ids]
    return dataset


def _prepare_detections(detections: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Copy detections into plain-Python dicts (``COCO.loadRes`` mutates its input)."""
    out = []
    for det in detections:
        x, y, w, h = (float(v) for v in det["bbox"])
        out.append(
            {
                "image_id": _as_py_scalar(det["image_id"]),
                "category_id": _as_py_scalar(det["category_id"]),
                "bbox": [x, y, w, h],
                "score": float(det["score"]),
            }
        )
    return out


def _as_py_scalar(value: Any) -> Any:
    """numpy / torch scalars -> Python scalars, so set/dict lookups match the GT ids."""
    return value.item() if hasattr(value, "item") else value


@dataclass
class CocoBoxResult:
    """What :func:`coco_bbox_evaluation` returns.

    ``metrics``: ``{name: fraction or None}`` for every name of ``COCO_METRIC_NAMES``.
    ``per_class``: one ``{"category_id", "name", "AP"}`` per category of the ground truth, in
    category id order; ``AP`` (IoU 0.50:0.95, all areas, 100 detections) is ``None`` for a
    category without ground truth.
    """

    metrics: dict[str, float | None]
    per_class: list[dict[str, Any]]


def _defined(value: float) -> float | None:
    """pycocotools' -1 ("no ground truth in this bucket") -> None."""
    return None if value < 0 else float(value)


def coco_bbox_evaluation(coco_gt: dict, detections: list[dict]) -> CocoBoxResult:
    """COCO bbox AP and AR of ``detections`` against ``coco_gt`` using pycocotools.

    Args:
        coco_gt: COCO-format dict with ``images``, ``annotations`` (``bbox`` as
            ``[x, y, w, h]``) and ``categories``. Annotations lacking ``area`` or
            ``iscrowd`` get ``area = w * h`` / ``iscrowd = 0`` on an internal copy;
            the input is never mutated.
        detections: ``[{"image_id", "category_id", "bbox": [x, y, w, h], "score"}]``.
            Every ``image_id`` must be one of ``coco_gt["images"]``. Not mutated. May be
            empty (every AP and AR with ground truth is then 0).

    Returns:
        A :class:`CocoBoxResult`: the twelve summary numbers (pycocotools ``stats``) and the
        per-category AP, read from COCOeval's precision array exactly as ``summarize`` reads
        AP (IoU 0.50:0.95, area all, maxDets 100), restricted to one category.

    pycocotools' progress prints are swallowed; nothing is written to disk.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    dataset = _prepare_coco_gt(coco_gt)
    dets = _prepare_detections(detections)

    image_ids = {img["id"] for img in dataset["images"]}
    unknown = {d["image_id"] for d in dets} - image_ids
    if unknown:
        sample = sorted(unknown, key=repr)[:5]
        raise ValueError(f"detections reference image ids not in coco_gt['images']: {sample}")

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = dataset
        gt.createIndex()
        if dets:
            dt = gt.loadRes(dets)
        else:  # loadRes cannot load an empty list; an empty result set scores the same way
            dt = COCO()
            dt.dataset = {"images": dataset["images"], "annotations": [], "categories": dataset["categories"]}
            dt.createIndex()
        evaluator = COCOeval(gt, dt, iouType="bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    metrics = {name: _defined(evaluator.stats[i]) for i, name in enumerate(COCO_METRIC_NAMES)}

    # precision: [IoU thresholds, recall thresholds, categories, area ranges, maxDets]; -1 where a
    # category has no ground truth (in that area range)
    params = evaluator.params
    precision = evaluator.eval["precision"][:, :, :, params.areaRngLbl.index("all"), params.maxDets.index(100)]
    names = {c["id"]: c.get("name", str(c["id"])) for c in dataset["categories"]}
    per_class = []
    for k, cat_id in enumerate(params.catIds):
        p = precision[:, :, k]
        p = p[p > -1]
        per_class.append({"category_id": _as_py_scalar(cat_id), "name": names[cat_id],
                          "AP": float(np.mean(p)) if p.size else None})
    return CocoBoxResult(metrics, per_class)


def coco_bbox_metrics(coco_gt: dict, detections: list[dict]) -> dict[str, float | None]:
    """The twelve COCO numbers (``COCO_METRIC_NAMES``) of :func:`coco_bbox_evaluation`: fractions
    in [0, 1], ``None`` for an area range without ground truth."""
    return coco_bbox_evaluation(coco_gt, detections).metrics


# --------------------------------------------------------------------------------------
# PASCAL VOC2007
# --------------------------------------------------------------------------------------


def _voc_iou(box: np.ndarray, gts: np.ndarray) -> np.ndarray:
    """IoU of one xyxy box against [G, 4] xyxy boxes, VOC devkit "+1 pixel" convention."""
    ixmin = np.maximum(gts[:, 0], box[0])
    iymin = np.maximum(gts[:, 1], box[1])
    ixmax = np.minimum(gts[:, 2], box[2])
    iymax = np.minimum(gts[:, 3], box[3])
    iw = np.maximum(ixmax - ixmin + 1.0, 0.0)
    ih = np.maximum(iymax - iymin + 1.0, 0.0)
    inter = iw * ih
    union = (
        (box[2] - box[0] + 1.0) * (box[3] - box[1] + 1.0)
        + (gts[:, 2] - gts[:, 0] + 1.0) * (gts[:, 3] - gts[:, 1] + 1.0)
        - inter
    )
    return inter / union


def _voc07_ap(recall: np.ndarray, precision: np.ndarray) -> float:
    """11-point interpolated AP: mean over t in {0, .1, ..., 1} of max(precision | recall >= t).

    The thresholds are ``np.arange(0.0, 1.1, 0.1)``, exactly as in py-faster-rcnn's
    ``voc_eval`` (and detectron2 / mmdet), so the numbers agree with those tools. Note the
    float rounding this carries: the 4th, 7th and 8th thresholds are 0.30000000000000004,
    0.6000000000000001 and 0.7000000000000001, so a recall of *exactly* 0.3 / 0.6 / 0.7
    (e.g. 3 of 10 GTs) does not reach that point. (MATLAB's ``0:0.1:1`` in the official
    devkit has the 0.3 artefact too, but hits 0.6 and 0.7 exactly.) The effect is visible
    only with small GT counts.
    """
    ap = 0.0
    for t in np.arange(0.0, 1.1, 0.1):
        mask = recall >= t
        ap += float(np.max(precision[mask])) if mask.any() else 0.0
    return ap / 11.0


def voc07_map(
    gt: list[dict],
    detections: list[dict],
    num_classes: int,
    iou_threshold: float = 0.5,
) -> dict:
    """PASCAL VOC2007 mAP (11-point interpolated AP per class), as the official devkit.

    Args:
        gt: one entry per evaluated image: ``{"image_id", "boxes": [G, 4] xyxy,
            "labels": [G] in 1..num_classes, "difficult": [G] bool}`` (``difficult``
            optional, default all False). Images without objects should still be listed
            (with empty boxes) if detections may refer to them.
        detections: ``[{"image_id", "label", "box": [x1, y1, x2, y2], "score"}]``; every
            ``image_id`` must appear in ``gt``.
        num_classes: number of foreground classes; labels are 1..num_classes.
        iou_threshold: minimum IoU (inclusive) for a match.

    Protocol, per class (``VOCevaldet.m``):
        * detections are sorted by descending score (stable sort, ties keep input order);
        * each detection is compared with *all* GTs of its class in its image using the
          devkit's "+1 pixel" IoU (width = x2 - x1 + 1) and assigned to the GT of maximal
          IoU. If that IoU >= ``iou_threshold``: a difficult GT -> detection ignored
          (neither TP nor FP); a not-yet-matched non-difficult GT -> TP (GT now
          matched); an already-matched GT -> FP (duplicate). Otherwise FP;
        * recall = cumTP / #non-difficult GTs, precision = cumTP / (cumTP + cumFP);
        * AP = 11-point interpolated average (see :func:`_voc07_ap`, which also notes the
          float-rounding quirk of the thresholds that is kept for compatibility).

    The only deliberate difference from py-faster-rcnn's ``voc_eval`` is the inclusive
    IoU test (``>=``, as the devkit; ``voc_eval`` uses ``>``), which matters only for an
    exact tie.

    Returns:
        ``{"mAP": float, "AP_per_class": {label: ap}}``. Classes without any
        non-difficult GT have undefined AP: they are left out of ``AP_per_class`` and
        of the mean. A class with GT but no detections has AP 0 and counts. If no class
        has non-difficult GT, ``mAP`` is 0.0.
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")

    # class -> image_id -> (boxes [G,4], difficult [G] bool, matched [G] bool)
    per_class: dict[int, dict[Any, tuple[np.ndarray, np.ndarray, np.ndarray]]] = {
        c: {} for c in range(1, num_classes + 1)
    }
    npos = {c: 0 for c in range(1, num_classes + 1)}
    seen_images: set = set()
    for entry in gt:
        image_id = _as_py_scalar(entry["image_id"])
        if image_id in seen_images:
            raise ValueError(f"image_id {image_id!r} appears more than once in gt")
        seen_images.add(image_id)
        boxes = np.asarray(entry["boxes"], dtype=np.float64).reshape(-1, 4)
        labels = np.asarray(entry["labels"], dtype=np.int64).reshape(-1)
        difficult = entry.get("difficult")
        if difficult is None:
            difficult = np.zeros(len(labels), dtype=bool)
        difficult = np.asarray(difficult, dtype=bool).reshape(-1)
        if not (len(boxes) == len(labels) == len(difficult)):
            raise ValueError(
                f"image {image_id!r}: boxes/labels/difficult lengths differ "
                f"({len(boxes)}, {len(labels)}, {len(difficult)})"
            )
        if len(labels) and (labels.min() < 1 or labels.max() > num_classes):
            raise ValueError(f"image {image_id!r}: gt labels must be in 1..{num_classes}")
        for c in np.unique(labels).tolist():
            sel = labels == c
            per_class[c][image_id] = (
                boxes[sel],
                difficult[sel],
                np.zeros(int(sel.sum()), dtype=bool),
            )
            npos[c] += int((~difficult[sel]).sum())

    dets_by_class: dict[int, list[tuple[float, Any, np.ndarray]]] = {
        c: [] for c in range(1, num_classes + 1)
    }
    for det in detections:
        image_id = _as_py_scalar(det["image_id"])
        if image_id not in seen_images:
            raise ValueError(f"detection refers to image_id {image_id!r} that is not in gt")
        label = int(_as_py_scalar(det["label"]))
        if not 1 <= label <= num_classes:
            raise ValueError(f"detection label {label} not in 1..{num_classes}")
        box = np.asarray(det["box"], dtype=np.float64).reshape(4)
        dets_by_class[label].append((float(det["score"]), image_id, box))

    empty = (np.zeros((0, 4)), np.zeros(0, dtype=bool), np.zeros(0, dtype=bool))
    ap_per_class: dict[int, float] = {}
    for c in range(1, num_classes + 1):
        if npos[c] == 0:
            continue  # AP undefined; excluded from the mean (devkit would divide by 0)
        dets = dets_by_class[c]
        if not dets:
            ap_per_class[c] = 0.0
            continue
        scores = np.array([d[0] for d in dets])
        order = np.argsort(-scores, kind="stable")
        tp = np.zeros(len(dets))
        fp = np.zeros(len(dets))
        for rank, idx in enumerate(order):
            _, image_id, box = dets[idx]
            gt_boxes, gt_difficult, matched = per_class[c].get(image_id, empty)
            if len(gt_boxes) == 0:
                fp[rank] = 1.0
                continue
            ious = _voc_iou(box, gt_boxes)
            j = int(np.argmax(ious))
            if ious[j] >= iou_threshold:
                if gt_difficult[j]:
                    continue  # ignored: neither TP nor FP
                if not matched[j]:
                    tp[rank] = 1.0
                    matched[j] = True
                else:
                    fp[rank] = 1.0  # duplicate detection
            else:
                fp[rank] = 1.0
        ctp = np.cumsum(tp)
        cfp = np.cumsum(fp)
        recall = ctp / npos[c]
        precision = ctp / np.maximum(ctp + cfp, np.finfo(np.float64).eps)
        ap_per_class[c] = _voc07_ap(recall, precision)

    m_ap = float(np.mean(list(ap_per_class.values()))) if ap_per_class else 0.0
    return {"mAP": m_ap, "AP_per_class": ap_per_class}
