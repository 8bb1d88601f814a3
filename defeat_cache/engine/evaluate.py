"""Run a detector over a split and score it (COCO bbox AP and AR via pycocotools; VOC07 mAP for VOC).

The metrics are a flat dict of named numbers: the twelve of `metrics.COCO_METRIC_NAMES` (None for
an area range without ground truth), ``VOC07_mAP50`` for VOC data and ``eval_seconds``; with
``classwise``, also ``per_class``: the AP of every category (`metrics.CocoBoxResult`).

Under torchrun each rank predicts its own stride of the images; rank 0 gathers the
detections and scores them (the other ranks get None).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

from .. import distributed as du
from ..data.dataset import ViewDataset, check_batch, collate
from ..data.records import DetectionData
from ..models.detector import view_inputs
from ..options import check_int
from ..progress import progress
from ..views import Preprocessing, ViewSet
from .metrics import coco_bbox_evaluation, voc07_map


@torch.no_grad()
def check_loader_options(batch_size, workers) -> None:
    """Evaluation's batch size and DataLoader workers, as `eval` spells them (one-line errors)."""
    check_int("--batch-size", batch_size, 1, "images per forward")
    check_int("--workers", workers, 0, "DataLoader worker processes; 0 = load data in the main process")


def predict(model: nn.Module, data: DetectionData, pre: Preprocessing, device: torch.device,
            batch_size: int = 8, workers: int = 2, show_progress: bool = True) -> list[dict]:
    """Detections in original image coordinates: one dict per image (boxes, scores, labels),
    for this rank's images (every `world_size`-th, from its rank) when run under torchrun."""
    check_loader_options(batch_size, workers)
    model.eval().to(device)
    with view_inputs(model):  # the dataset gives views: resized and normalised already
        return _predict_views(model, data, pre, device, batch_size, workers, show_progress)


def _predict_views(model, data, pre, device, batch_size, workers, show_progress) -> list[dict]:
    dataset = ViewDataset(data, pre, ViewSet(("orig",)))
    mine = list(range(du.rank(), len(dataset), du.world_size()))
    loader = DataLoader(dataset, batch_size=batch_size, sampler=mine, collate_fn=collate,
                        num_workers=workers, persistent_workers=False)
    results = []
    bar = progress(len(dataset), "eval", unit="img", enabled=show_progress)
    use_amp = device.type == "cuda"
    for batch in loader:
        images = [s["image"].to(device, non_blocking=True) for s in check_batch(batch)]
        with torch.autocast(device.type, enabled=use_amp):
            outputs = model(images)
        for s, out in zip(batch, outputs):
            boxes = s["geometry"].boxes_to_original(out["boxes"].float().cpu())
            h, w = s["geometry"].orig_size
            boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)
            boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
            results.append({"image_index": s["image_index"], "boxes": boxes,
                            "scores": out["scores"].float().cpu(), "labels": out["labels"].cpu()})
        bar.update(min(len(batch) * du.world_size(), bar.total - bar.n))  # the ranks' strides together
    bar.close()
    return results


def coco_detections(data: DetectionData, predictions: list[dict]) -> list[dict]:
    """COCO results format ([{image_id, category_id, bbox: [x, y, w, h], score}]) with the dataset's own ids."""
    dets = []
    for p in predictions:
        image_id = data.records[p["image_index"]].image_id
        for box, s, lab in zip(p["boxes"].tolist(), p["scores"].tolist(), p["labels"].tolist()):
            dets.append({"image_id": image_id, "category_id": data.category_ids[lab - 1],
                         "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]], "score": s})
    return dets


def score(data: DetectionData, predictions: list[dict], classwise: bool = False) -> dict:
    """The metrics of `predictions` (from `predict`, all images) against `data`'s ground truth."""
    dets = coco_detections(data, predictions)
    coco = coco_bbox_evaluation(data.coco_gt, dets)
    metrics: dict = dict(coco.metrics)
    if data.voc_gt is not None:
        # continuous predicted boxes -> VOC's inclusive pixel convention of the ground truth
        voc_dets = [{"image_id": data.records[p["image_index"]].image_id, "label": lab,
                     "box": [box[0], box[1], box[2] - 1, box[3] - 1], "score": s}
                    for p in predictions
                    for box, s, lab in zip(p["boxes"].tolist(), p["scores"].tolist(), p["labels"].tolist())]
        metrics["VOC07_mAP50"] = voc07_map(data.voc_gt, voc_dets, data.num_classes - 1)["mAP"]
    if classwise:
        metrics["per_class"] = coco.per_class
    return metrics


def evaluate(model: nn.Module, data: DetectionData, pre: Preprocessing, device: torch.device,
             batch_size: int = 8, workers: int = 2, show_progress: bool = True,
             classwise: bool = False, detections_path: str | Path | None = None) -> dict | None:
    """The split's metrics (see the module docstring); under torchrun on rank 0 only (None on the other ranks).
    `detections_path`: also write every rank's detections there (rank 0, COCO results format)."""
    start = time.time()
    predictions = du.gather_to_main(predict(model, data, pre, device, batch_size, workers, show_progress))
    if predictions is None:
        return None
    predictions.sort(key=lambda p: p["image_index"])
    if detections_path is not None:
        write_json_atomic(detections_path, coco_detections(data, predictions))
    metrics = score(data, predictions, classwise)
    metrics["eval_seconds"] = round(time.time() - start, 1)
    return metrics


def write_json_atomic(path: str | Path, obj) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)


__all__ = ["coco_detections", "evaluate", "predict", "score", "write_json_atomic"]
