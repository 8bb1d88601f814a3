"""COCO numbers as text: one rule for how a metric is shown (x 100, `n/a` when undefined), the
12-number summary and the per-class AP table that `defeat-cache eval` prints, and the cells of
`defeat-cache report`'s tables."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from .metrics import COCO_METRIC_NAMES

NOT_AVAILABLE = "n/a"

#: What each COCO number is, in pycocotools' own words (its `summarize` lines).
COCO_METRIC_MEANINGS: dict[str, str] = {
    "AP": "AP @[IoU=0.50:0.95 | area=all    | maxDets=100]",
    "AP50": "AP @[IoU=0.50      | area=all    | maxDets=100]",
    "AP75": "AP @[IoU=0.75      | area=all    | maxDets=100]",
    "APS": "AP @[IoU=0.50:0.95 | area=small  | maxDets=100]",
    "APM": "AP @[IoU=0.50:0.95 | area=medium | maxDets=100]",
    "APL": "AP @[IoU=0.50:0.95 | area=large  | maxDets=100]",
    "AR1": "AR @[IoU=0.50:0.95 | area=all    | maxDets=1]",
    "AR10": "AR @[IoU=0.50:0.95 | area=all    | maxDets=10]",
    "AR100": "AR @[IoU=0.50:0.95 | area=all    | maxDets=100]",
    "ARS": "AR @[IoU=0.50:0.95 | area=small  | maxDets=100]",
    "ARM": "AR @[IoU=0.50:0.95 | area=medium | maxDets=100]",
    "ARL": "AR @[IoU=0.50:0.95 | area=large  | maxDets=100]",
}
assert tuple(COCO_METRIC_MEANINGS) == COCO_METRIC_NAMES


def percent(value: float | None, digits: int = 2) -> str:
    """A COCO fraction as a percentage (the way papers quote AP), `n/a` when it is undefined
    (None: no ground truth in that bucket; a stray pycocotools -1 reads the same)."""
    if value is None or value < 0:
        return NOT_AVAILABLE
    return f"{100 * value:.{digits}f}"


def format_metrics(metrics: Mapping) -> str:
    """The twelve COCO numbers of `engine.evaluate` (x 100), one a line with what each means,
    then the other numbers it returned (VOC07 mAP, eval seconds)."""
    lines = ["COCO bbox (x 100)"]
    for name in COCO_METRIC_NAMES:
        if name in metrics:
            value = metrics[name]
            note = "  (no ground truth in this range)" if value is None else ""
            lines.append(f"  {name:6s} {percent(value):>6s}   {COCO_METRIC_MEANINGS[name]}{note}")
    if "VOC07_mAP50" in metrics:
        lines.append(f"VOC07 mAP@0.5 (x 100) {percent(metrics['VOC07_mAP50'])}")
    if "eval_seconds" in metrics:
        lines.append(f"evaluated in {metrics['eval_seconds']} s")
    return "\n".join(lines)


def format_classwise(per_class: Sequence[Mapping]) -> str:
    """The per-class AP table (x 100; IoU 0.50:0.95, all areas, 100 detections): category id,
    class name, AP, `n/a` for a class without ground truth in the split."""
    width = max([len("class")] + [len(str(c["name"])) for c in per_class])
    lines = [f"per-class AP (x 100, IoU 0.50:0.95, area all, maxDets 100)",
             f"  {'category_id':>11s}  {'class':{width}s}  {'AP':>6s}"]
    for c in per_class:
        lines.append(f"  {c['category_id']:>11}  {str(c['name']):{width}s}  {percent(c['AP']):>6s}")
    missing = sum(c["AP"] is None for c in per_class)
    if missing:
        lines.append(f"  ({missing} of {len(per_class)} classes have no ground truth in this split: n/a)")
    return "\n".join(lines)


__all__ = ["COCO_METRIC_MEANINGS", "NOT_AVAILABLE", "format_classwise", "format_metrics", "percent"]
