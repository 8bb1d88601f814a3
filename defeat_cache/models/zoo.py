"""Detectors built from TOML configs under configs/models/, on torchvision's detection models."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models import mobilenet_v3_large, resnet
from torchvision.models.detection import FasterRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN, _mobilenet_extractor
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor, RPNHead, TwoMLPHead
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import FrozenBatchNorm2d, MultiScaleRoIAlign, roi_align
from torchvision.ops.poolers import _convert_to_roi_format, _filter_input, initLevelMapper
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7

from ..data.dataset import read_toml
from ..data.records import DataError
from ..views import Preprocessing
from .family import BACKBONE_KINDS, CACHED_BACKBONE_STAGES, FAMILIES, RESNET_LAYERS, RESNET_STAGES, Family, pyramid
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


class UnroundedAnchorGenerator(AnchorGenerator):
    """torchvision's anchors without rounding the cell anchors to whole pixels.

    torchvision rounds each cell anchor's corners (a 32-px, ratio-0.5 anchor is 46 x 22 px
    instead of 45.25 x 22.63); mmdetection (2.x, 3.x) and detectron2 keep them exact.
    Order (aspect ratio major, size minor) and centres (cell corners) stay torchvision's.
    """

    def generate_anchors(self, scales, aspect_ratios, dtype=torch.float32, device=torch.device("cpu")) -> Tensor:
        scales = torch.as_tensor(scales, dtype=dtype, device=device)
        aspect_ratios = torch.as_tensor(aspect_ratios, dtype=dtype, device=device)
        h_ratios = torch.sqrt(aspect_ratios)
        w_ratios = 1 / h_ratios
        ws = (w_ratios[:, None] * scales[None, :]).view(-1)
        hs = (h_ratios[:, None] * scales[None, :]).view(-1)
        return torch.stack([-ws, -hs, ws, hs], dim=1) / 2


class RetinaExtraLevels(LastLevelP6P7):
    """RetinaNet's P6 and P7, with their input and the ReLU before P7 chosen by the config.

    torchvision: P6 from P5 (v1) or C5 (v2), ReLU before P7. mmdetection: P6 from C5, no ReLU
    (`add_extra_convs='on_input'`, `relu_before_extra_convs=False`). detectron2: P6 from C5,
    ReLU. Same parameter names (p6, p7) in every case.
    """

    def __init__(self, in_channels: int, out_channels: int, from_c5: bool, relu_before_p7: bool):
        super().__init__(in_channels, out_channels)
        self.use_P5 = not from_c5  # torchvision decides from the channel counts; here the config does
        self.relu_before_p7 = relu_before_p7

    def forward(self, p: list[Tensor], c: list[Tensor], names: list[str]):
        p6 = self.p6(p[-1] if self.use_P5 else c[-1])
        p7 = self.p7(F.relu(p6) if self.relu_before_p7 else p6)
        p.extend([p6, p7])
        names.extend(["p6", "p7"])
        return p, names


class AlignedMultiScaleRoIAlign(MultiScaleRoIAlign):
    """MultiScaleRoIAlign with RoIAlign's `aligned=True` (the half-pixel shift).

    torchvision's MultiScaleRoIAlign always pools with aligned=False; mmdetection and
    detectron2 (ROIAlignV2) use aligned=True. Level assignment is the same in all three
    (floor(4 + log2(sqrt(area) / 224)), clamped to the pooled levels).
    """

    def forward(self, x: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]]) -> Tensor:
        features = _filter_input(x, self.featmap_names)
        rois = _convert_to_roi_format(boxes)
        levels = self.map_levels(boxes)
        result = features[0].new_zeros((len(rois), features[0].shape[1]) + tuple(self.output_size))
        for level, (feature, scale) in enumerate(zip(features, self.scales)):
            idx = torch.where(levels == level)[0]
            pooled = roi_align(feature, rois[idx], output_size=self.output_size, spatial_scale=scale,
                               sampling_ratio=self.sampling_ratio, aligned=True)
            result[idx] = pooled.to(result.dtype)
        return result


@dataclass(frozen=True)
class FeatureMap:
    """One of a model's FPN levels or backbone stages (models/family.py), with its channels."""

    name: str  # p2..p7, c2..c5
    stride: int  # input pixels per cell
    channels: int


