"""Detectors built from TOML configs under configs/models/, on torchvision's detection models."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path

from torch import nn
from torchvision.models import resnet
from torchvision.models.detection import FasterRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import FrozenBatchNorm2d, MultiScaleRoIAlign
from torchvision.ops.poolers import initLevelMapper
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7

from ..data.dataset import read_toml
from ..data.records import DataError
from ..views import Preprocessing
from .family import FAMILIES, RESNET_LAYERS, RESNET_STAGES, Family
from .sampling import install_item_seeded_samplers

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
MODEL_DIR = CONFIG_DIR / "models"

_BLOCKS = {18: (resnet.BasicBlock, [2, 2, 2, 2]), 34: (resnet.BasicBlock, [3, 4, 6, 3]),
           50: (resnet.Bottleneck, [3, 4, 6, 3]), 101: (resnet.Bottleneck, [3, 4, 23, 3]),
           152: (resnet.Bottleneck, [3, 8, 36, 3])}


class NarrowResNet(resnet.ResNet):
    """torchvision's ResNet with every stage's channels divided by `width_divisor`.

    torchvision hard-codes 64 stem channels and 64..512 stage widths, so the narrow
    layers are rebuilt after the parent constructor; module names stay the same, so
    checkpoints and the FPN extractor work unchanged.
    """

    def __init__(self, block, layers, width_divisor: int, norm_layer=None):
        super().__init__(block, layers, norm_layer=norm_layer)
        norm_layer = self._norm_layer
        stem = 64 // width_divisor
        self.inplanes = stem
        self.conv1 = nn.Conv2d(3, stem, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = norm_layer(stem)
        self.layer1 = self._make_layer(block, 64 // width_divisor, layers[0])
        self.layer2 = self._make_layer(block, 128 // width_divisor, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 256 // width_divisor, layers[2], stride=2)
        self.layer4 = self._make_layer(block, 512 // width_divisor, layers[3], stride=2)
        self.fc = nn.Linear(self.inplanes, 1000)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")


class ViewTransform(GeneralizedRCNNTransform):
    """Batching only: our views already resized and normalised every image (views.py).

    Keeping torchvision's transform object (not removing it) means `model(images)` and
    its postprocess still work; they just no longer change the pixels or the boxes.
    """

    def __init__(self, size_divisible: int = 32):
        super().__init__(min_size=1, max_size=1, image_mean=[0.0] * 3, image_std=[1.0] * 3,
                         size_divisible=size_divisible)

    def normalize(self, image):
        return image

    def resize(self, image, target=None):
        return image, target


@dataclass(frozen=True)
class FeatureMap:
    """One of a model's FPN levels or backbone stages (models/family.py), with its channels."""

    name: str  # p2..p7, c2..c5
    stride: int  # input pixels per cell
    channels: int


