"""Tests for defeat_cache.engine.metrics (COCO box AP via pycocotools, VOC2007 11-point mAP)."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from defeat_cache.engine.metrics import COCO_METRIC_NAMES, coco_bbox_evaluation, coco_bbox_metrics, voc07_map
from defeat_cache.engine.metrics_text import format_classwise, format_metrics, percent

# --------------------------------------------------------------------------------------
# COCO helpers
# --------------------------------------------------------------------------------------


def _coco(annotations, categories=(1,), images=(1,)):
    return {
        "images": [{"id": i, "width": 640, "height": 480} for i in images],
        "annotations": annotations,
        "categories": [{"id": c, "name": f"c{c}"} for c in categories],
    }


def _ann(ann_id, bbox, cat=1, image_id=1, **extra):
    w, h = bbox[2], bbox[3]
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": cat,
        "bbox": list(bbox),
        "area": w * h,
        "iscrowd": 0,
        **extra,
    }


def _det(bbox, score, cat=1, image_id=1):
    return {"image_id": image_id, "category_id": cat, "bbox": list(bbox), "score": score}


# Two medium-sized (50x50 = 2500 px^2, inside [32^2, 96^2]) well-separated boxes.
GT_A = [10.0, 10.0, 50.0, 50.0]
GT_B = [200.0, 200.0, 50.0, 50.0]


# --------------------------------------------------------------------------------------
# COCO
# --------------------------------------------------------------------------------------


def test_coco_hand_computed_tp_then_fp():
    gt = _coco([_ann(1, GT_A), _ann(2, GT_B)])
    dets = [
        _det(GT_A, 0.9),  # perfect match of GT_A (IoU 1)
        _det([400.0, 300.0, 50.0, 50.0], 0.8),  # overlaps nothing -> FP
    ]
    m = coco_bbox_metrics(gt, dets)
    # Ranked list at any IoU threshold: TP, FP. 2 GTs.
    #   rank 1: recall 1/2, precision 1/1;  rank 2: recall 1/2, precision 1/2.
    # pycocotools makes precision non-increasing from the right -> [1, 1/2] and, for each
    # of the 101 recall thresholds r in {0, 0.01, ..., 1}, takes the precision at the
    # first rank with recall >= r (0 if none):
    #   r in {0.00, ..., 0.50}: 51 thresholds -> precision 1
    #   r in {0.51, ..., 1.00}: 50 thresholds -> recall never reaches r -> 0
    # AP50 = 51 / 101. The match has IoU 1, so every threshold 0.5..0.95 gives the same,
    # hence AP = AP75 = 51/101 too; both GTs are medium so APM equals it; pycocotools' -1 for
    # the empty small and large ranges is None (APS = APL = ARS = ARL).
    # Recall: one of the two GTs is found at every IoU threshold, at the first detection:
    # AR1 = AR10 = AR100 = ARM = 1/2.
    expected = 51 / 101
    assert m["AP50"] == pytest.approx(expected, abs=1e-9)
    assert m["AP"] == pytest.approx(expected, abs=1e-9)
    assert m["AP75"] == pytest.approx(expected, abs=1e-9)
    assert m["APM"] == pytest.approx(expected, abs=1e-9)
    for name in ("AR1", "AR10", "AR100", "ARM"):
        assert m[name] == pytest.approx(0.5), name
    assert m["APS"] is None and m["APL"] is None and m["ARS"] is None and m["ARL"] is None


def test_coco_hand_computed_fp_then_tp():
    gt = _coco([_ann(1, GT_A), _ann(2, GT_B)])
    dets = [_det([400.0, 300.0, 50.0, 50.0], 0.9), _det(GT_A, 0.8)]
    # Ranked list: FP, TP -> precision [0, 1/2], recall [0, 1/2]; the right-to-left max
    # makes it [1/2, 1/2], so thresholds r <= 0.5 (51 of 101) get 1/2 -> AP = 25.5/101.
    m = coco_bbox_metrics(gt, dets)
    assert m["AP50"] == pytest.approx(0.5 * 51 / 101, abs=1e-9)


def test_coco_perfect_detection_is_one():
    gt = _coco([_ann(1, GT_A), _ann(2, GT_B)])
    m = coco_bbox_metrics(gt, [_det(GT_A, 0.9), _det(GT_B, 0.7)])
    for key in ("AP", "AP50", "AP75", "APM", "AR10", "AR100", "ARM"):
        assert m[key] == pytest.approx(1.0)
    assert m["AR1"] == pytest.approx(0.5)  # both GTs are in one image: 1 detection per image finds one
    assert list(m) == list(COCO_METRIC_NAMES)
    assert all(isinstance(m[k], float) for k in COCO_METRIC_NAMES if k not in ("APS", "APL", "ARS", "ARL"))


def test_coco_shifted_box_iou_0_6():
    # 100x100 GT; detection shifted right by 25 px:
    # IoU = 75*100 / (10000 + 10000 - 7500) = 7500 / 12500 = 0.6
    gt = _coco([_ann(1, [0.0, 0.0, 100.0, 100.0])])
    m = coco_bbox_metrics(gt, [_det([25.0, 0.0, 100.0, 100.0], 0.9)])
    assert m["AP50"] == pytest.approx(1.0)
    assert m["AP75"] == pytest.approx(0.0)
    # Matched at 0.5 and 0.55, unmatched from 0.65 up (0.6 is a float tie) -> 2 or 3 of 10.
    assert m["AP"] in (pytest.approx(0.2), pytest.approx(0.3))
    assert m["APL"] == m["AP"]  # 100x100 = 10000 px^2 is "large"
    assert m["APS"] is None and m["APM"] is None


def test_coco_small_box_only_buckets_and_missing_area_iscrowd():
    # No "area"/"iscrowd": they must be filled (area = 10*10 = 100 < 32^2 -> small).
    gt = _coco([{"id": 1, "image_id": 1, "category_id": 1, "bbox": [5.0, 5.0, 10.0, 10.0]}])
    before = copy.deepcopy(gt)
    m = coco_bbox_metrics(gt, [_det([5.0, 5.0, 10.0, 10.0], 0.5)])
    assert m["APS"] == pytest.approx(1.0)
    assert m["AP"] == pytest.approx(1.0)
    assert m["APM"] is None
    assert m["APL"] is None
    assert gt == before  # filling happened on a copy


def test_coco_non_contiguous_category_ids_including_zero():
    gt = _coco(
        [_ann(1, GT_A, cat=0), _ann(2, GT_B, cat=42)],
        categories=(0, 7, 42),
    )
    dets = [
        _det(GT_A, 0.9, cat=0),  # category 0: perfect -> AP 1
        _det(GT_B, 0.8, cat=7),  # category 7 has no GT -> excluded (-1) by pycocotools
        # category 42: GT but no detection -> AP 0
    ]
    m = coco_bbox_metrics(gt, dets)
    # Mean over the categories with GT: (1 + 0) / 2. If category 0 were dropped the
    # result would be 0.
    assert m["AP"] == pytest.approx(0.5)
    assert m["AP50"] == pytest.approx(0.5)


def test_coco_annotation_id_zero_is_not_treated_as_unmatched():
    # pycocotools stores the matched GT id and reads 0 as "no match"; ids are renumbered.
    gt = _coco([_ann(0, GT_A), _ann(1, GT_B)])
    m = coco_bbox_metrics(gt, [_det(GT_A, 0.9), _det(GT_B, 0.8)])
    assert m["AP"] == pytest.approx(1.0)


def test_coco_multiple_images_and_numpy_inputs():
    gt = _coco([_ann(1, GT_A, image_id=3), _ann(2, GT_B, image_id=9)], images=(3, 9))
    dets = [
        {
            "image_id": np.int64(3),
            "category_id": np.int64(1),
            "bbox": np.array(GT_A, dtype=np.float32),
            "score": np.float32(0.9),
        },
        _det(GT_B, 0.8, image_id=9),
    ]
    assert coco_bbox_metrics(gt, dets)["AP"] == pytest.approx(1.0)


def test_coco_empty_detections_zero_where_there_is_ground_truth():
    gt = _coco([_ann(1, GT_A)])  # one medium box
    m = coco_bbox_metrics(gt, [])
    undefined = {"APS", "APL", "ARS", "ARL"}
    assert m == {k: None if k in undefined else 0.0 for k in COCO_METRIC_NAMES}


def test_coco_per_class_ap_non_contiguous_ids_and_a_class_without_ground_truth():
    # categories 3 (two GTs, one found: AP 51/101), 7 (no GT, but a detection) and 42 (one GT, found: 1)
    gt = _coco([_ann(1, GT_A, cat=3), _ann(2, GT_B, cat=3), _ann(3, [300.0, 100.0, 60.0, 40.0], cat=42)],
               categories=(42, 3, 7))
    gt["categories"] = [{"id": 42, "name": "star"}, {"id": 3, "name": "ring"}, {"id": 7, "name": "ghost"}]
    dets = [_det(GT_A, 0.9, cat=3), _det([400.0, 300.0, 50.0, 50.0], 0.8, cat=3),
            _det([10.0, 300.0, 30.0, 30.0], 0.7, cat=7), _det([300.0, 100.0, 60.0, 40.0], 0.6, cat=42)]
    result = coco_bbox_evaluation(gt, dets)
    assert [(c["category_id"], c["name"]) for c in result.per_class] == [(3, "ring"), (7, "ghost"), (42, "star")]
    ap = {c["category_id"]: c["AP"] for c in result.per_class}
    assert ap[3] == pytest.approx(51 / 101) and ap[42] == pytest.approx(1.0) and ap[7] is None
    # COCO's AP is the mean over the classes with ground truth: the per-class numbers add up to it
    assert result.metrics["AP"] == pytest.approx((ap[3] + ap[42]) / 2)
    table = format_classwise(result.per_class)
    row = {line.split()[1]: line.split() for line in table.splitlines()[2:] if len(line.split()) == 3}
    assert row["ghost"] == ["7", "ghost", "n/a"] and row["star"] == ["42", "star", "100.00"]
    assert row["ring"] == ["3", "ring", f"{100 * 51 / 101:.2f}"]
    assert "1 of 3 classes have no ground truth" in table


def test_coco_numbers_as_text_say_n_a_never_minus_100():
    gt = _coco([_ann(1, GT_A)])
    m = coco_bbox_metrics(gt, [_det(GT_A, 0.9)])
    text = format_metrics({**m, "eval_seconds": 1.5})
    lines = {line.split()[0]: line for line in text.splitlines()[1:-1]}
    assert list(lines) == list(COCO_METRIC_NAMES)
    assert lines["APL"].split()[1] == "n/a" and "no ground truth" in lines["APL"]
    assert lines["AP"].split()[1] == "100.00"
    assert "-1" not in text and "-100" not in text
    assert percent(None) == percent(-1.0) == "n/a" and percent(0.1234) == "12.34"


def test_coco_inputs_not_mutated_and_nothing_printed(capsys):
    gt = _coco([_ann(1, GT_A), _ann(2, GT_B, iscrowd=0)])
    dets = [_det(GT_A, 0.9), _det([400.0, 300.0, 50.0, 50.0], 0.8)]
    gt_before, dets_before = copy.deepcopy(gt), copy.deepcopy(dets)
    coco_bbox_metrics(gt, dets)
    assert gt == gt_before
    assert dets == dets_before
    assert capsys.readouterr().out == ""


def test_coco_unknown_image_id_raises():
    gt = _coco([_ann(1, GT_A)])
    with pytest.raises(ValueError, match="image ids"):
        coco_bbox_metrics(gt, [_det(GT_A, 0.9, image_id=123)])


# --------------------------------------------------------------------------------------
# VOC2007
# --------------------------------------------------------------------------------------

B1 = [0.0, 0.0, 9.0, 9.0]
B2 = [20.0, 20.0, 29.0, 29.0]
B3 = [40.0, 40.0, 49.0, 49.0]
NOWHERE = [100.0, 100.0, 109.0, 109.0]


def _img(image_id, boxes, labels, difficult=None):
    entry = {
        "image_id": image_id,
        "boxes": np.asarray(boxes, dtype=np.float64).reshape(-1, 4),
        "labels": np.asarray(labels, dtype=np.int64),
    }
    if difficult is not None:
        entry["difficult"] = np.asarray(difficult, dtype=bool)
    return entry


def _vdet(box, score, label=1, image_id=0):
    return {"image_id": image_id, "label": label, "box": list(box), "score": score}


def test_voc_hand_computed_11_point():
    gt = [_img(0, [B1, B2, B3], [1, 1, 1])]
    # Given out of order on purpose; by score the ranking is TP, FP, TP, TP.
    dets = [
        _vdet(B3, 0.6),
        _vdet(NOWHERE, 0.8),
        _vdet(B1, 0.9),
        _vdet(B2, 0.7),
    ]
    # rank:      1     2     3     4
    # cum TP:    1     1     2     3
    # cum FP:    0     1     1     1
    # recall:   1/3   1/3   2/3    1
    # precision: 1    1/2   2/3   3/4
    # 11-point: max precision over ranks with recall >= t
    #   t = 0, .1, .2, .3      -> all ranks       -> 1     (4 points)
    #   t = .4, .5, .6         -> ranks 3, 4      -> 3/4   (3 points)
    #   t = .7, .8, .9, 1.0    -> rank 4          -> 3/4   (4 points)
    # AP = (4 * 1 + 7 * 0.75) / 11 = 9.25 / 11
    out = voc07_map(gt, dets, num_classes=1)
    assert out["AP_per_class"][1] == pytest.approx(9.25 / 11)
    assert out["mAP"] == pytest.approx(9.25 / 11)


def test_voc_recall_exactly_a_tenth_keeps_reference_float_quirk():
    # 10 GTs, 3 perfect detections: recall reaches exactly 3/10 with precision 1. The
    # reference thresholds np.arange(0, 1.1, 0.1) have t[3] = 0.30000000000000004 > 0.3,
    # so only t = 0, .1, .2 score 1 -> AP = 3/11 (py-faster-rcnn / detectron2 / mmdet
    # give the same); exact tenths would give 4/11.
    boxes = [[20.0 * i, 0.0, 20.0 * i + 9.0, 9.0] for i in range(10)]
    gt = [_img(0, boxes, [1] * 10)]
    dets = [_vdet(boxes[i], 0.9 - 0.1 * i) for i in range(3)]
    assert voc07_map(gt, dets, 1)["AP_per_class"][1] == pytest.approx(3 / 11)


def test_voc_difficult_match_is_ignored():
    gt = [_img(0, [B1, B2], [1, 1], difficult=[False, True])]
    # Highest-scoring detection hits the difficult GT: ignored, not FP; the difficult GT
    # is not in the recall denominator (npos = 1). Counted as FP it would give AP 6/11;
    # counting the difficult GT in npos would give 6/11 as well.
    dets = [_vdet(B2, 0.9), _vdet(B1, 0.8)]
    out = voc07_map(gt, dets, num_classes=1)
    assert out["AP_per_class"][1] == pytest.approx(1.0)


def test_voc_class_without_non_difficult_gt_is_excluded():
    gt = [_img(0, [B1, B2], [1, 2], difficult=[False, True])]
    dets = [_vdet(B1, 0.9, label=1), _vdet(NOWHERE, 0.8, label=2)]
    # class 2: only a difficult GT -> AP undefined, left out; class 3: no GT at all.
    out = voc07_map(gt, dets, num_classes=3)
    assert out["AP_per_class"] == {1: pytest.approx(1.0)}
    assert out["mAP"] == pytest.approx(1.0)


def test_voc_class_with_gt_but_no_detections_counts_as_zero():
    gt = [_img(0, [B1, B2], [1, 2])]
    out = voc07_map(gt, [_vdet(B1, 0.9, label=1)], num_classes=2)
    assert out["AP_per_class"] == {1: pytest.approx(1.0), 2: 0.0}
    assert out["mAP"] == pytest.approx(0.5)


def test_voc_duplicate_detection_is_fp():
    gt = [_img(0, [B1, B2], [1, 1])]
    dets = [_vdet(B1, 0.9), _vdet(B1, 0.8), _vdet(B2, 0.7)]
    # TP, FP (duplicate), TP: recall .5, .5, 1; precision 1, 1/2, 2/3.
    # t = 0..0.5 (6 points) -> 1; t = 0.6..1.0 (5 points) -> 2/3.
    # AP = (6 + 5 * 2/3) / 11 = 28/33. (Duplicate as TP would give 1.)
    out = voc07_map(gt, dets, num_classes=1)
    assert out["AP_per_class"][1] == pytest.approx(28 / 33)


def test_voc_detection_assigned_to_best_gt_even_if_already_matched():
    # Devkit rule: compare against the max-IoU GT only. The second detection overlaps
    # GT1 best (IoU 98/102) which is already matched -> FP, even though it also overlaps
    # the unmatched GT2 with IoU 92/108 > 0.5.
    gt1 = [0.0, 0.0, 99.0, 99.0]
    gt2 = [10.0, 0.0, 109.0, 99.0]
    gt = [_img(0, [gt1, gt2], [1, 1])]
    dets = [_vdet(gt1, 0.9), _vdet([2.0, 0.0, 101.0, 99.0], 0.8)]
    # TP, FP: recall .5, .5 -> t = 0..0.5 give 1, the rest 0 -> AP = 6/11.
    assert voc07_map(gt, dets, 1)["AP_per_class"][1] == pytest.approx(6 / 11)


def test_voc_plus_one_pixel_convention():
    gt_box = [0.0, 0.0, 2.5, 2.5]
    det_box = [1.0, 0.0, 3.5, 2.5]
    # Without +1: inter 1.5*2.5 = 3.75, union 2*6.25 - 3.75 = 8.75 -> IoU 0.4286 (< 0.5).
    # With +1:    inter 2.5*3.5 = 8.75, union 2*12.25 - 8.75 = 15.75 -> IoU 0.5556 (>= 0.5).
    gt = [_img(0, [gt_box], [1])]
    assert voc07_map(gt, [_vdet(det_box, 0.9)], 1)["mAP"] == pytest.approx(1.0)


def test_voc_threshold_is_inclusive():
    # +1 convention: GT 3x3, det shifted by 1 -> inter 2*3 = 6, union 9 + 9 - 6 = 12 -> 0.5.
    gt = [_img(0, [[0.0, 0.0, 2.0, 2.0]], [1])]
    dets = [_vdet([1.0, 0.0, 3.0, 2.0], 0.9)]
    assert voc07_map(gt, dets, 1)["mAP"] == pytest.approx(1.0)
    assert voc07_map(gt, dets, 1, iou_threshold=0.51)["mAP"] == 0.0


def test_voc_detection_on_image_without_that_class_is_fp():
    gt = [_img(0, [B1], [1]), _img(1, np.zeros((0, 4)), [])]
    # FP (image 1 has no objects) outscoring the TP: precision at the TP is 1/2 -> AP 0.5.
    dets = [_vdet(B1, 0.9, image_id=1), _vdet(B1, 0.8, image_id=0)]
    assert voc07_map(gt, dets, 1)["mAP"] == pytest.approx(0.5)


def test_voc_no_detections_and_inputs_not_mutated():
    gt = [_img(0, [B1, B2], [1, 2], difficult=[False, False])]
    gt_before = copy.deepcopy(gt)
    out = voc07_map(gt, [], num_classes=2)
    assert out == {"mAP": 0.0, "AP_per_class": {1: 0.0, 2: 0.0}}
    for a, b in zip(gt, gt_before):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])


def test_voc_bad_inputs_raise():
    gt = [_img(0, [B1], [1])]
    with pytest.raises(ValueError):
        voc07_map(gt, [_vdet(B1, 0.9, image_id=5)], 1)
    with pytest.raises(ValueError):
        voc07_map(gt, [_vdet(B1, 0.9, label=2)], 1)
    with pytest.raises(ValueError):
        voc07_map([_img(0, [B1], [3])], [], 1)


def _reference_voc_eval(gt, dets, cls, ovthresh=0.5):
    """py-faster-rcnn ``voc_eval`` (use_07_metric=True), adapted to in-memory inputs."""
    class_recs, npos = {}, 0
    for g in gt:
        sel = g["labels"] == cls
        npos += int((~g["difficult"][sel]).sum())
        class_recs[g["image_id"]] = {
            "bbox": g["boxes"][sel],
            "difficult": g["difficult"][sel],
            "det": [False] * int(sel.sum()),
        }
    d = [x for x in dets if x["label"] == cls]
    conf = np.array([x["score"] for x in d])
    BB = np.array([x["box"] for x in d]).reshape(-1, 4)
    order = np.argsort(-conf, kind="stable")
    BB = BB[order]
    image_ids = [d[i]["image_id"] for i in order]
    tp, fp = np.zeros(len(d)), np.zeros(len(d))
    for k in range(len(d)):
        R, bb, ovmax = class_recs[image_ids[k]], BB[k], -np.inf
        BBGT = R["bbox"]
        if BBGT.size > 0:
            ixmin, iymin = np.maximum(BBGT[:, 0], bb[0]), np.maximum(BBGT[:, 1], bb[1])
            ixmax, iymax = np.minimum(BBGT[:, 2], bb[2]), np.minimum(BBGT[:, 3], bb[3])
            iw = np.maximum(ixmax - ixmin + 1.0, 0.0)
            ih = np.maximum(iymax - iymin + 1.0, 0.0)
            inters = iw * ih
            uni = (
                (bb[2] - bb[0] + 1.0) * (bb[3] - bb[1] + 1.0)
                + (BBGT[:, 2] - BBGT[:, 0] + 1.0) * (BBGT[:, 3] - BBGT[:, 1] + 1.0)
                - inters
            )
            overlaps = inters / uni
            ovmax, jmax = np.max(overlaps), np.argmax(overlaps)
        if ovmax > ovthresh:
            if not R["difficult"][jmax]:
                if not R["det"][jmax]:
                    tp[k] = 1.0
                    R["det"][jmax] = True
                else:
                    fp[k] = 1.0
        else:
            fp[k] = 1.0
    tp, fp = np.cumsum(tp), np.cumsum(fp)
    rec = tp / float(npos)
    prec = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
    ap = 0.0
    for t in np.arange(0.0, 1.1, 0.1):
        ap += (0 if np.sum(rec >= t) == 0 else np.max(prec[rec >= t])) / 11.0
    return ap


def test_voc_matches_reference_voc_eval_on_random_data():
    rng = np.random.default_rng(0)
    num_classes = 3
    compared = 0
    for _ in range(60):
        gt, dets = [], []
        for image_id in range(int(rng.integers(1, 6))):
            n = int(rng.integers(0, 7))
            xy = rng.uniform(0, 100, (n, 2))
            boxes = np.concatenate([xy, xy + rng.uniform(5, 40, (n, 2))], 1)
            labels = rng.integers(1, num_classes + 1, n)
            gt.append(_img(image_id, boxes, labels, difficult=rng.random(n) < 0.2))
            for j in range(n):  # jittered (sometimes mislabelled) copies of each GT
                for _ in range(int(rng.integers(0, 3))):
                    label = int(labels[j]) if rng.random() < 0.8 else int(rng.integers(1, 4))
                    box = boxes[j] + rng.normal(0, 4, 4)
                    dets.append(_vdet(box, float(rng.random()), label, image_id))
            for _ in range(int(rng.integers(0, 3))):  # background false positives
                xy = rng.uniform(0, 100, 2)
                box = np.concatenate([xy, xy + rng.uniform(5, 40, 2)])
                dets.append(_vdet(box, float(rng.random()), int(rng.integers(1, 4)), image_id))
        out = voc07_map(gt, dets, num_classes)
        for c in range(1, num_classes + 1):
            npos = sum(int((~g["difficult"][g["labels"] == c]).sum()) for g in gt)
            if npos == 0:
                assert c not in out["AP_per_class"]
                continue
            expected = _reference_voc_eval(gt, dets, c)
            assert out["AP_per_class"][c] == pytest.approx(expected, abs=1e-12)
            compared += 1
    assert compared > 100