# torchvision's MobileNetV3-Large: output channels of features[13] and features[16]
_MOBILENET_V3_CHANNELS = {"c5a": 160, "c5": 960}
_NORMS = {"frozen_bn": FrozenBatchNorm2d, "bn": nn.BatchNorm2d}


def _norm_layer(section: dict, key: str, default: str, where: str):
    """A norm option of a model TOML: "frozen_bn" | "bn" (and "none" where allowed: default "none")."""
    value = section.get(key, default)
    if value == "none" and default == "none":
        return None
    if value not in _NORMS:
        choices = sorted(_NORMS) + (["none"] if default == "none" else [])
        raise DataError(f"{where}.{key} = {value!r}: choose one of {', '.join(choices)}")
    return _NORMS[value]


def _stage_channels(backbone: dict) -> dict[str, int]:
    """The body's output channels per stage name."""
    if backbone.get("kind", "resnet") == "mobilenet_v3_large":
        return dict(_MOBILENET_V3_CHANNELS)
    return _resnet_stage_channels(backbone)


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
    def backbone_kind(self) -> str:
        """[backbone] kind: "resnet" (default) or "mobilenet_v3_large" (models.family.BACKBONE_KINDS)."""
        return self.config["backbone"].get("kind", "resnet")

    @property
    def backbone_title(self) -> str:
        """For listings: "resnet50", "resnet18/4" (width divisor 4), "mobilenet_v3_large"."""
        bb = self.config["backbone"]
        if self.backbone_kind != "resnet":
            return self.backbone_kind
        divisor = int(bb.get("width_divisor", 1))
        return f"resnet{bb['depth']}" + (f"/{divisor}" if divisor != 1 else "")

    @property
    def fpn_channels(self) -> int:
        return int(self.config["backbone"].get("fpn_channels", 256))

    @property
    def fpn_levels(self) -> tuple[FeatureMap, ...]:
        """P2-P6 (Faster R-CNN) or P3-P7 (RetinaNet) on a ResNet, P5a-P6 on a MobileNetV3; finest first."""
        levels, _ = pyramid(self.family_record, self.backbone_kind)
        return tuple(FeatureMap(lv.name, lv.stride, self.fpn_channels) for lv in levels)

    @property
    def backbone_stages(self) -> tuple[FeatureMap, ...]:
        """The stages the body returns to the FPN (C2-C5 for Faster R-CNN, C3-C5 for RetinaNet on a ResNet)."""
        channels = _stage_channels(self.config["backbone"])
        _, stages = pyramid(self.family_record, self.backbone_kind)
        return tuple(FeatureMap(s.name, s.stride, channels[s.name]) for s in stages)

    @property
    def cached_backbone_stages(self) -> tuple[FeatureMap, ...]:
        """The stages a cache stores with --backbone (models.family.CACHED_BACKBONE_STAGES);
        empty for a backbone that lacks some of them (a MobileNetV3 has no C3, C4 outputs)."""
        stages = self.backbone_stages
        names = [s.name for s in stages]
        if not all(n in names for n in CACHED_BACKBONE_STAGES):
            return ()
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
    kind = cfg.get("backbone", {}).get("kind", "resnet")
    if kind not in BACKBONE_KINDS or family not in BACKBONE_KINDS[kind]:
        known = ", ".join(f"{k} ({' or '.join(f)})" for k, f in BACKBONE_KINDS.items())
        raise DataError(f"{path}: backbone.kind = {kind!r} is not available for family {family!r}; known: {known}")
    pre = Preprocessing(**{k: tuple(v) if isinstance(v, list) else v for k, v in cfg.get("input", {}).items()})
    return ModelSpec(name=path.stem, family=family, config=cfg, preprocessing=pre)


