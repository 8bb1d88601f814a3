"""What each detector family is made of: its FPN levels, backbone stages and heads, written once.

Everything that depends on "P2-P6 or P3-P7", "C2-C5 or C3-C5", their strides, whether the
detector has an RoI head, or which stages a cache stores reads it from here, through
`ModelSpec` (models/zoo.py adds the channels, which depend on the config) or, for a built
detector, `family_of(model)`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from .forward import is_retinanet


@dataclass(frozen=True)
class Level:
    """One feature map of the FPN or the backbone: its name and its stride in input pixels."""

    name: str
    stride: int


# torchvision's ResNet: modules layer1..layer4 give stages C2..C5 at strides 4..32.
RESNET_STAGES = tuple(Level(f"c{k}", 2 ** k) for k in range(2, 6))
RESNET_LAYERS = {stage.name: f"layer{i + 1}" for i, stage in enumerate(RESNET_STAGES)}

# The stages a cache stores with --backbone, for both families: C3-C5, the ones backbone
# distillation uses (docs/method.md#backbone-distillation; C2 alone would double the size of a COCO cache). An online teacher offers
# the same ones, so both teacher sources index them alike.
CACHED_BACKBONE_STAGES = ("c3", "c4", "c5")


def stride_of_level(name: str) -> int:
    """The stride of an FPN level or stage by its name: pK / cK (with an optional letter) is 2 ** K.

    Names are what caches record of their levels, so a cache's strides follow from its names alone."""
    match = re.fullmatch(r"[pc](\d)[a-z]?", name)
    if match is None:
        raise ValueError(f"not a level name: {name!r}")
    return 2 ** int(match.group(1))


def _pyramid(first: int, last: int) -> tuple[Level, ...]:
    return tuple(Level(f"p{k}", 2 ** k) for k in range(first, last + 1))


@dataclass(frozen=True)
class Family:
    """A detector family: the feature maps it has and whether it has an RoI head."""

    name: str  # as in a model TOML's `family`, a cache's provenance and a checkpoint
    title: str  # for messages
    fpn_levels: tuple[Level, ...]  # on a ResNet (`pyramid` for other backbones); finest first, as torchvision's heads
    backbone_stages: tuple[Level, ...]  # the ResNet stages the body returns to the FPN
    has_roi_head: bool
    # The default base learning rate per image of the global batch (a model TOML's
    # [train] lr_per_image overrides it): the paper's 1x schedules, linearly scaled.
    lr_per_image: float

    @property
    def cached_stage_indices(self) -> list[int]:
        """Positions of the cached stages (CACHED_BACKBONE_STAGES) among `backbone_stages`."""
        names = [s.name for s in self.backbone_stages]
        return [names.index(n) for n in CACHED_BACKBONE_STAGES]


FAMILIES = {
    # C2-C5 -> P2-P5, and P6 by max-pooling P5 (for the RPN only)
    # lr 0.04 at batch 32 (0.02 at 16)
    "faster_rcnn": Family("faster_rcnn", "Faster R-CNN", _pyramid(2, 6), RESNET_STAGES, has_roi_head=True,
                          lr_per_image=0.02 / 16),
    # C3-C5 -> P3-P5, and P6, P7 by strided convolutions on P5; a dense head, no RoI head
    # lr 0.02 at batch 32 (0.01 at 16), half of Faster R-CNN's, as the paper and mmdetection train it
    "retinanet": Family("retinanet", "RetinaNet", _pyramid(3, 7), RESNET_STAGES[1:], has_roi_head=False,
                        lr_per_image=0.01 / 16),
}


# torchvision's MobileNetV3-Large FPN (backbone_utils._mobilenet_extractor, FPN on the last two
# stages): the output of features[13], the first stride-32 block (160 channels), and of
# features[16], the last 1x1 conv (960 channels), then P6 by max-pooling. Both body stages are
# at stride 32, so its FPN has two stride-32 levels; "c5"/"p5" is the last stage, as in a ResNet.
MOBILENET_V3_STAGES = (Level("c5a", 32), Level("c5", 32))
MOBILENET_V3_FPN_LEVELS = (Level("p5a", 32), Level("p5", 32), Level("p6", 64))

# [backbone] kind of a model TOML -> the families it is built for
BACKBONE_KINDS = {"resnet": ("faster_rcnn", "retinanet"), "mobilenet_v3_large": ("faster_rcnn",)}


def pyramid(family: Family, backbone_kind: str = "resnet") -> tuple[tuple[Level, ...], tuple[Level, ...]]:
    """(FPN levels, body stages) of a family on a backbone kind, finest first."""
    if backbone_kind == "mobilenet_v3_large":
        return MOBILENET_V3_FPN_LEVELS, MOBILENET_V3_STAGES
    return family.fpn_levels, family.backbone_stages


def family_of(model: nn.Module) -> Family:
    """The family of a detector built by models/zoo.py."""
    return FAMILIES["retinanet" if is_retinanet(model) else "faster_rcnn"]


__all__ = ["BACKBONE_KINDS", "CACHED_BACKBONE_STAGES", "FAMILIES", "Family", "Level", "MOBILENET_V3_FPN_LEVELS",
           "MOBILENET_V3_STAGES", "RESNET_LAYERS", "RESNET_STAGES", "family_of", "pyramid", "stride_of_level"]
