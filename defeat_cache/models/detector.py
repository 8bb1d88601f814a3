"""A detector from any checkpoint form, ready for raw images: `load_detector`.

Forms (`resolve_checkpoint` tells them apart):
  * our training checkpoints (`final.pt`, `last.pt`): they say the model, classes and preprocessing;
  * exported students (`defeat-cache export`: `student.pth` + `student.json` beside it);
  * mmdetection / detectron2 files (models/convert) and torchvision-format state dicts, plain or
    in `{'model': ...}` / `{'state_dict': ...}` wrappers: the model comes from `model=` (a zoo name
    or TOML) and the classes from `data=` (a dataset TOML) or the file's metadata.

The model returned takes what torchvision's detectors take (float RGB images in [0, 1], or
uint8) and resizes and normalises them itself, exactly as the views of views.py do.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from ..errors import UserError
from ..views import Preprocessing, apply_view
from .convert.mapping import COUNTER
from .zoo import ModelSpec, ViewTransform, build_detector, load_model_spec

#: `format` of an exported student's JSON sidecar (models/export.py).
STUDENT_FORMAT = "defeat-cache student"


class ImageTransform(GeneralizedRCNNTransform):
    """torchvision's transform slot, doing our views' resize and normalisation (views.apply_view).

    Raw images in: float RGB in [0, 1] as torchvision's detectors take them, or uint8 0..255.
    Boxes come back in the input image's pixels through torchvision's own postprocess.
    """

    def __init__(self, pre: Preprocessing):
        super().__init__(min_size=pre.min_size, max_size=pre.max_size, image_mean=[m / 255 for m in pre.mean],
                         image_std=[s / 255 for s in pre.std], size_divisible=pre.size_divisible)
        self.pre = pre

    def normalize(self, image):
        return image  # in resize: views normalise after resizing, and so must this

    def resize(self, image, target=None):
        pixels = image * 255.0 if image.is_floating_point() else image
        x, geom = apply_view(pixels, self.pre, flip=False)
        if target is not None and "boxes" in target:
            target = dict(target, boxes=geom.boxes_to_view(target["boxes"]))
        return x, target


@dataclass
class DetectorInfo:
    """What a checkpoint says about its model besides the weights."""

    spec: ModelSpec
    num_classes: int  # including background
    class_names: list[str]  # index 0 is "__background__"
    category_ids: list[int]  # dataset category id of label i (i >= 1) is category_ids[i - 1]
    preprocessing: Preprocessing
    form: str  # "training checkpoint" | "exported student" | "mmdet" | "detectron2" | "state dict"

    def classes(self) -> list[dict]:
        return [{"label": i + 1, "id": cid, "name": name}
                for i, (cid, name) in enumerate(zip(self.category_ids, self.class_names[1:]))]


@dataclass
class ResolvedCheckpoint:
    info: DetectorInfo
    state: dict


def _num_classes_of_state(state: dict, family: str) -> int:
    if family == "faster_rcnn":
        key = "roi_heads.box_predictor.cls_score.weight"
        if key in state:
            return int(state[key].shape[0])
    else:
        cls, reg = "head.classification_head.cls_logits.weight", "head.regression_head.bbox_reg.weight"
        if cls in state and reg in state:
            return int(state[cls].shape[0]) // (int(state[reg].shape[0]) // 4)
    raise UserError("cannot tell the number of classes: the file has no box classifier of a "
                    f"{family} model (is --model the right architecture?)")


def _classes(num_classes: int, names: list[str] | None, ids: list[int] | None, data, path) -> tuple[list, list]:
    """(class_names with background, category ids): the file's, else the dataset's, else 1..K."""
    if data is not None:
        if data.num_classes != num_classes:
            raise UserError(f"{path}: the model has {num_classes - 1} classes (+ background), the dataset "
                            f"{data.name} has {data.num_classes - 1}; use the dataset it was trained on")
        if names is not None and list(names[-(num_classes - 1):]) != list(data.class_names[1:]):
            raise UserError(f"{path}: the model's classes ({', '.join(names[-(num_classes - 1):][:5])} ...) are not "
                            f"the dataset's ({', '.join(data.class_names[1:6])} ...)")
        return list(data.class_names), list(data.category_ids)
    if names is not None and len(names) == num_classes - 1:
        names = ["__background__", *names]
    if names is None or len(names) != num_classes:
        names = ["__background__", *[f"class {i}" for i in range(1, num_classes)]]
    return list(names), list(ids) if ids is not None else list(range(1, num_classes))


def resolve_checkpoint(path: str | Path, model: str | None = None, data=None) -> ResolvedCheckpoint:
    """The model description and torchvision-format weights of any checkpoint form (module docstring).

    `model`: zoo name or model TOML, required where the file does not say it (and checked where
    it does); `data`: a loaded DetectionData whose classes the model must have, or None.
    """
    from .checkpoint import read_checkpoint
    from .convert import convert_state, read_pickle_weights, recognise, state_and_meta
    path = Path(path)
    sidecar = path.with_suffix(".json")
    if sidecar.is_file() and path.suffix != ".json":
        meta = json.loads(sidecar.read_text())
        if meta.get("format") == STUDENT_FORMAT:
            m = meta["model"]
            spec = ModelSpec(m["name"], m["family"], m["config"], Preprocessing.from_dict(meta["preprocessing"]))
            _check_model_name(path, spec.name, model)
            names = ["__background__", *[c["name"] for c in meta["classes"]]]
            names, ids = _classes(int(meta["num_classes"]), names, [c["id"] for c in meta["classes"]], data, path)
            info = DetectorInfo(spec, int(meta["num_classes"]), names, ids, spec.preprocessing, "exported student")
            return ResolvedCheckpoint(info, read_checkpoint(path))
    ck = read_pickle_weights(path) if path.suffix == ".pkl" else read_checkpoint(path)
    if "model_state" in ck and isinstance(ck.get("model"), dict) and "config" in ck["model"]:
        m = ck["model"]
        _check_model_name(path, m["name"], model)
        pre = Preprocessing.from_dict(ck["preprocessing"])
        spec = ModelSpec(name=m["name"], family=m["family"], config=m["config"], preprocessing=pre)
        names, ids = _classes(int(ck["num_classes"]), ck.get("class_names"), ck.get("category_ids"), data, path)
        return ResolvedCheckpoint(DetectorInfo(spec, int(ck["num_classes"]), names, ids, pre, "training checkpoint"),
                                  ck["model_state"])
    state, meta = state_and_meta(ck)
    if model is None:
        raise UserError(f"{path}: the file does not say which model it holds; give --model NAME "
                        "(`defeat-cache models`) or a model TOML")
    spec = load_model_spec(model)
    source = recognise(state)
    if source:
        from .convert import SOURCES
        module = SOURCES[source]
        num_classes = module.num_classes_of(state, module.family_of(state))
        with torch.device("meta"):
            target = build_detector(spec, num_classes).state_dict()
        conv = convert_state(state, source, target, spec.family, spec=spec, meta=meta, what=f"model {spec.name}")
        state, form, names = conv.state, source, conv.class_names
    else:
        num_classes, form, names = _num_classes_of_state(state, spec.family), "state dict", None
    names, ids = _classes(num_classes, names, None, data, path)
    return ResolvedCheckpoint(DetectorInfo(spec, num_classes, names, ids, spec.preprocessing, form), state)


def _check_model_name(path, held: str, asked: str | None) -> None:
    if asked and held not in (asked, Path(asked).stem):
        raise UserError(f"{path}: holds a {held!r} model, not {asked!r}")


def build_resolved(resolved: ResolvedCheckpoint, device: str | torch.device = "cpu") -> nn.Module:
    """The detector with the checkpoint's weights (strict), in eval mode, taking raw images."""
    info = resolved.info
    with torch.device("meta"):  # the checkpoint gives every tensor: no memory for random weights first
        model = build_detector(info.spec, info.num_classes)
    target = model.state_dict()
    # step counters carry no weights: FrozenBatchNorm2d has none, BatchNorm2d restarts them
    state = {k: v for k, v in resolved.state.items() if not (k.endswith(COUNTER) and k not in target)}
    state.update({k: target[k] for k in target if k.endswith(COUNTER) and k not in state})
    missing = sorted(set(target) - set(state))
    unexpected = sorted(set(state) - set(target))
    shapes = [k for k in target if k in state and state[k].shape != target[k].shape]
    if missing or unexpected or shapes:
        raise UserError(f"weights do not fit model {info.spec.name} with {info.num_classes} classes: "
                        f"{len(missing)} missing ({', '.join(missing[:3])}), {len(unexpected)} unexpected "
                        f"({', '.join(unexpected[:3])}), {len(shapes)} shape mismatches ({', '.join(shapes[:3])})")
    model.load_state_dict({k: v.to(target[k].dtype) for k, v in state.items()}, assign=True)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise UserError(f"weights do not fit model {info.spec.name}: {', '.join(left[:3])} were not loaded")
    model.transform = ImageTransform(info.preprocessing)
    model.info = info
    return model.eval().to(device)