def _mobilenet_backbone(spec: ModelSpec):
    """torchvision's own MobileNetV3-Large FPN extractor, as fasterrcnn_mobilenet_v3_large_fpn builds it."""
    bb = spec.config["backbone"]
    if spec.fpn_channels != 256:  # torchvision's extractor makes 256 channels
        raise DataError(f"model {spec.name}: a mobilenet_v3_large backbone has fpn_channels = 256, "
                        f"got {spec.fpn_channels}")
    norm = _norm_layer(bb, "norm", "frozen_bn", "backbone")
    return _mobilenet_extractor(mobilenet_v3_large(norm_layer=norm), True, int(bb.get("trainable_layers", 3)))


def _backbone(spec: ModelSpec):
    bb = spec.config["backbone"]
    if spec.backbone_kind == "mobilenet_v3_large":
        return _mobilenet_backbone(spec)
    depth = int(bb["depth"])
    if depth not in _BLOCKS:
        raise DataError(f"model {spec.name}: backbone.depth must be one of {sorted(_BLOCKS)}")
    block, layers = _BLOCKS[depth]
    # "bn": BatchNorm trained with the detector (training from scratch, as on CPU here, and
    # torchvision's v2 builders); "frozen_bn": the usual setting with ImageNet-initialised backbones.
    norm = _norm_layer(bb, "norm", "frozen_bn", "backbone")
    body = NarrowResNet(block, layers, int(bb.get("width_divisor", 1)), norm_layer=norm)
    if bb.get("stride_in_1x1", False):
        _move_stride_to_1x1(body, spec)
    trainable = int(bb.get("trainable_layers", 5))
    # Freeze as torchvision's _resnet_fpn_extractor does, but build the FPN ourselves: that
    # helper always makes 256 channels and the CPU-scale models use narrower ones.
    train_prefixes = ["layer4", "layer3", "layer2", "layer1", "conv1"][:trainable] + (["bn1"] if trainable == 5 else [])
    for pname, param in body.named_parameters():
        if not any(pname.startswith(t) for t in train_prefixes):
            param.requires_grad_(False)
    fpn_ch = spec.fpn_channels
    stages = spec.backbone_stages
    # the levels above C5 (models/family.py): P6 by max-pool, or P6 and P7 by convolutions
    # on P5 (torchvision v1's default) or on C5 (`[neck] extra_input = "c5"`)
    if spec.family == "faster_rcnn":
        extra = LastLevelMaxPool()
    else:
        neck = spec.config.get("neck", {})
        source = neck.get("extra_input", "p5")
        if source not in ("p5", "c5"):
            raise DataError(f'model {spec.name}: neck.extra_input must be "p5" or "c5", got {source!r}')
        extra = RetinaExtraLevels(stages[-1].channels if source == "c5" else fpn_ch, fpn_ch, from_c5=source == "c5",
                                  relu_before_p7=bool(neck.get("relu_before_p7", True)))
    return_layers = {RESNET_LAYERS[s.name]: str(i) for i, s in enumerate(stages)}
    fpn_norm = _norm_layer(bb, "fpn_norm", "none", "backbone")  # BatchNorm after each FPN conv (v2 Faster R-CNN)
    backbone = BackboneWithFPN(body, return_layers, [s.channels for s in stages], fpn_ch, extra_blocks=extra,
                               norm_layer=fpn_norm)
    return backbone


def _move_stride_to_1x1(body: resnet.ResNet, spec: ModelSpec) -> None:
    """`backbone.stride_in_1x1`: downsample in each stage's first 1x1 convolution, not its 3x3.

    MSRA/caffe-style ResNets (detectron2's default weights, mmdetection's `style='caffe'`)
    put the stride-2 on conv1 of the first bottleneck of layer2..layer4; torchvision (and
    mmdetection's `style='pytorch'`) put it on conv2. Same parameters, different features.
    """
    if not isinstance(body.layer1[0], resnet.Bottleneck):
        raise DataError(f"model {spec.name}: backbone.stride_in_1x1 applies to bottleneck ResNets (depth >= 50)")
    for layer in (body.layer2, body.layer3, body.layer4):
        first = layer[0]
        first.conv1.stride, first.conv2.stride = first.conv2.stride, first.conv1.stride


