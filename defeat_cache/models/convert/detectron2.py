"""detectron2 Faster R-CNN FPN and RetinaNet checkpoints -> torchvision names and layouts.

Key names, as detectron2's modules register them (ResNet with BasicStem and BottleneckBlock,
FPN, StandardRPNHead, FastRCNNConvFCHead, FastRCNNOutputLayers, RetinaNetHead):

    backbone.bottom_up.stem.conv1 (.norm: FrozenBN)   -> backbone.body.conv1 / bn1
    backbone.bottom_up.resK.i.convJ (.norm)          -> backbone.body.layer{K-1}.i.convJ / bnJ
    backbone.bottom_up.resK.0.shortcut (.norm)       -> backbone.body.layer{K-1}.0.downsample.0 / .1
    backbone.fpn_lateralK / fpn_outputK              -> backbone.fpn.inner_blocks / layer_blocks (finest first)
    backbone.top_block.p6 / p7                       -> backbone.fpn.extra_blocks.p6 / p7
    proposal_generator.rpn_head.conv / objectness_logits / anchor_deltas -> rpn.head.conv.0.0 / cls_logits / bbox_pred
    roi_heads.box_head.fc1 / fc2                     -> roi_heads.box_head.fc6 / fc7
    roi_heads.box_predictor.cls_score                -> roi_heads.box_predictor.cls_score (background last -> first)
    roi_heads.box_predictor.bbox_pred                -> roi_heads.box_predictor.bbox_pred (4 zero background rows added)
    head.cls_subnet.{0,2,4,6} / bbox_subnet.{0,2,4,6} -> head.{classification,regression}_head.conv.{0..3}.0
    head.cls_score / head.bbox_pred                  -> cls_logits (a background slot per anchor) / bbox_reg

detectron2 orders a cell's anchors size-major (for size: for ratio), torchvision ratio-major,
so RetinaNet's per-anchor rows are permuted (the RPN has one size per level: nothing moves).
Buffers that are computed, not learnt (`pixel_mean`/`pixel_std`, `cell_anchors`, in older files)
are consumed without being copied.
"""

from __future__ import annotations

import re

from ...errors import UserError
from .mapping import (COUNTER, TensorMap, add_background_box_rows, add_background_per_anchor,
                      anchors_size_major_to_ratio_major, background_last_to_first, resnet_depth)

NAME = "detectron2"

#: Zoo options that give detectron2's computation with its default (MSRA) weights (docs/convert.md).
COMPUTATION = {
    "faster_rcnn": {"roi_align.aligned": True, "roi_align.sampling_ratio": 0, "anchors.round": False,
                    "backbone.stride_in_1x1": True, "input.std": [1.0, 1.0, 1.0]},
    "retinanet": {"neck.extra_input": "c5", "neck.relu_before_p7": True, "anchors.round": False,
                  "backbone.stride_in_1x1": True, "input.std": [1.0, 1.0, 1.0]},
}

#: RetinaNet's cell anchors: 3 sizes (octaves) x 3 aspect ratios, detectron2's defaults.
RETINA_SIZES, RETINA_RATIOS = 3, 3

_DERIVED = re.compile(r"(pixel_mean|pixel_std|.*anchor_generator\.cell_anchors\.\d+)")


def recognise(state: dict) -> bool:
    return any(k.startswith("backbone.bottom_up.") for k in state)


def family_of(state: dict) -> str:
    if any(k.startswith("head.cls_score.") for k in state):
        return "retinanet"
    if any(k.startswith("roi_heads.box_predictor.cls_score.") for k in state):
        if not any(k.startswith("roi_heads.box_head.fc1.") for k in state):
            raise UserError("a detectron2 box head without fc1/fc2 (e.g. conv layers): only the 2-fc head "
                            "(FastRCNNConvFCHead with NUM_FC=2, NUM_CONV=0) converts to torchvision's TwoMLPHead")
        return "faster_rcnn"
    raise UserError("a detectron2 checkpoint of an architecture the converter does not know "
                    "(supported: Faster R-CNN FPN, RetinaNet)")


def depth_of(state: dict) -> int | None:
    return resnet_depth(state, "backbone.bottom_up.res4.", ".conv3.")


def num_classes_of(state: dict, family: str) -> int:
    """Including background, as the zoo counts (detectron2's COCO models: 80 -> 81)."""
    if family == "faster_rcnn":
        return int(state["roi_heads.box_predictor.cls_score.weight"].shape[0])
    anchors = int(state["head.bbox_pred.weight"].shape[0]) // 4
    return int(state["head.cls_score.weight"].shape[0]) // anchors + 1