def load_detector(path: str | Path, model: str | None = None, data=None, device: str | torch.device = "cpu") -> nn.Module:
    """A detector from any checkpoint form, in eval mode, that takes raw images
    (`model([image])`, float RGB [3, H, W] in [0, 1] or uint8) and preprocesses them itself.
    `model.info` (DetectorInfo) holds its classes (names and dataset category ids) and preprocessing.
    `data` may be a dataset TOML path or a loaded dataset (its split "val" gives the classes)."""
    if isinstance(data, (str, Path)):
        from ..data.dataset import load_dataset
        data = load_dataset(data, "val")
    return build_resolved(resolve_checkpoint(path, model, data), device)


@contextlib.contextmanager
def view_inputs(model: nn.Module):
    """Within: the model takes views (already resized and normalised, views.py), as extraction,
    training and evaluation give it; the model's own transform comes back afterwards."""
    saved = model.transform
    if isinstance(saved, ViewTransform):
        yield model
        return
    model.transform = ViewTransform(saved.size_divisible)
    try:
        yield model
    finally:
        model.transform = saved


__all__ = ["DetectorInfo", "ImageTransform", "ResolvedCheckpoint", "STUDENT_FORMAT", "build_resolved", "load_detector",
           "resolve_checkpoint", "view_inputs"]
