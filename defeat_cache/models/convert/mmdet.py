"""mmdetection (2.x and 3.x) Faster R-CNN FPN and RetinaNet checkpoints -> torchvision names and layouts.

Key names, as mmdetection's modules register them (ResNet, FPN, RPNHead, Shared2FCBBoxHead,
RetinaHead); 2.x and 3.x name these models' tensors alike:

    backbone.conv1 / bn1 / layerN.i.convJ / bnJ / downsample.{0,1}  -> backbone.body.<same>
    neck.lateral_convs.i.conv          -> backbone.fpn.inner_blocks.i.0
    neck.fpn_convs.i.conv              -> backbone.fpn.layer_blocks.i.0 (i < 3 or 4), RetinaNet's
                                          extra fpn_convs.3 / .4 -> backbone.fpn.extra_blocks.p6 / p7
    rpn_head.rpn_conv / rpn_cls / rpn_reg   -> rpn.head.conv.0.0 / cls_logits / bbox_pred
    roi_head.bbox_head.shared_fcs.0 / .1    -> roi_heads.box_head.fc6 / fc7
    roi_head.bbox_head.fc_cls          -> roi_heads.box_predictor.cls_score  (background last -> first)
    roi_head.bbox_head.fc_reg          -> roi_heads.box_predictor.bbox_pred  (no background slot -> 4 zero rows)
    bbox_head.cls_convs.i.conv / reg_convs.i.conv -> head.{classification,regression}_head.conv.i.0
    bbox_head.retina_cls               -> head.classification_head.cls_logits (a background slot per anchor)
    bbox_head.retina_reg               -> head.regression_head.bbox_reg

Checkpoints from before mmdetection wrapped RetinaNet's head convolutions in ConvModule
(`cls_convs.i.weight`) are read too. mmdetection 1.x checkpoints (`bbox_head.` at the top of a
two-stage model, background first) are refused: mmdetection's own upgrade tool converts them.
Anchors: mmdetection orders cell anchors ratio-major like torchvision, so no permutation.
"""

from __future__ import annotations

from ...errors import UserError
from .mapping import (COUNTER, TensorMap, add_background_box_rows, add_background_per_anchor,
                      background_last_to_first, resnet_depth)

NAME = "mmdetection"

#: Zoo options that give mmdetection's computation (docs/convert.md explains each).
COMPUTATION = {
    "faster_rcnn": {"roi_align.aligned": True, "roi_align.sampling_ratio": 0, "anchors.round": False},
    "retinanet": {"neck.extra_input": "c5", "neck.relu_before_p7": False, "anchors.round": False},
}


def recognise(state: dict) -> bool:
    return any(k.startswith("neck.lateral_convs.") for k in state) and any(k.startswith("backbone.layer") for k in state)


def family_of(state: dict) -> str:
    if any(k.startswith("bbox_head.retina_cls.") for k in state):
        return "retinanet"
    if any(k.startswith("roi_head.bbox_head.") for k in state) and any(k.startswith("rpn_head.") for k in state):
        return "faster_rcnn"
    if any(k.startswith("bbox_head.fc_cls") for k in state):
        raise UserError("an mmdetection 1.x checkpoint (bbox_head at the top, background first): upgrade it with "
                        "mmdetection 2.x's tools/model_converters/upgrade_model_version.py, then convert")
    raise UserError("an mmdetection checkpoint of an architecture the converter does not know "
                    "(supported: Faster R-CNN FPN with Shared2FCBBoxHead, RetinaNet)")


def depth_of(state: dict) -> int | None:
    return resnet_depth(state, "backbone.layer3.", ".conv3.")


def num_classes_of(state: dict, family: str) -> int:
    """Including background, as the zoo counts (mmdetection's COCO models: 80 -> 81)."""
    if family == "faster_rcnn":
        return int(state["roi_head.bbox_head.fc_cls.weight"].shape[0])  # K classes + background
    anchors = int(state["bbox_head.retina_reg.weight"].shape[0]) // 4
    return int(state["bbox_head.retina_cls.weight"].shape[0]) // anchors + 1


def class_names(meta) -> list[str] | None:
    """mmdetection 2.x keeps `meta['CLASSES']`, 3.x `meta['dataset_meta']['classes']`."""
    if not isinstance(meta, dict):
        return None
    names = meta.get("CLASSES") or (meta.get("dataset_meta") or {}).get("classes")
    return [str(n) for n in names] if names else None