def _roi_pool(spec: ModelSpec) -> MultiScaleRoIAlign:
    """RoIAlign over P2-P5: torchvision's (sampling_ratio 2, aligned=False) unless `[roi_align]` says otherwise."""
    opts = spec.config.get("roi_align", {})
    cls = AlignedMultiScaleRoIAlign if opts.get("aligned", False) else MultiScaleRoIAlign
    pool = cls(featmap_names=["0", "1", "2", "3"], output_size=7, sampling_ratio=int(opts.get("sampling_ratio", 2)))
    _fix_roi_pool_scales(pool, spec)
    return pool


def _anchor_generator(spec: ModelSpec, sizes, ratios) -> AnchorGenerator:
    """`[anchors] round = false`: the cell anchors as computed (mmdetection, detectron2)."""
    cls = AnchorGenerator if spec.config.get("anchors", {}).get("round", True) else UnroundedAnchorGenerator
    return cls(sizes, (ratios,) * len(sizes))


def _fix_roi_pool_scales(pool: MultiScaleRoIAlign, spec: ModelSpec) -> None:
    """Give RoIAlign the levels' true scales (1 / stride) instead of letting it infer them.

    torchvision's MultiScaleRoIAlign infers each level's scale from the FIRST batch it sees
    (2 ** round(log2(feature size / largest image size))) and keeps it for every later call.
    When padding to 32 makes a small image's canvas much larger than the image itself
    (a 65-px image on a 96-px canvas), that rounds to twice the true scale, and every later
    RoI is pooled from the wrong place: a model's outputs then depend on which batch it saw
    first (the rank split, where a resumed extraction starts). The strides are known here.
    """
    # BackboneWithFPN names the levels of the body's stages "0", "1", ... (the extra ones "pool",
    # "p6", "p7"); RoIAlign pools from those of its featmap_names that exist, as torchvision filters them.
    by_name = {str(i): lv.stride for i, lv in enumerate(spec.fpn_levels[:len(spec.backbone_stages)])}
    strides = [by_name[n] for n in pool.featmap_names if n in by_name]
    pool.scales = [1.0 / s for s in strides]
    pool.map_levels = initLevelMapper(int(math.log2(strides[0])), int(math.log2(strides[-1])),
                                      canonical_scale=pool.canonical_scale, canonical_level=pool.canonical_level)


def _box_head(spec: ModelSpec) -> tuple[nn.Module, int]:
    """(box head, its output size): two FC layers (v1), or `[box_head]` convs then FCs (v2)."""
    cfg = spec.config
    if "box_head" not in cfg:
        rep = int(cfg.get("roi", {}).get("representation_size", 1024))
        return TwoMLPHead(spec.fpn_channels * 7 * 7, rep), rep
    bh = cfg["box_head"]
    convs, fcs = [int(c) for c in bh.get("convs", [])], [int(f) for f in bh.get("fcs", [1024])]
    if not fcs:
        raise DataError(f"model {spec.name}: box_head.fcs needs at least one layer")
    norm = _norm_layer(bh, "norm", "none", "box_head")
    return FastRCNNConvFCHead((spec.fpn_channels, 7, 7), convs, fcs, norm_layer=norm), fcs[-1]


def box_head_modules(spec: ModelSpec, num_classes: int) -> tuple[MultiScaleRoIAlign, nn.Module, FastRCNNPredictor]:
    """A Faster R-CNN's RoI box head: (box_roi_pool, box_head, box_predictor), the modules
    `build_detector` gives torchvision's RoIHeads (also built alone: distill/head_teacher.py)."""
    box_head, rep = _box_head(spec)
    return _roi_pool(spec), box_head, FastRCNNPredictor(rep, num_classes)


