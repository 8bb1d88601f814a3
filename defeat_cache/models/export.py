"""`defeat-cache export`: a trained model as a plain torchvision state dict plus a JSON sidecar.

student.pth holds the detector's weights alone (no adapters, optimizer or training state), in
torchvision's names; student.json says what they are: the zoo architecture, the torchvision
builder and its arguments where one builds the same model, the classes with their dataset
category ids, and the preprocessing. `models.detector.load_detector` reads the pair back.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .. import __version__
from ..errors import UserError
from .convert.mapping import COUNTER
from .detector import STUDENT_FORMAT, DetectorInfo, resolve_checkpoint
from .zoo import build_detector, spec_dict

# The zoo settings under which a zoo model is exactly one of torchvision's builders.
_TORCHVISION_BUILDERS = {"faster_rcnn": "fasterrcnn_resnet50_fpn", "retinanet": "retinanet_resnet50_fpn"}
_TORCHVISION_DEFAULTS = {"backbone.depth": 50, "backbone.width_divisor": 1, "backbone.fpn_channels": 256,
                         "backbone.stride_in_1x1": False, "anchors.sizes": [32, 64, 128, 256, 512],
                         "anchors.aspect_ratios": [0.5, 1.0, 2.0], "anchors.round": True,
                         "roi.representation_size": 1024, "roi_align.aligned": False, "roi_align.sampling_ratio": 2,
                         "neck.extra_input": "p5", "neck.relu_before_p7": True}


def _setting(config: dict, dotted: str):
    table, key = dotted.split(".")
    value = config.get(table, {}).get(key, _TORCHVISION_DEFAULTS[dotted])
    return [float(v) for v in value] if isinstance(value, list) else value


def torchvision_builder(info: DetectorInfo) -> dict | None:
    """{"builder", "kwargs"} of the torchvision function that builds this exact model, or None.

    The kwargs carry the classes, the preprocessing (torchvision's 0..1 scale) and the zoo's
    RPN/RoI/head settings; torchvision's builders take them as they are.
    """
    spec = info.spec
    cfg = spec.config
    # a zoo entry made to match another torchvision builder names it (r50_fpn_v2, mobilenet_v3_fpn, ...;
    # tests/test_torchvision_zoo.py checks their outputs); the others match the v1 builders or none
    named = cfg.get("torchvision_builder")
    want = {k: [float(x) for x in v] if isinstance(v, list) else v for k, v in _TORCHVISION_DEFAULTS.items()}
    if not named and any(_setting(cfg, k) != v for k, v in want.items()):
        return None
    pre = info.preprocessing
    kwargs = {"num_classes": info.num_classes, "min_size": pre.min_size, "max_size": pre.max_size,
              "image_mean": [m / 255 for m in pre.mean], "image_std": [s / 255 for s in pre.std]}
    if spec.family == "faster_rcnn":
        kwargs.update({f"rpn_{k}": v for k, v in cfg.get("rpn", {}).items()})
        kwargs.update({f"box_{k}": v for k, v in cfg.get("roi", {}).items() if k != "representation_size"})
    else:
        kwargs.update(cfg.get("head", {}))
    builder = named or _TORCHVISION_BUILDERS[spec.family]
    # the builder's own model must have our names and shapes (a safeguard for zoo entries added later)
    from torchvision.models import detection
    with torch.device("meta"):
        theirs = getattr(detection, builder)(weights=None, weights_backbone=None, **kwargs).state_dict()
        ours = build_detector(spec, info.num_classes).state_dict()
    same = {k: tuple(v.shape) for k, v in theirs.items() if not k.endswith(COUNTER)} == \
        {k: tuple(v.shape) for k, v in ours.items() if not k.endswith(COUNTER)}
    return {"builder": builder, "kwargs": kwargs} if same else None


def export_student(checkpoint: str | Path, out: str | Path, model: str | None = None, data=None) -> dict:
    """Writes `out` (state dict) and `out` with .json (sidecar); returns the sidecar."""
    out = Path(out)
    if out.suffix == ".json":
        raise UserError(f"--out {out}: give the weights' file name (e.g. student.pth); the .json goes beside it")
    resolved = resolve_checkpoint(checkpoint, model, data)
    info = resolved.info
    with torch.device("meta"):
        target = build_detector(info.spec, info.num_classes).state_dict()
    state = {k: v for k, v in resolved.state.items() if k in target}
    missing = sorted(k for k in target if k not in state and not k.endswith(COUNTER))
    if missing:
        raise UserError(f"{checkpoint}: {len(missing)} of model {info.spec.name}'s tensors are missing: {missing[:3]}")
    # BatchNorm step counters for frozen-BN layers too: torchvision's builders without pretrained
    # weights use BatchNorm2d (which wants them) and FrozenBatchNorm2d drops them when loading
    for key in [k for k in state if k.endswith(".running_var")]:
        state.setdefault(key[: -len("running_var")] + COUNTER, torch.zeros((), dtype=torch.long))
    sidecar = {"format": STUDENT_FORMAT, "version": __version__, "weights": out.name,
               "model": spec_dict(info.spec), "num_classes": info.num_classes, "classes": info.classes(),
               "preprocessing": info.preprocessing.to_dict(), "input": "RGB",
               "torchvision": torchvision_builder(info), "exported_from": str(checkpoint)}
    out.parent.mkdir(parents=True, exist_ok=True)
    for path, write in ((out, lambda p: torch.save({k: v.contiguous() for k, v in state.items()}, p)),
                        (out.with_suffix(".json"), lambda p: p.write_text(json.dumps(sidecar, indent=2)))):
        tmp = path.with_name(path.name + ".partial")
        write(tmp)
        os.replace(tmp, path)
    return sidecar


__all__ = ["export_student", "torchvision_builder"]