def _resnet_stage_channels(backbone: dict) -> dict[str, int]:
    """C2..C5 output channels: 64..512 times the block expansion, divided by `width_divisor`."""
    expansion = 1 if int(backbone["depth"]) < 50 else 4
    divisor = int(backbone.get("width_divisor", 1))
    return {stage.name: 64 * 2 ** i * expansion // divisor for i, stage in enumerate(RESNET_STAGES)}


@dataclass
class ModelSpec:
    name: str
    family: str  # a key of models.family.FAMILIES: "faster_rcnn" | "retinanet"
    config: dict
    preprocessing: Preprocessing

    @property
    def family_record(self) -> Family:
        return FAMILIES[self.family]

    @property
    def has_roi_head(self) -> bool:
        return self.family_record.has_roi_head

    @property
    def fpn_channels(self) -> int:
        return int(self.config["backbone"].get("fpn_channels", 256))

    @property
    def fpn_levels(self) -> tuple[FeatureMap, ...]:
        """P2-P6 (Faster R-CNN) or P3-P7 (RetinaNet), finest first."""
        return tuple(FeatureMap(lv.name, lv.stride, self.fpn_channels) for lv in self.family_record.fpn_levels)

    @property
    def backbone_stages(self) -> tuple[FeatureMap, ...]:
        """The stages the body returns to the FPN (C2-C5 for Faster R-CNN, C3-C5 for RetinaNet)."""
        channels = _resnet_stage_channels(self.config["backbone"])
        return tuple(FeatureMap(s.name, s.stride, channels[s.name]) for s in self.family_record.backbone_stages)

    @property
    def cached_backbone_stages(self) -> tuple[FeatureMap, ...]:
        """The stages a cache stores with --backbone (models.family.CACHED_BACKBONE_STAGES)."""
        stages = self.backbone_stages
        return tuple(stages[i] for i in self.family_record.cached_stage_indices)

    @property
    def strides(self) -> list[int]:
        """The FPN levels' strides, finest first."""
        return [lv.stride for lv in self.fpn_levels]

    @property
    def backbone_channels(self) -> list[int]:
        """The channels of `backbone_stages`, in order."""
        return [s.channels for s in self.backbone_stages]


def list_models() -> list[str]:
    return sorted(p.stem for p in MODEL_DIR.glob("*.toml"))


def load_model_spec(name: str) -> ModelSpec:
    """A model by zoo name (configs/models/NAME.toml) or by the path of a TOML file."""
    path = Path(name)
    if path.suffix != ".toml":
        path = MODEL_DIR / f"{name}.toml"
        if not path.is_file():
            raise DataError(f"unknown model {name!r}; available: {', '.join(list_models())} "
                            "(or give the path of a model TOML)")
    cfg = read_toml(path, "model TOML")
    family = cfg.get("family")
    if family not in FAMILIES:
        choices = " or ".join(f'"{name}"' for name in FAMILIES)
        raise DataError(f"{path}: family must be {choices}, got {family!r}")
    pre = Preprocessing(**{k: tuple(v) if isinstance(v, list) else v for k, v in cfg.get("input", {}).items()})
    return ModelSpec(name=path.stem, family=family, config=cfg, preprocessing=pre)


def _backbone(spec: ModelSpec):
    bb = spec.config["backbone"]
    depth = int(bb["depth"])
    if depth not in _BLOCKS:
        raise DataError(f"model {spec.name}: backbone.depth must be one of {sorted(_BLOCKS)}")
    block, layers = _BLOCKS[depth]
    # "bn": BatchNorm trained with the detector (training from scratch, as on CPU here);
    # "frozen_bn": the usual setting with ImageNet-initialised backbones.
    norm = FrozenBatchNorm2d if bb.get("norm", "frozen_bn") == "frozen_bn" else nn.BatchNorm2d
    body = NarrowResNet(block, layers, int(bb.get("width_divisor", 1)), norm_layer=norm)
    trainable = int(bb.get("trainable_layers", 5))
    # Freeze as torchvision's _resnet_fpn_extractor does, but build the FPN ourselves: that
    # helper always makes 256 channels and the CPU-scale models use narrower ones.
    train_prefixes = ["layer4", "layer3", "layer2", "layer1", "conv1"][:trainable] + (["bn1"] if trainable == 5 else [])
    for pname, param in body.named_parameters():
        if not any(pname.startswith(t) for t in train_prefixes):
            param.requires_grad_(False)
    fpn_ch = spec.fpn_channels
    # the levels above C5 (models/family.py): P6 by max-pool, or P6 and P7 by convolutions on P5
    extra = LastLevelMaxPool() if spec.family == "faster_rcnn" else LastLevelP6P7(fpn_ch, fpn_ch)
    stages = spec.backbone_stages
    return_layers = {RESNET_LAYERS[s.name]: str(i) for i, s in enumerate(stages)}
    backbone = BackboneWithFPN(body, return_layers, [s.channels for s in stages], fpn_ch, extra_blocks=extra)
    return backbone


def _fix_roi_pool_scales(pool: MultiScaleRoIAlign, spec: ModelSpec) -> None:
    """Give RoIAlign the levels' true scales (1 / stride) instead of letting it infer them.

    torchvision's MultiScaleRoIAlign infers each level's scale from the FIRST batch it sees
    (2 ** round(log2(feature size / largest image size))) and keeps it for every later call.
    When padding to 32 makes a small image's canvas much larger than the image itself
    (a 65-px image on a 96-px canvas), that rounds to twice the true scale, and every later
    RoI is pooled from the wrong place: a model's outputs then depend on which batch it saw
    first (the rank split, where a resumed extraction starts). The strides are known here.
    """
    by_name = {str(i): lv.stride for i, lv in enumerate(spec.fpn_levels)}  # BackboneWithFPN names "0".."3"
    strides = [by_name[n] for n in pool.featmap_names]
    pool.scales = [1.0 / s for s in strides]
    pool.map_levels = initLevelMapper(int(math.log2(strides[0])), int(math.log2(strides[-1])),
                                      canonical_scale=pool.canonical_scale, canonical_level=pool.canonical_level)


def build_detector(spec: ModelSpec | str, num_classes: int) -> nn.Module:
    """A torchvision detector for `num_classes` classes including background."""
    spec = load_model_spec(spec) if isinstance(spec, str) else spec
    cfg = spec.config
    backbone = _backbone(spec)
    anchor_sizes = cfg.get("anchors", {}).get("sizes", [32, 64, 128, 256, 512])
    ratios = tuple(cfg.get("anchors", {}).get("aspect_ratios", [0.5, 1.0, 2.0]))
    if spec.family == "faster_rcnn":
        rpn, roi = cfg.get("rpn", {}), cfg.get("roi", {})
        rep = int(roi.get("representation_size", 1024))
        model = FasterRCNN(
            backbone, num_classes=None,
            rpn_anchor_generator=AnchorGenerator(tuple((s,) for s in anchor_sizes), (ratios,) * len(anchor_sizes)),
            box_head=TwoMLPHead(spec.fpn_channels * 7 * 7, rep),
            box_predictor=FastRCNNPredictor(rep, num_classes),
            **{f"rpn_{k}": v for k, v in rpn.items()},
            **{f"box_{k}": v for k, v in roi.items() if k != "representation_size"},
        )
        _fix_roi_pool_scales(model.roi_heads.box_roi_pool, spec)
    else:
        head_cfg = cfg.get("head", {})
        octave = [2 ** (i / 3) for i in range(3)]
        sizes = tuple(tuple(int(s * o) for o in octave) for s in anchor_sizes)
        anchors = AnchorGenerator(sizes, (ratios,) * len(sizes))
        head = RetinaNetHead(spec.fpn_channels, anchors.num_anchors_per_location()[0], num_classes)
        model = RetinaNet(backbone, num_classes, anchor_generator=anchors, head=head, **head_cfg)
    model.transform = ViewTransform(spec.preprocessing.size_divisible)
    install_item_seeded_samplers(model)  # per-image draws when training sets seeds (models/sampling.py)
    return model


def spec_dict(spec: ModelSpec) -> dict:
    return {"name": spec.name, "family": spec.family, "config": copy.deepcopy(spec.config)}


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = ["FeatureMap", "ModelSpec", "NarrowResNet", "ViewTransform", "build_detector", "list_models", "load_model_spec",
           "count_parameters", "spec_dict", "CONFIG_DIR"]