def build_detector(spec: ModelSpec | str, num_classes: int) -> nn.Module:
    """A torchvision detector for `num_classes` classes including background."""
    spec = load_model_spec(spec) if isinstance(spec, str) else spec
    cfg = spec.config
    backbone = _backbone(spec)
    anchor_sizes = cfg.get("anchors", {}).get("sizes", [32, 64, 128, 256, 512])
    exact_sizes = not cfg.get("anchors", {}).get("round", True)
    ratios = tuple(cfg.get("anchors", {}).get("aspect_ratios", [0.5, 1.0, 2.0]))
    if len(anchor_sizes) != len(spec.fpn_levels):
        raise DataError(f"model {spec.name}: anchors.sizes has {len(anchor_sizes)} entries for "
                        f"{len(spec.fpn_levels)} FPN levels ({', '.join(lv.name for lv in spec.fpn_levels)})")
    if spec.family == "faster_rcnn":
        rpn, roi = cfg.get("rpn", {}), cfg.get("roi", {})
        # one size per level, or a list per level (MobileNetV3: all five sizes on each level)
        sizes = tuple(tuple(s) if isinstance(s, list) else (s,) for s in anchor_sizes)
        anchors = _anchor_generator(spec, sizes, ratios)
        extra = {}
        if "rpn_head" in cfg:  # v2: more 3x3 convs before the RPN's predictors
            extra["rpn_head"] = RPNHead(spec.fpn_channels, anchors.num_anchors_per_location()[0],
                                        conv_depth=int(cfg["rpn_head"].get("conv_depth", 1)))
        box_roi_pool, box_head, box_predictor = box_head_modules(spec, num_classes)
        model = FasterRCNN(
            backbone, num_classes=None,
            rpn_anchor_generator=anchors,
            box_roi_pool=box_roi_pool,
            box_head=box_head,
            box_predictor=box_predictor,
            **extra,
            **{f"rpn_{k}": v for k, v in rpn.items()},
            **{f"box_{k}": v for k, v in roi.items() if k != "representation_size"},
        )
    else:
        head_cfg, layers = cfg.get("head", {}), cfg.get("retina_head", {})
        octave = [2 ** (i / 3) for i in range(3)]
        # torchvision truncates the octave sizes to whole pixels (32, 40, 50); mmdetection and
        # detectron2 keep 32 * 2 ** (1/3) etc. (`[anchors] round = false`)
        sizes = tuple(tuple(s * o if exact_sizes else int(s * o) for o in octave) for s in anchor_sizes)
        anchors = _anchor_generator(spec, sizes, ratios)
        norm = layers.get("norm", "none")
        if norm not in ("none", "group_norm"):
            raise DataError(f"model {spec.name}: retina_head.norm = {norm!r}: choose \"none\" or \"group_norm\"")
        head = RetinaNetHead(spec.fpn_channels, anchors.num_anchors_per_location()[0], num_classes,
                             norm_layer=partial(nn.GroupNorm, 32) if norm == "group_norm" else None)
        box_loss = layers.get("box_loss", "l1")
        if box_loss not in ("l1", "smooth_l1", "giou", "diou", "ciou"):
            raise DataError(f"model {spec.name}: retina_head.box_loss = {box_loss!r}: choose l1, smooth_l1, giou, "
                            "diou or ciou")
        head.regression_head._loss_type = box_loss  # torchvision's v2 RetinaNet sets "giou" the same way
        model = RetinaNet(backbone, num_classes, anchor_generator=anchors, head=head, **head_cfg)
    model.transform = ViewTransform(spec.preprocessing.size_divisible)
    install_item_seeded_samplers(model)  # per-image draws when training sets seeds (models/sampling.py)
    return model


def spec_dict(spec: ModelSpec) -> dict:
    return {"name": spec.name, "family": spec.family, "config": copy.deepcopy(spec.config)}


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = ["AlignedMultiScaleRoIAlign", "FeatureMap", "ModelSpec", "NarrowResNet", "RetinaExtraLevels",
           "UnroundedAnchorGenerator", "ViewTransform", "box_head_modules", "build_detector", "list_models", "load_model_spec",
           "count_parameters", "spec_dict", "CONFIG_DIR"]