def class_names(meta) -> list[str] | None:
    return None  # detectron2 checkpoints do not carry their dataset's class names


def default_channels(meta) -> str:
    return "bgr"  # detectron2's INPUT.FORMAT default, and that of its MSRA ImageNet weights


def map_tensors(tmap: TensorMap, family: str, num_classes: int, num_levels: int) -> None:
    s = tmap.source
    first_stage = 2 if family == "faster_rcnn" else 3
    body = "backbone.bottom_up"
    rules = [(rf"{body}\.stem\.conv1\.weight", "backbone.body.conv1.weight"),
             (rf"{body}\.stem\.conv1\.norm\.(\w+)", r"backbone.body.bn1.\1")]
    for k in range(2, 6):
        layer = f"backbone.body.layer{k - 1}"
        rules += [(rf"{body}\.res{k}\.(\d+)\.conv(\d)\.weight", rf"{layer}.\1.conv\2.weight"),
                  (rf"{body}\.res{k}\.(\d+)\.conv(\d)\.norm\.(\w+)", rf"{layer}.\1.bn\2.\3"),
                  (rf"{body}\.res{k}\.(\d+)\.shortcut\.weight", rf"{layer}.\1.downsample.0.weight"),
                  (rf"{body}\.res{k}\.(\d+)\.shortcut\.norm\.(\w+)", rf"{layer}.\1.downsample.1.\2")]
    for i in range(num_levels):
        stage = first_stage + i
        rules += [(rf"backbone\.fpn_lateral{stage}\.(weight|bias)", rf"backbone.fpn.inner_blocks.{i}.0.\1"),
                  (rf"backbone\.fpn_output{stage}\.(weight|bias)", rf"backbone.fpn.layer_blocks.{i}.0.\1")]
    if family == "faster_rcnn":
        rpn = "proposal_generator.rpn_head"
        rules += [(rf"{rpn}\.conv\.(weight|bias)", r"rpn.head.conv.0.0.\1"),
                  (rf"{rpn}\.objectness_logits\.(weight|bias)", r"rpn.head.cls_logits.\1"),
                  (rf"{rpn}\.anchor_deltas\.(weight|bias)", r"rpn.head.bbox_pred.\1"),
                  (r"roi_heads\.box_head\.fc1\.(weight|bias)", r"roi_heads.box_head.fc6.\1"),
                  (r"roi_heads\.box_head\.fc2\.(weight|bias)", r"roi_heads.box_head.fc7.\1")]
        for part in ("weight", "bias"):
            tmap.put(f"roi_heads.box_predictor.cls_score.{part}",
                     background_last_to_first(tmap.take(f"roi_heads.box_predictor.cls_score.{part}")))
            tmap.put(f"roi_heads.box_predictor.bbox_pred.{part}",
                     add_background_box_rows(tmap.take(f"roi_heads.box_predictor.bbox_pred.{part}"), num_classes - 1))
    else:
        rules += [(r"backbone\.top_block\.(p6|p7)\.(weight|bias)", r"backbone.fpn.extra_blocks.\1.\2")]
        for ours, theirs in (("classification_head", "cls_subnet"), ("regression_head", "bbox_subnet")):
            # Sequential(conv, ReLU, conv, ReLU, ...): the convolutions sit at even indices
            for j in range(4):
                rules.append((rf"head\.{theirs}\.{2 * j}\.(weight|bias)", rf"head.{ours}.conv.{j}.0.\1"))
        anchors = int(s["head.bbox_pred.weight"].shape[0]) // 4
        if anchors != RETINA_SIZES * RETINA_RATIOS:
            raise UserError(f"detectron2 RetinaNet with {anchors} anchors per location: the converter knows "
                            f"{RETINA_SIZES} sizes x {RETINA_RATIOS} aspect ratios (detectron2's default)")
        for part in ("weight", "bias"):
            cls = anchors_size_major_to_ratio_major(tmap.take(f"head.cls_score.{part}"), RETINA_SIZES, RETINA_RATIOS)
            tmap.put(f"head.classification_head.cls_logits.{part}", add_background_per_anchor(cls, anchors, part == "bias"))
            tmap.put(f"head.regression_head.bbox_reg.{part}",
                     anchors_size_major_to_ratio_major(tmap.take(f"head.bbox_pred.{part}"), RETINA_SIZES, RETINA_RATIOS))
    tmap.rename(rules)
    tmap.skip(lambda k: k.endswith(COUNTER) or bool(_DERIVED.fullmatch(k)))


__all__ = ["COMPUTATION", "NAME", "class_names", "default_channels", "depth_of", "family_of", "map_tensors",
           "num_classes_of", "recognise"]