def default_channels(meta) -> str:
    """Input channel order its first convolution expects: BGR for caffe-style configs (`to_rgb=False`)."""
    text = str((meta or {}).get("config") or (meta or {}).get("cfg") or "") if isinstance(meta, dict) else ""
    compact = text.replace(" ", "")
    return "bgr" if ("to_rgb=False" in compact or "bgr_to_rgb=False" in compact) else "rgb"


def map_tensors(tmap: TensorMap, family: str, num_classes: int, num_levels: int) -> None:
    """Fills `tmap.out` with torchvision names; `num_levels` = the FPN's levels from backbone stages."""
    rules = [(r"backbone\.((conv1|bn1|layer\d+)\..*)", r"backbone.body.\1"),
             (r"neck\.lateral_convs\.(\d+)\.conv\.(weight|bias)", r"backbone.fpn.inner_blocks.\1.0.\2")]
    rules += [(rf"neck\.fpn_convs\.{i}\.conv\.(weight|bias)", rf"backbone.fpn.layer_blocks.{i}.0.\1")
              for i in range(num_levels)]
    if family == "faster_rcnn":
        s = tmap.source
        rules += [(r"rpn_head\.rpn_conv\.(weight|bias)", r"rpn.head.conv.0.0.\1"),
                  (r"rpn_head\.rpn_cls\.(weight|bias)", r"rpn.head.cls_logits.\1"),
                  (r"rpn_head\.rpn_reg\.(weight|bias)", r"rpn.head.bbox_pred.\1"),
                  (r"roi_head\.bbox_head\.shared_fcs\.0\.(weight|bias)", r"roi_heads.box_head.fc6.\1"),
                  (r"roi_head\.bbox_head\.shared_fcs\.1\.(weight|bias)", r"roi_heads.box_head.fc7.\1")]
        anchors = int(s["rpn_head.rpn_reg.weight"].shape[0]) // 4
        if int(s["rpn_head.rpn_cls.weight"].shape[0]) != anchors:
            raise UserError("mmdetection RPN with a softmax classifier (2 logits per anchor): torchvision's "
                            "RPN has one sigmoid logit per anchor; use a checkpoint with use_sigmoid=True")
        for part in ("weight", "bias"):
            tmap.put(f"roi_heads.box_predictor.cls_score.{part}",
                     background_last_to_first(tmap.take(f"roi_head.bbox_head.fc_cls.{part}")))
            tmap.put(f"roi_heads.box_predictor.bbox_pred.{part}",
                     add_background_box_rows(tmap.take(f"roi_head.bbox_head.fc_reg.{part}"), num_classes - 1))
    else:
        rules += [(rf"neck\.fpn_convs\.{num_levels}\.conv\.(weight|bias)", r"backbone.fpn.extra_blocks.p6.\1"),
                  (rf"neck\.fpn_convs\.{num_levels + 1}\.conv\.(weight|bias)", r"backbone.fpn.extra_blocks.p7.\1")]
        for ours, theirs in (("classification_head", "cls_convs"), ("regression_head", "reg_convs")):
            rules += [(rf"bbox_head\.{theirs}\.(\d+)\.conv\.(weight|bias)", rf"head.{ours}.conv.\1.0.\2"),
                      (rf"bbox_head\.{theirs}\.(\d+)\.(weight|bias)", rf"head.{ours}.conv.\1.0.\2")]  # pre-ConvModule
        rules += [(r"bbox_head\.retina_reg\.(weight|bias)", r"head.regression_head.bbox_reg.\1")]
        anchors = int(tmap.source["bbox_head.retina_reg.weight"].shape[0]) // 4
        for part in ("weight", "bias"):
            tmap.put(f"head.classification_head.cls_logits.{part}",
                     add_background_per_anchor(tmap.take(f"bbox_head.retina_cls.{part}"), anchors, part == "bias"))
    tmap.rename(rules)
    tmap.skip(lambda k: k.endswith(COUNTER))


__all__ = ["COMPUTATION", "NAME", "class_names", "default_channels", "depth_of", "family_of", "map_tensors",
           "num_classes_of", "recognise"]
