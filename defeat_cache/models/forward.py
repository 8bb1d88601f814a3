"""Forward passes of torchvision detectors that also return what distillation needs.

torchvision's `model(images, targets)` returns only losses or detections. `detector_forward`
runs the same sub-modules in the same order as GeneralizedRCNN.forward / RetinaNet.forward
and keeps the intermediate FPN and backbone features, instead of forking the models.
Inference (evaluation) uses plain `model(images)`.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from torch import Tensor, nn
from torchvision.models.detection import RetinaNet
from torchvision.models.detection.image_list import ImageList


@dataclass
class DetectorOutput:
    images: ImageList  # padded batch and per-image (unpadded) sizes
    fpn: OrderedDict  # name -> [B, C, H, W], finest level first (the names torchvision's heads expect)
    body: list[Tensor]  # backbone stages the body returns (C2-C5 or C3-C5)
    losses: dict[str, Tensor] = field(default_factory=dict)
    proposals: list[Tensor] | None = None  # the RPN's proposals per image (detached), None for RetinaNet


def is_retinanet(model: nn.Module) -> bool:
    return isinstance(model, RetinaNet)


def backbone_features(model: nn.Module, images: ImageList) -> tuple[OrderedDict, list[Tensor]]:
    """(FPN levels, backbone stages) of a BackboneWithFPN, computed once."""
    body = model.backbone.body(images.tensors)
    return model.backbone.fpn(body), list(body.values())


def detector_forward(model: nn.Module, images: list[Tensor], targets: list[dict]) -> DetectorOutput:
    """The training forward: detection losses plus the features they came from."""
    image_list, targets = model.transform(images, targets)
    fpn, body = backbone_features(model, image_list)
    out = DetectorOutput(images=image_list, fpn=fpn, body=body)
    if is_retinanet(model):
        levels = list(fpn.values())
        head_outputs = model.head(levels)
        anchors = model.anchor_generator(image_list, levels)
        out.losses = model.compute_loss(targets, head_outputs, anchors)
    else:
        proposals, rpn_losses = model.rpn(image_list, fpn, targets)
        out.proposals = [p.detach() for p in proposals]  # the KD RoIs of cls.rois = "student"
        _, roi_losses = model.roi_heads(fpn, proposals, image_list.image_sizes, targets)
        out.losses = {**rpn_losses, **roi_losses}
    return out


def roi_class_logits(model: nn.Module, fpn: OrderedDict, boxes: list[Tensor],
                     image_sizes: list[tuple[int, int]]) -> Tensor:
    """Box-head classification logits for given RoIs (one [n_i, 4] tensor per image), concatenated."""
    pooled = model.roi_heads.box_roi_pool(fpn, boxes, image_sizes)
    logits, _ = model.roi_heads.box_predictor(model.roi_heads.box_head(pooled))
    return logits
